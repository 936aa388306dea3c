"""The exchange counter agrees with the analytic per-layer model on the toy model."""

import functools

import jax
import jax.numpy as jnp

from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.comm import exchanged
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.step import make_step
from tests.parallel.helpers import sync_state


def test_counts_match_analytic_model(toy):
    model, params, x, cond = toy
    n = 4
    pc = ParallelConfig(patches=n)
    mesh = make_mesh(pc)
    t = jnp.float32(1.0)
    state = sync_state(model, pc, mesh, params, x, t, cond, 2.0, abstract=True)
    jaxpr = jax.make_jaxpr(make_step(model, pc, mesh, True))(params, state, x, t, cond, 2.0)
    got = exchanged(jaxpr.jaxpr, dict(mesh.shape))
    b, h, w = 4, x.shape[1], x.shape[2]  # CFG pair on one device: local batch 2B
    # conv_in (4 ch) + conv1, up, conv_out (16 ch) both halo rows; down (stride 2) only above;
    # conv2 at half width both rows.
    halos = 2 * b * w * 4 + 3 * 2 * b * w * 16 + b * w * 16 + 2 * b * (w // 2) * 16
    kv = (n - 1) * b * (h // n) * w * 16 * 2
    gn = 3 * (n - 1) * 2 * b * 4
    assert got["ppermute@patch"]["elements"] == halos
    assert got["all_gather@patch"]["elements"] == kv + gn
    assert got["all_gather@patch"]["bytes"] == 4 * (kv + gn)


def test_three_counts_agree(toy):
    """jaxpr count == compiled-HLO collectives == layer-shape formulas, per mode, n = 2 and 4."""
    from distrifusion_jax.parallel.cost import step_cost

    model, params, x, cond = toy
    p_s, x_s, c_s = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x, cond)
    )
    b, h, w = 4, x.shape[1], x.shape[2]
    for n, mode in [(4, "corrected_async_gn"), (2, "full_sync"), (4, "separate_gn")]:
        c = step_cost(model, p_s, ParallelConfig(patches=n, mode=mode), x_s, c_s, compile=True)
        formula = c.analytic_elements
        assert formula["conv halo rows"] == 2 * b * w * 4 + 3 * 2 * b * w * 16 + b * w * 16 + (
            2 * b * (w // 2) * 16
        )
        assert formula["self-attention K,V"] == (n - 1) * b * (h // n) * w * 16 * 2
        assert formula.get("groupnorm moments", 0) == (
            0 if mode == "separate_gn" else 3 * (n - 1) * 2 * b * 4
        )
        assert c.exchanged_elements == sum(formula.values())
        assert c.compiled["elements"] == c.exchanged_elements
        assert c.compiled["bytes"] == c.exchanged_bytes
        assert c.compiled["peak_bytes"] > 0


def test_compiled_exchange_parses_hlo():
    from distrifusion_jax.parallel.cost import compiled_exchange

    lines = [
        (
            "  %ag = f32[2,8,16]{2,1,0} all-gather(f32[2,2,16]{2,1,0} %x), channel_id=1, "
            "replica_groups={{0,1,2,3}}, dimensions={1}"
        ),
        (
            "  %cp = bf16[2,1,16]{2,1,0} collective-permute(bf16[2,1,16]{2,1,0} %y), "
            "source_target_pairs={{0,1},{1,2}}"
        ),
        "  %ar = f32[10]{0} all-reduce(f32[10]{0} %z), replica_groups=[4,2]<=[8], to_apply=%add",
        "  %add = f32[10]{0} add(f32[10]{0} %a, f32[10]{0} %b)",
    ]
    hlo = "\n".join(lines)
    got = compiled_exchange(hlo)
    assert got["by_op"]["all-gather"]["elements"] == 3 / 4 * 256
    assert got["by_op"]["collective-permute"]["bytes"] == 2 * 32
    assert got["by_op"]["all-reduce"]["elements"] == 2 * 1 / 2 * 10
    assert got["calls"] == 3


def test_repeated_collective_counts_once():
    """Two equal exchanges of the same rows (as the UNet's and a ControlNet's `conv_in` send the
    latent's halo) count once, as XLA merges them; different rows count twice."""
    from jax.sharding import PartitionSpec as P

    from distrifusion_jax.parallel.cost import compiled_exchange
    from distrifusion_jax.parallel.mesh import shard

    pc = ParallelConfig(patches=4)
    mesh = make_mesh(pc)
    perm = [(i, (i + 1) % 4) for i in range(4)]

    def body(x, twice_same):
        a = jax.lax.ppermute(x[:, :1], "patch", perm)
        b = jax.lax.ppermute(x[:, :1] if twice_same else x[:, -1:], "patch", perm)
        return x + a.sum() + b.sum()

    x = jax.ShapeDtypeStruct((2, 16, 8, 4), jnp.float32)
    for same, expected in [(True, 2 * 8 * 4), (False, 2 * 2 * 8 * 4)]:
        spec = P(None, "patch")
        fn = jax.jit(
            shard(functools.partial(body, twice_same=same), mesh, in_specs=(spec,), out_specs=spec)
        )
        got = exchanged(jax.make_jaxpr(fn)(x).jaxpr, dict(mesh.shape))
        assert got["ppermute@patch"]["elements"] == expected, same
        assert compiled_exchange(fn.lower(x).compile().as_text())["elements"] == expected, same
