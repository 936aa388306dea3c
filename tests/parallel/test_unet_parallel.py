"""Patch parallelism on the real (tiny) UNets: full_sync on n bands equals one device, for
SDXL- and SD1.5-style configs, with and without CFG split, batch 1 and 2, square and
non-square latents; a displaced step fed its own state equals one device.
Tolerance: relative L2 1e-5 (fp32; only the order of sums changes)."""

import jax
import jax.numpy as jnp
import pytest

from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.step import make_step
from tests.parallel.helpers import rel_err, single_device_eps
from tests.parallel.unet_fixtures import example_inputs, tiny_unet

T = jnp.float32(421.0)
G = 4.0

CASES = [
    # kind, n, cfg_split, batch, (H_lat, W_lat)
    ("sdxl", 2, False, 1, (16, 16)),
    ("sdxl", 4, True, 2, (16, 24)),
    ("sdxl", 8, False, 2, (32, 16)),
    pytest.param("sd15", 2, True, 1, (16, 16), marks=pytest.mark.slow),
    pytest.param("sd15", 4, False, 2, (32, 24), marks=pytest.mark.slow),
    pytest.param("sd15", 8, False, 1, (64, 8), marks=pytest.mark.slow),
]


def single_device(model, params, x, cond):
    return single_device_eps(model, params, x, cond, T, G)


@pytest.mark.parametrize("kind,n,cfg_split,batch,hw", CASES, ids=str)
def test_full_sync_step_equals_single_device(kind, n, cfg_split, batch, hw):
    model, params = tiny_unet(kind)
    x, _, cond, _ = example_inputs(kind, batch, hw, guided=True)
    pc = ParallelConfig(patches=n, cfg_split=cfg_split, mode="full_sync")
    eps, _ = make_step(model, pc, make_mesh(pc), displaced=False)(params, {}, x, T, cond, G)
    assert rel_err(eps, single_device(model, params, x, cond)) <= 1e-5


@pytest.mark.parametrize("kind", ["sdxl", pytest.param("sd15", marks=pytest.mark.slow)])
def test_displaced_step_with_fresh_state_equals_single_device(kind):
    model, params = tiny_unet(kind)
    hw = (32, 16)
    x, _, cond, _ = example_inputs(kind, 2, hw, guided=True)
    pc = ParallelConfig(patches=4, mode="corrected_async_gn")
    mesh = make_mesh(pc)
    _, state = make_step(model, pc, mesh, False)(params, {}, x, T, cond, G)
    eps, _ = make_step(model, pc, mesh, True)(params, state, x, T, cond, G)
    assert rel_err(eps, single_device(model, params, x, cond)) <= 1e-5
    # The state holds every layer kind: conv halos, attention K/V, GroupNorm moments.
    names = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert {"above", "below", "k", "v", "moments"} <= names


@pytest.mark.slow
def test_displaced_step_differs_when_state_is_stale():
    """The test above can fail: with state from another input, the output moves."""
    model, params = tiny_unet("sdxl")
    x, _, cond, _ = example_inputs("sdxl", 1, (16, 16), guided=True)
    pc = ParallelConfig(patches=4)
    mesh = make_mesh(pc)
    _, state = make_step(model, pc, mesh, False)(params, {}, -x, T, cond, G)
    eps, _ = make_step(model, pc, mesh, True)(params, state, x, T, cond, G)
    assert rel_err(eps, single_device(model, params, x, cond)) > 1e-3
