"""ControlNets under displaced patch parallelism, on the tiny SDXL-style UNet with two tiny
random ControlNets (each with its own conditioning image and scale).

- a `full_sync` step on n = 2, 4 bands (and with CFG split) equals one device: each band's
  ControlNet reads its rows of the conditioning image and adds its residuals to its own rows;
- a displaced step fed its own state equals one device (the ControlNets keep stale state too);
- a displaced step: perturbing the conditioning image inside band j leaves every other band's
  eps bit-identical (the ControlNet's exchanged values feed only the next step);
- whole trajectories: `full_sync` equals one device; displaced stays close, naive is worse.
Tolerance: relative L2 1e-5 (fp32; only the order of sums changes), as the UNet's tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrifusion_jax.models.controlled_unet import ControlledUNet, controlled_params
from distrifusion_jax.models.controlnet import ControlNetModel
from distrifusion_jax.models.controlnet_config import ControlNetConfig
from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.step import local_eps, make_step
from distrifusion_jax.sampling import scheduler_from_config
from distrifusion_jax.sampling.sample import make_sampler
from tests.controlnet_fixtures import TINY_SDXL_CONTROLNET_CONFIG, tiny_torch_controlnet
from tests.parallel.helpers import SDXL_SCHEDULER, rel_err
from tests.parallel.unet_fixtures import example_inputs, tiny_unet
from tests.tiny import flax_params

T = jnp.float32(421.0)
G = 4.0
SCALES = (0.8, 0.5)  # one per ControlNet


@functools.cache
def controlled():
    """(ControlledUNet with two ControlNets, params)."""
    unet, unet_params = tiny_unet("sdxl")
    cfg = ControlNetConfig.from_diffusers(TINY_SDXL_CONTROLNET_CONFIG)
    x, t, cond, _ = example_inputs("sdxl", 1, (8, 8), guided=False)
    image = jnp.zeros((1, 16, 16, 3))
    flat = lambda a: a[0]
    args = (x[:, :8, :8], t, flat(cond["encoder_hidden_states"]), image,
            {k: flat(cond[k]) for k in ("text_embeds", "time_ids")})  # fmt: skip
    nets = [
        flax_params(tiny_torch_controlnet(TINY_SDXL_CONTROLNET_CONFIG, seed), ControlNetModel(cfg),
                    *args)
        for seed in (10, 11)
    ]  # fmt: skip
    model = ControlledUNet(unet.config, (cfg, cfg))
    return model, controlled_params(unet_params, nets)


def inputs(batch: int, hw: tuple[int, int], guided: bool = True, steps: int | None = None):
    """(latents, cond with `control_scales` [G, B, K] (or [G, B, T, K]), control images)."""
    x, _, cond, _ = example_inputs("sdxl", batch, hw, guided=guided)
    g = 2 if guided else 1
    rng = np.random.default_rng(7)
    images = tuple(
        jnp.asarray(rng.uniform(size=(batch, 2 * hw[0], 2 * hw[1], 3)), jnp.float32) for _ in SCALES
    )
    shape = (g, batch) + ((steps,) if steps else ()) + (len(SCALES),)
    cond = dict(cond, control_scales=jnp.broadcast_to(jnp.asarray(SCALES, jnp.float32), shape))
    return x, cond, images


def single_device(model, params, x, cond, images):
    pc = ParallelConfig()
    return local_eps(model, params, {}, x, T, cond, G, pc, False, images)[0]


@pytest.mark.parametrize(
    "n,cfg_split,batch,hw",
    [(2, False, 1, (16, 16)), (4, False, 2, (16, 8)), (4, True, 1, (32, 8))],
    ids=str,
)
def test_full_sync_step_equals_single_device(n, cfg_split, batch, hw):
    model, params = controlled()
    x, cond, images = inputs(batch, hw)
    pc = ParallelConfig(patches=n, cfg_split=cfg_split, mode="full_sync")
    step = make_step(model, pc, make_mesh(pc), displaced=False)
    eps, _ = step(params, {}, x, T, cond, G, images)
    ref = single_device(model, params, x, cond, images)
    err = rel_err(eps, ref)
    print(f"[controlnet] full_sync n={n} cfg_split={cfg_split}: rel_l2 {err:.3g}")
    assert err <= 1e-5
    # The ControlNets move eps: without them the answer differs.
    plain = dict(cond, control_scales=jnp.zeros_like(cond["control_scales"]))
    assert rel_err(single_device(model, params, x, plain, images), ref) > 1e-3


def test_displaced_step_with_fresh_state_equals_single_device():
    model, params = controlled()
    x, cond, images = inputs(1, (16, 16))
    pc = ParallelConfig(patches=4, mode="corrected_async_gn")
    mesh = make_mesh(pc)
    _, state = make_step(model, pc, mesh, False)(params, {}, x, T, cond, G, images)
    eps, _ = make_step(model, pc, mesh, True)(params, state, x, T, cond, G, images)
    assert rel_err(eps, single_device(model, params, x, cond, images)) <= 1e-5
    # Each ControlNet keeps its own stale buffers of every kind.
    for k in (0, 1):
        sub = state["outbox"][f"controlnets_{k}"]
        names = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(sub)[0]}
        assert {"above", "below", "k", "v", "moments"} <= names, names
        assert "controlnet_cond_embedding" in sub


def test_displaced_step_bands_independent_of_other_bands_control_image():
    """DESIGN §2 on the ControlNet path: with the state held fixed, a change to the
    conditioning image inside band j reaches no other band's eps in a displaced step."""
    model, params = controlled()
    n, hw = 4, (32, 8)
    x, cond, images = inputs(1, hw)
    pc = ParallelConfig(patches=n, mode="corrected_async_gn")
    mesh = make_mesh(pc)
    _, state = make_step(model, pc, mesh, False)(params, {}, x, T, cond, G, images)
    disp = make_step(model, pc, mesh, True)
    base, _ = disp(params, state, x, T, cond, G, images)
    rows = 2 * hw[0] // n  # image rows per band
    j = 1
    bumped = images[0].at[:, j * rows + 4 : (j + 1) * rows - 4].add(0.5)
    eps, _ = disp(params, state, x, T, cond, G, (bumped, images[1]))
    lat = hw[0] // n
    for i in range(n):
        same = np.array_equal(np.asarray(eps[:, i * lat : (i + 1) * lat]),
                              np.asarray(base[:, i * lat : (i + 1) * lat]))  # fmt: skip
        assert same == (i != j), i


def _trajectory(model, params, x, cond, images, pc, steps):
    sched = scheduler_from_config(SDXL_SCHEDULER, "ddim")
    sample = make_sampler(model, sched, steps, pc, make_mesh(pc))
    out = sample(params, x, cond, 3.0, jax.random.PRNGKey(1), {"control": images})
    return np.asarray(out)


@pytest.mark.slow  # four sampler compiles
def test_trajectories():
    """full_sync n = 4 equals one device; displaced stays closer than naive patch."""
    model, params = controlled()
    steps = 5
    x, cond, images = inputs(1, (16, 16), steps=steps)
    # Per-step scales as control_guidance_start/end make them: ControlNet 1 stops after 2.
    keep = np.ones((steps, 2), np.float32)
    keep[2:, 1] = 0.0
    cond["control_scales"] = cond["control_scales"] * keep
    run = lambda pc: _trajectory(model, params, x, cond, images, pc, steps)
    ref = run(ParallelConfig())
    err = rel_err(run(ParallelConfig(patches=4, mode="full_sync")), ref)
    print(f"[controlnet] trajectory full_sync n=4: rel_l2 {err:.3g}")
    assert err <= 1e-5
    errs = {
        mode: rel_err(run(ParallelConfig(patches=4, mode=mode, warmup_steps=1)), ref)
        for mode in ("corrected_async_gn", "naive_patch")
    }
    print(f"[controlnet] trajectory n=4 w=1 rel_l2 vs one device: {errs}")
    assert errs["corrected_async_gn"] < 0.5 * errs["naive_patch"]
