"""Registry, and the loop contract: steps run in `lax.scan` under `jit`, and a row band steps
exactly like the same rows of the whole latent (everything is elementwise in the sample)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrifusion_jax.sampling import (
    SCHEDULERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    scheduler_from_config,
)
from tests.sampling.trajectory import SDXL_CONFIG, config, draw, model_fn, rel_err, run_diffusers

NAMES = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde"]


# --- registry ---------------------------------------------------------------------------------


def test_sdxl_config_builds_euler():
    s = scheduler_from_config(SDXL_CONFIG)
    assert isinstance(s, EulerDiscreteScheduler)
    assert (s.timestep_spacing, s.steps_offset, s.beta_schedule) == ("leading", 1, "scaled_linear")
    hash(s)  # frozen and hashable: usable as a static argument


@pytest.mark.parametrize(
    "name,cls",
    [
        ("ddim", DDIMScheduler),
        ("euler", EulerDiscreteScheduler),
        ("euler_a", EulerAncestralDiscreteScheduler),
        ("dpmpp_2m", DPMSolverMultistepScheduler),
        ("DDIMScheduler", DDIMScheduler),
        ("EulerAncestralDiscreteScheduler", EulerAncestralDiscreteScheduler),
        ("DPMSolverMultistepScheduler", DPMSolverMultistepScheduler),
    ],
)
def test_override_name(name, cls):
    assert type(scheduler_from_config(SDXL_CONFIG, name)) is cls


def test_class_name_and_keys_from_config():
    ddim = scheduler_from_config({**SDXL_CONFIG, "_class_name": "DDIMScheduler"})
    assert isinstance(ddim, DDIMScheduler)
    # SDXL pipelines' DDIM: the Euler config's DDIM keys are read, the Euler-only ones ignored.
    assert (ddim.set_alpha_to_one, ddim.clip_sample) == (False, False)
    assert ddim.timestep_spacing == "leading"
    sde = {**SDXL_CONFIG, "_class_name": "DPMSolverMultistepScheduler",
           "algorithm_type": "sde-dpmsolver++"}
    assert scheduler_from_config(sde).algorithm_type == "sde-dpmsolver++"
    assert scheduler_from_config(sde, "dpmpp_2m").algorithm_type == "dpmsolver++"
    # UniPC/DEIS names are mapped as diffusers maps them.
    unipc = {**sde, "algorithm_type": "deis", "solver_type": "bh2"}
    assert scheduler_from_config(unipc).solver_type == "midpoint"


def test_unknown_scheduler_one_line():
    with pytest.raises(ValueError) as e:
        scheduler_from_config(SDXL_CONFIG, "heun")
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in SCHEDULERS)
    with pytest.raises(ValueError, match="PNDMScheduler"):
        scheduler_from_config({**SDXL_CONFIG, "_class_name": "PNDMScheduler"})


@pytest.mark.parametrize(
    "name,overrides",
    [
        *[(n, {"prediction_type": "sample"}) for n in NAMES],
        *[(n, {"timestep_spacing": "karras"}) for n in NAMES],
        *[(n, {"beta_schedule": "sigmoid"}) for n in NAMES],
        ("ddim", {"thresholding": True}),
        ("dpmpp_2m", {"thresholding": True}),
        ("euler", {"interpolation_type": "log_linear"}),
        ("euler", {"use_exponential_sigmas": True}),
        ("euler", {"timestep_type": "continuous"}),
        ("euler", {"final_sigmas_type": "max"}),
        ("DPMSolverMultistepScheduler", {"solver_order": 3}),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
        ("dpmpp_2m", {"use_lu_lambdas": True}),
        ("dpmpp_2m", {"variance_type": "learned_range"}),
    ],
)
def test_unsupported_config_raises(name, overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        scheduler_from_config({**SDXL_CONFIG, **overrides}, name)


def test_needs_noise_and_missing_noise():
    flags = {n: scheduler_from_config(SDXL_CONFIG, n).needs_noise for n in NAMES}
    assert flags == {"ddim": False, "euler": False, "euler_a": True, "dpmpp_2m": False,
                     "dpmpp_2m_sde": True}
    assert DDIMScheduler(eta=0.5).needs_noise
    for name in ("euler_a", "dpmpp_2m_sde"):
        s = scheduler_from_config(SDXL_CONFIG, name)
        sched = s.set_timesteps(5)
        x = jnp.ones((1, 2, 2, 1))
        with pytest.raises(ValueError, match="noise"):
            s.step(sched, s.init_state(sched, x.shape), x, x)


def test_too_many_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler_from_config(SDXL_CONFIG).set_timesteps(1001)


# --- the loop contract ------------------------------------------------------------------------


def scan_sample(sched, schedule, x, noises):
    """The sampler's inner loop, reduced: scale, eps(x, t), step; carried through lax.scan."""

    def body(carry, noise):
        x, state = carry
        t = schedule.timesteps[state.step]
        eps = model_fn(sched.scale_model_input(schedule, state, x), t)
        x, state = sched.step(schedule, state, eps, x, noise if sched.needs_noise else None)
        return (x, state), None

    state = sched.init_state(schedule, x.shape)
    (x, state), _ = jax.lax.scan(body, (x, state), noises)
    return x, state


@pytest.mark.parametrize("name", NAMES)
def test_scan_under_jit_matches_diffusers(name):
    cfg = config(name, use_karras_sigmas=name.startswith("dpmpp"))
    steps = 12
    sched = scheduler_from_config(cfg, name)
    schedule = sched.set_timesteps(steps)
    x0, noises = draw(steps)

    @jax.jit
    def run(schedule, x0, noises):
        return scan_sample(sched, schedule, x0 * sched.init_noise_sigma(schedule), noises)

    x, state = run(schedule, jnp.asarray(x0), jnp.asarray(noises[:steps]))
    assert int(state.step) == steps
    assert all(a.dtype in (jnp.float32, jnp.int32) for a in jax.tree.leaves(state))
    _, _, x_ref, _ = run_diffusers(name, cfg, steps)
    # jnp.sin vs np.sin in the toy eps add ulp-level noise on top of the scheduler's own.
    assert rel_err(x, x_ref) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_row_bands_step_like_the_whole(name):
    """Two row halves (H of [B, H, W, C]) stepped separately == the whole latent, bit for bit."""
    sched = scheduler_from_config(config(name), name)
    schedule = sched.set_timesteps(6)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 6, 4)), jnp.float32)
    noises = jnp.asarray(rng.standard_normal((6, 2, 8, 6, 4)), jnp.float32)
    run = jax.jit(lambda x, noises: scan_sample(sched, schedule, x, noises))
    whole, state = run(x, noises)
    top, state_top = run(x[:, :4], noises[:, :, :4])
    bottom, _ = run(x[:, 4:], noises[:, :, 4:])
    np.testing.assert_array_equal(np.concatenate([top, bottom], axis=1), whole)
    if name.startswith("dpmpp"):  # the multistep buffer is banded too
        np.testing.assert_array_equal(state_top.prev_model_output, state.prev_model_output[:, :4])


def test_bf16_model_output_keeps_fp32_carry():
    s = scheduler_from_config(SDXL_CONFIG, "dpmpp_2m")
    schedule = s.set_timesteps(4)
    x = jnp.ones((1, 4, 4, 2), jnp.float32)
    state = s.init_state(schedule, x.shape)
    x1, state = jax.jit(s.step)(schedule, state, x.astype(jnp.bfloat16), x)
    assert x1.dtype == jnp.float32 and state.prev_model_output.dtype == jnp.float32


def test_dpm_step_is_differentiable():
    """The unused second-order branch stays finite, so gradients through a step are not nan."""
    s = scheduler_from_config(SDXL_CONFIG, "dpmpp_2m")
    schedule = s.set_timesteps(4)
    x = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32).reshape(1, 4, 4, 1)

    def loss(x):
        state = s.init_state(schedule, x.shape)
        for _ in range(4):  # step 0 and the last step take the first-order branch
            x, state = s.step(schedule, state, model_fn(x, 500.0), x)
        return jnp.sum(x)

    assert np.all(np.isfinite(jax.grad(loss)(x)))
