"""In a displaced step every layer exchange reads only the carried state (last step's local
values), never this step's latents: each collective can start with the step and finish while the
layers before its reader compute. Only the exact conv_in halo and the CFG meeting read the
latents. A band perturbation leaves the other bands' eps bit-identical."""

import jax.numpy as jnp
import numpy as np
import pytest

from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.step import make_step
from tests.parallel.dataflow import eps_collectives, latent_collectives
from tests.parallel.helpers import sync_state
from tests.parallel.unet_fixtures import example_inputs, tiny_unet

ASYNC_MODES = ["corrected_async_gn", "stale_gn", "separate_gn"]


@pytest.mark.parametrize("mode", ASYNC_MODES)
@pytest.mark.parametrize("cfg_split", [False, True])
def test_displaced_collectives_read_only_state(toy, mode, cfg_split):
    model, params, x, cond = toy
    pc = ParallelConfig(patches=4, mode=mode, cfg_split=cfg_split)
    mesh = make_mesh(pc)
    t = jnp.float32(500.0)
    state = sync_state(model, pc, mesh, params, x, t, cond, 3.0, abstract=True)
    args = (params, state, x, t, cond, 3.0)
    step = make_step(model, pc, mesh, True)
    # conv_in's exact one-row halo (above, below) and the CFG meeting; nothing else.
    allowed = ["ppermute", "ppermute"] + (["all_gather"] if cfg_split else [])
    assert latent_collectives(step, args, argnum=2) == sorted(allowed)
    _, found = eps_collectives(step, *args)
    assert len(found) > len(allowed)  # the layers do exchange (last step's values)


def test_sync_step_reads_its_exchanges(toy):
    """The walk can fail: in a synchronous step the layer collectives exchange this step's
    values and reach eps."""
    model, params, x, cond = toy
    pc = ParallelConfig(patches=4)
    step = make_step(model, pc, make_mesh(pc), False)
    args = (params, {}, x, jnp.float32(500.0), cond, 3.0)
    assert len(latent_collectives(step, args, argnum=2)) > 2
    into_eps, _ = eps_collectives(step, *args)
    assert len(into_eps) > 2


@pytest.mark.parametrize("displaced", [False, True])
def test_band_perturbation(toy, displaced):
    """Hold the stale state fixed, perturb the middle rows of band 1: in a displaced step every
    other band's eps is bit-identical; in a sync step it changes."""
    model, params, x, cond = toy
    n = 4
    pc = ParallelConfig(patches=n, mode="corrected_async_gn")
    mesh = make_mesh(pc)
    t = jnp.float32(500.0)
    state = sync_state(model, pc, mesh, params, x, t, cond, 3.0)
    step = make_step(model, pc, mesh, displaced)
    h = x.shape[1] // n
    x2 = x.at[:, h + 2 : 2 * h - 2].add(1.0)  # rows away from band 1's edges (conv_in is exact)
    e1, _ = step(params, state, x, t, cond, 3.0)
    e2, _ = step(params, state, x2, t, cond, 3.0)
    e1, e2 = np.asarray(e1), np.asarray(e2)
    others = np.r_[0:h, 2 * h : n * h]
    assert not np.array_equal(e1[:, h : 2 * h], e2[:, h : 2 * h])
    if displaced:
        np.testing.assert_array_equal(e1[:, others], e2[:, others])
    else:
        assert not np.array_equal(e1[:, others], e2[:, others])


@pytest.mark.parametrize("cfg_split", [False, True])
def test_unet_displaced_collectives_read_only_state(cfg_split):
    model, params = tiny_unet("sdxl")
    x, _, cond, _ = example_inputs("sdxl", 1, (16, 16), guided=True)
    pc = ParallelConfig(patches=4, cfg_split=cfg_split)
    mesh = make_mesh(pc)
    t = jnp.float32(500.0)
    state = sync_state(model, pc, mesh, params, x, t, cond, 3.0, abstract=True)
    args = (params, state, x, t, cond, 3.0)
    step = make_step(model, pc, mesh, True)
    allowed = ["ppermute", "ppermute"] + (["all_gather"] if cfg_split else [])
    assert latent_collectives(step, args, argnum=2) == sorted(allowed)
    _, found = eps_collectives(step, *args)
    assert len(found) > 50  # every conv, self-attention and GroupNorm exchanges
