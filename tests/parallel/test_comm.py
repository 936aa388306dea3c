"""The exchange counter agrees with the analytic per-layer model on the toy model."""

import jax
import jax.numpy as jnp

from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.comm import exchanged
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.step import make_step
from tests.parallel.test_layers import toy  # noqa: F401


def test_counts_match_analytic_model(toy):  # noqa: F811
    model, params, x, cond = toy
    n = 4
    pc = ParallelConfig(patches=n)
    mesh = make_mesh(pc)
    t = jnp.float32(1.0)
    _, state = make_step(model, pc, mesh, False)(params, {}, x, t, cond, 2.0)
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
