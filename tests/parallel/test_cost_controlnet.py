"""`step_cost` of a ControlledUNet (tiny SDXL-style UNet and ControlNets, abstract params): its
displaced step's exchange counted three ways (jaxpr, compiled HLO, layer-shape formulas) agrees,
as the UNet's does, and each ControlNet adds exchange, FLOPs and stale bytes."""

import functools

import jax
import jax.numpy as jnp

from distrifusion_jax.io.components import COMPONENTS
from distrifusion_jax.models import UNet2DConditionModel, UNetConfig
from distrifusion_jax.models.controlled_unet import ControlledUNet, controlled_params
from distrifusion_jax.models.controlnet import ControlNetModel
from distrifusion_jax.models.controlnet_config import ControlNetConfig
from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.cost import StepCost, step_cost
from tests.controlnet_fixtures import TINY_SDXL_CONTROLNET_CONFIG
from tests.tiny import TINY_SDXL_POOLED_DIM, TINY_SDXL_UNET_CONFIG

N, H, W = 4, 16, 8  # row bands; latent rows and columns


def abstract_unet() -> tuple:
    """The tiny SDXL-style UNet, its abstract params, latent `[1, H, W, 4]` and CFG cond."""
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(dict(TINY_SDXL_UNET_CONFIG)))
    s = jax.ShapeDtypeStruct
    lat = s((1, H, W, 4), jnp.float32)
    cond = {
        "encoder_hidden_states": s((2, 1, 7, TINY_SDXL_UNET_CONFIG["cross_attention_dim"]), jnp.float32),
        "text_embeds": s((2, 1, TINY_SDXL_POOLED_DIM), jnp.float32),
        "time_ids": s((2, 1, 6), jnp.float32),
    }  # fmt: skip
    return unet, COMPONENTS["unet"].target(unet), lat, cond


@functools.cache
def cost(k: int, compile: bool = False) -> StepCost:
    """The displaced step's cost at n = N: the plain UNet (k = 0) or with k ControlNets."""
    unet, params, lat, cond = abstract_unet()
    s = jax.ShapeDtypeStruct
    pc = ParallelConfig(patches=N)
    if k == 0:
        return step_cost(unet, params, pc, lat, cond, compile=compile)
    cn = ControlNetConfig.from_diffusers(TINY_SDXL_CONTROLNET_CONFIG)
    cn_params = COMPONENTS["controlnet"].target(ControlNetModel(cn))
    model = ControlledUNet(unet.config, (cn,) * k)
    images = (s((1, 2 * H, 2 * W, 3), jnp.float32),) * k  # the tiny ControlNets embed 2x
    params = controlled_params(params, [cn_params] * k)
    return step_cost(model, params, pc, lat, cond, compile=compile, control=images)


def test_controlnet_three_counts_agree():
    """corrected_async_gn: jaxpr == compiled HLO == formula; the ControlNet adds to every layer
    kind's exchange, to the FLOPs and to the stale state."""
    without, c = cost(0), cost(1, compile=True)
    print(f"[controlnet cost] without {without.analytic_elements} with {c.analytic_elements}")
    assert c.exchanged_elements == sum(c.analytic_elements.values()) == c.compiled["elements"]
    assert c.exchanged_bytes == c.compiled["bytes"]
    assert sum(without.analytic_elements.values()) == without.exchanged_elements
    for kind, elements in without.analytic_elements.items():
        assert c.analytic_elements[kind] > elements, kind
    assert c.flops > without.flops and c.state_bytes > without.state_bytes


def test_each_controlnet_adds_the_same():
    """A second ControlNet adds what the first did: its own layers' exchange and state (the
    latent halo its `conv_in` also sends is the UNet's, counted once)."""
    c0, c1, c2 = cost(0), cost(1), cost(2)
    assert c2.exchanged_elements == sum(c2.analytic_elements.values())
    for field in ("exchanged_elements", "exchanged_bytes", "state_bytes"):
        one, two = getattr(c1, field) - getattr(c0, field), getattr(c2, field) - getattr(c1, field)
        assert one == two > 0, field
    assert c2.flops > c1.flops > c0.flops


def test_flops_count_the_whole_attention(monkeypatch):
    """`step_cost` counts attention as XLA's full op whatever kernel the platform would run:
    the CPU's "blocked" kernel is a `lax.map` whose body XLA's cost analysis counts once."""
    from distrifusion_jax.parallel.mesh import make_mesh
    from distrifusion_jax.parallel.step import make_step

    unet, params, lat, cond = abstract_unet()
    s = jax.ShapeDtypeStruct
    pc = ParallelConfig(patches=1)
    flops = {}
    for impl in ("blocked", "xla"):
        monkeypatch.setenv("DISTRIFUSION_ATTENTION", impl)
        flops[impl] = step_cost(unet, params, pc, lat, cond).flops
        step = make_step(unet, pc, make_mesh(pc), displaced=False)
        t = s((), jnp.float32)
        cost = step.lower(params, {}, lat, t, cond, t).cost_analysis()
        flops[f"lowered {impl}"] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert flops["blocked"] == flops["xla"] == flops["lowered xla"]
    assert flops["lowered blocked"] < flops["xla"]  # what the count was before
