"""Fused exchange: a displaced step's sends, exchanged together at its end, give bit-identical
eps and state to one collective per layer, in a handful of collectives, none read in the step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.comm import exchanged
from distrifusion_jax.parallel.exchange import exchange, flush
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.step import make_step
from tests.parallel.test_overlap import eps_collectives
from tests.parallel.unet_fixtures import example_inputs, tiny_unet

T = jnp.float32(421.0)
G = 4.0


def displaced_pair(kind, pc, batch, hw):
    """(eps, state) of one displaced step, per-layer and fused, from the same sync state."""
    model, params = tiny_unet(kind)
    x, _, cond, _ = example_inputs(kind, batch, hw, guided=True)
    mesh = make_mesh(pc)
    _, state = make_step(model, pc, mesh, False)(params, {}, -x, T, cond, G)  # stale != fresh
    out = []
    for fused in (False, True):
        p = dataclasses.replace(pc, fused_exchange=fused)
        out.append(make_step(model, p, mesh, True)(params, state, x, T, cond, G))
    return out


@pytest.mark.parametrize(
    "kind,n,mode,cfg_split,batch,hw",
    [
        ("sdxl", 2, "corrected_async_gn", False, 1, (16, 16)),
        ("sdxl", 4, "stale_gn", True, 2, (16, 24)),
        ("sdxl", 8, "sync_gn", False, 1, (32, 16)),
        ("sd15", 4, "corrected_async_gn", False, 2, (32, 24)),
        ("sd15", 2, "separate_gn", True, 1, (16, 16)),
        ("sdxl", 4, "no_sync", False, 1, (16, 16)),
    ],
    ids=str,
)
def test_fused_equals_per_layer(kind, n, mode, cfg_split, batch, hw):
    pc = ParallelConfig(patches=n, mode=mode, cfg_split=cfg_split)
    (eps_a, state_a), (eps_b, state_b) = displaced_pair(kind, pc, batch, hw)
    np.testing.assert_array_equal(np.asarray(eps_a), np.asarray(eps_b))
    assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fused_state_is_refreshed():
    """The comparison above can fail: the state after the step is this step's, not the input's."""
    pc = ParallelConfig(patches=4)
    model, params = tiny_unet("sdxl")
    x, _, cond, _ = example_inputs("sdxl", 1, (16, 16), guided=True)
    mesh = make_mesh(pc)
    _, old = make_step(model, pc, mesh, False)(params, {}, -x, T, cond, G)
    fused = ParallelConfig(patches=4, fused_exchange=True)
    _, new = make_step(model, fused, mesh, True)(params, old, x, T, cond, G)
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(old["stale"]), jax.tree.leaves(new["stale"]))
    ]
    assert sum(moved) > 0.9 * len(moved)


@pytest.mark.parametrize("cfg_split", [False, True])
def test_fused_collectives_are_few_and_reach_only_state(cfg_split):
    model, params = tiny_unet("sdxl")
    x, _, cond, _ = example_inputs("sdxl", 1, (16, 16), guided=True)
    pc = ParallelConfig(patches=4, cfg_split=cfg_split, fused_exchange=True)
    mesh = make_mesh(pc)
    _, state = make_step(model, pc, mesh, False)(params, {}, x, T, cond, G)
    step = make_step(model, pc, mesh, True)
    into_eps, found = eps_collectives(step, params, state, x, T, cond, G)
    allowed = ["ppermute", "ppermute"] + (["all_gather"] if cfg_split else [])
    assert into_eps == sorted(allowed), into_eps
    # conv_in's halo (2), one ppermute per direction and one all_gather (one dtype), CFG meeting.
    assert len(found) == 5 + cfg_split, sorted(found.values())
    # Same elements received as one collective per layer.
    per_layer = ParallelConfig(patches=4, cfg_split=cfg_split)
    sizes = dict(mesh.shape)
    counts = []
    for p in (pc, per_layer):
        jaxpr = jax.make_jaxpr(make_step(model, p, mesh, True))(params, state, x, T, cond, G)
        counts.append(exchanged(jaxpr.jaxpr, sizes))
    total = [sum(v["elements"] for v in c.values()) for c in counts]
    assert total[0] == total[1]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_flush_matches_exchange_on_mixed_dtypes(n):
    """flush == one `exchange` per buffer, for any n, mixed dtypes and an empty halo."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("patch",))
    rng = np.random.default_rng(n)
    outbox = {
        "a": {"above": rng.normal(size=(n, 2, 1, 6, 3)), "below": np.zeros((n, 2, 0, 6, 3))},
        "b": {"k": rng.normal(size=(n, 2, 5, 4)), "v": rng.normal(size=(n, 2, 5, 4))},
        "c": {"moments": rng.normal(size=(n, 2, 2, 3))},
    }
    outbox = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), outbox)
    outbox["b"] = jax.tree.map(lambda a: a.astype(jnp.bfloat16), outbox["b"])

    def run(fn):
        spec = jax.sharding.PartitionSpec("patch")
        body = lambda box: jax.tree.map(lambda a: a[None], fn(jax.tree.map(lambda a: a[0], box)))  # noqa: E731
        return jax.jit(
            jax.shard_map(body, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)
        )(outbox)

    fused = run(lambda box: flush(box, "patch", n))
    each = run(
        lambda box: {
            m: {k: exchange(k, a, "patch", n) for k, a in d.items()} for m, d in box.items()
        }
    )
    assert jax.tree.structure(fused) == jax.tree.structure(each)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(each)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert fused["b"]["k"].shape == (n, 2, 5 * n, 4)
    assert fused["c"]["moments"].shape == (n, n, 2, 2, 3)
