"""PCPP (partially conditioned patch parallelism): in a displaced step band i attends to its own
fresh tokens and the r = round(p * L/n) nearest tokens of bands i-1 and i+1 from step t-1; only
those rows are exchanged, with the two neighbours. Tolerance: fp32 reordered sums, 1e-5."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrifusion_jax.parallel import KVExchange, ParallelConfig
from distrifusion_jax.parallel.attention import pcpp_tokens
from distrifusion_jax.parallel.exchange import receive
from distrifusion_jax.parallel.mesh import make_mesh, shard
from distrifusion_jax.parallel.state import OUTBOX, STALE, carried_bytes
from distrifusion_jax.parallel.step import make_step
from tests.parallel.dataflow import eps_collectives, latent_collectives
from tests.parallel.helpers import rel_err, run_trajectory, single_device_eps, sync_state
from tests.parallel.unet_fixtures import example_inputs, tiny_unet

T = jnp.float32(500.0)
P = jax.sharding.PartitionSpec


@pytest.mark.parametrize("n,tokens,portion", [(2, 12, 0.3), (4, 10, 0.5), (3, 8, 1.0), (8, 6, 0.0)])
def test_window_is_the_neighbours_nearest_tokens(n, tokens, portion):
    """KVExchange alone: sync call on K,V (fills the state), displaced call on K2,V2: band i gets
    K[i*l - r : i*l] (stale), its own K2, K[(i+1)*l : (i+1)*l + r] (stale); masked off the image."""
    rng = np.random.default_rng(n)
    b, c, length = 2, 3, n * tokens
    k, v = (jnp.asarray(rng.normal(size=(b, length, c)), jnp.float32) for _ in range(2))
    k2, v2 = k + 1.0, v - 1.0
    mesh = make_mesh(ParallelConfig(patches=n))
    sync = ParallelConfig(patches=n, pcpp=portion).context(displaced=False)
    displaced = sync.replace(displaced=True)

    def body(k, v, k2, v2):
        _, state = KVExchange(sync).apply({}, k, v, mutable=[OUTBOX])
        stale = receive(state[OUTBOX], "patch", n)  # what the displaced step starts with
        (kw, vw, mask), _ = KVExchange(displaced).apply({STALE: stale}, k2, v2, mutable=[OUTBOX])
        if mask is None:
            mask = jnp.ones((1, 1, 1, kw.shape[1]), bool)
        return kw, vw, mask

    spec = P(None, "patch")
    fn = shard(body, mesh, in_specs=(spec,) * 4, out_specs=(spec, spec, P(None, None, None, "patch")))
    kw, vw, mask = (np.asarray(a) for a in fn(k, v, k2, v2))
    r = pcpp_tokens(portion, tokens)
    width = tokens + 2 * r
    kf, vf = np.asarray(k), np.asarray(v)
    for i in range(n):
        win = slice(i * width, (i + 1) * width)
        want_mask = np.r_[[i > 0] * r, [True] * tokens, [i < n - 1] * r]
        np.testing.assert_array_equal(mask[0, 0, 0, win], want_mask)
        for got, stale, fresh in ((kw, kf, k2), (vw, vf, v2)):
            own = np.asarray(fresh)[:, i * tokens : (i + 1) * tokens]
            np.testing.assert_array_equal(got[:, win][:, r : r + tokens], own)
            if i > 0:
                np.testing.assert_array_equal(
                    got[:, win][:, :r], stale[:, i * tokens - r : i * tokens]
                )
            if i < n - 1:
                below = stale[:, (i + 1) * tokens : (i + 1) * tokens + r]
                np.testing.assert_array_equal(got[:, win][:, r + tokens :], below)


def test_full_portion_on_two_bands_is_exact(toy):
    """p = 1 on n = 2 sees every token: fed its own state, the displaced step == one device;
    on n = 4 band 0 cannot see bands 2, 3, so the same check fails (the window is real)."""
    model, params, x, cond = toy
    ref = single_device_eps(model, params, x, cond, T, 3.0)
    errs = {}
    for n in (2, 4):
        pc = ParallelConfig(patches=n, pcpp=1.0)
        mesh = make_mesh(pc)
        state = sync_state(model, pc, mesh, params, x, T, cond, 3.0)
        eps, _ = make_step(model, pc, mesh, True)(params, state, x, T, cond, 3.0)
        errs[n] = rel_err(eps, ref)
    assert errs[2] <= 1e-5, errs
    assert errs[4] > 1e-3, errs


@pytest.mark.slow
def test_tiny_unet_full_portion_is_exact():
    """The same on the tiny SDXL UNet: every transformer's attn1 takes the window and its mask."""
    model, params = tiny_unet("sdxl")
    x, _, cond, _ = example_inputs("sdxl", 1, (16, 16), guided=True)
    pc = ParallelConfig(patches=2, pcpp=1.0)
    mesh = make_mesh(pc)
    state = sync_state(model, pc, mesh, params, x, T, cond, 4.0)
    eps, _ = make_step(model, pc, mesh, True)(params, state, x, T, cond, 4.0)
    assert rel_err(eps, single_device_eps(model, params, x, cond, T, 4.0)) <= 1e-5


def test_exchange_and_state_shrink(toy):
    """Counted three ways (jaxpr, compiled HLO, formula): 2 r tokens of K and V per attention
    layer instead of (n - 1) bands; the stale K,V shrink the same way."""
    from distrifusion_jax.parallel.cost import step_cost

    model, params, x, cond = toy
    p_s, x_s, c_s = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x, cond)
    )
    b, h, w, n = 4, x.shape[1], x.shape[2], 4
    costs = {
        p: step_cost(model, p_s, ParallelConfig(patches=n, pcpp=p), x_s, c_s, compile=True)
        for p in (None, 0.3)
    }
    c = costs[0.3]
    r = pcpp_tokens(0.3, h // n * w)
    assert c.analytic_elements["self-attention K,V"] == 2 * r * b * 16 * 2
    assert c.exchanged_elements == sum(c.analytic_elements.values()) == c.compiled["elements"]
    assert c.exchanged_elements < costs[None].exchanged_elements
    assert c.state_bytes < costs[None].state_bytes
    assert c.flops < costs[None].flops  # attention over r + l + r keys, not L


@pytest.mark.parametrize("fused", [False, True])
def test_displaced_collectives_read_only_state(toy, fused):
    model, params, x, cond = toy
    pc = ParallelConfig(patches=4, pcpp=0.3, fused_exchange=fused)
    mesh = make_mesh(pc)
    state = sync_state(model, pc, mesh, params, x, T, cond, 3.0, abstract=True)
    args = (params, state, x, T, cond, 3.0)
    step = make_step(model, pc, mesh, True)
    assert latent_collectives(step, args, argnum=2) == ["ppermute", "ppermute"]  # conv_in
    _, found = eps_collectives(step, *args)
    assert "all_gather" in found.values()  # GroupNorm still gathers (last step's moments)


def test_trajectory_close_fused_identical(toy):
    """Sampling: PCPP stays far closer to one device than naive patch; fused == per layer."""
    model, params, x, cond = toy
    ref = run_trajectory(model, params, x, cond, ParallelConfig(), steps=12)
    pc = ParallelConfig(patches=4, pcpp=0.3, warmup_steps=2)
    pcpp = run_trajectory(model, params, x, cond, pc, 12)
    naive = run_trajectory(model, params, x, cond, ParallelConfig(patches=4, mode="naive_patch"), 12)
    assert rel_err(pcpp, ref) < 0.5 * rel_err(naive, ref)
    fused = run_trajectory(model, params, x, cond, dataclasses.replace(pc, fused_exchange=True), 12)
    assert rel_err(fused, pcpp) <= 1e-6


def test_state_bytes_counts_the_window(toy):
    model, params, x, cond = toy
    sizes = {}
    for p in (None, 0.25):
        pc = ParallelConfig(patches=4, pcpp=p)
        state = sync_state(model, pc, make_mesh(pc), params, x, T, cond, 3.0, abstract=True)
        sizes[p] = carried_bytes(state)
    l_tok, c, b = x.shape[1] // 4 * x.shape[2], 16, 4
    # carried: each band's own K,V (sent to all) vs its r edge tokens for each neighbour
    kv_local, kv_window = 2 * b * l_tok * c * 4, 2 * 2 * b * pcpp_tokens(0.25, l_tok) * c * 4
    assert sizes[None] - sizes[0.25] == kv_local - kv_window


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"pcpp": 1.5}, "0 <= p <= 1"),
        ({"pcpp": 0.3, "mode": "full_sync"}, "displaced"),
        ({"pcpp": 0.3, "mode": "naive_patch"}, "displaced"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(patches=4, **kw)
