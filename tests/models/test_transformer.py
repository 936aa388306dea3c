"""Transformer2DModel / BasicTransformerBlock vs diffusers (fp32), and the attn1 K,V exchange."""

import jax
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.transformers.transformer_2d import (
    Transformer2DModel as TorchTransformer2DModel,
)
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distrifusion_jax.io.keys import flatten
from distrifusion_jax.models.transformer import BasicTransformerBlock, Transformer2DModel
from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.state import OUTBOX
from tests.tiny import assert_close, errors, flax_params, nchw_to_nhwc, randn, randomize_

# Tolerance: fp32, 'highest' matmul precision; softmax/LayerNorm/GroupNorm summation order differ.
MAX_ABS, REL = 1e-5, 1e-6
CROSS_DIM = 24


def _torch_transformer(linear: bool) -> torch.nn.Module:
    tm = TorchTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=32,
        num_layers=2,
        cross_attention_dim=CROSS_DIM,
        norm_num_groups=8,
        use_linear_projection=linear,
    )
    return randomize_(tm, seed=6)


@torch.no_grad()
def test_basic_transformer_block():
    tm = randomize_(TorchBasicTransformerBlock(32, 2, 16, cross_attention_dim=CROSS_DIM), seed=7)
    m = BasicTransformerBlock(32, 2, 16)
    x, ctx = randn(0, 2, 48, 32), randn(1, 2, 7, CROSS_DIM)
    params = flax_params(tm, m, x, ctx)
    assert "kv_exchange" not in params["attn1"]  # no parameters, state only
    ours = m.apply({"params": params}, x, ctx)
    ref = tm(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx))
    assert_close(ours, ref, MAX_ABS, REL, "BasicTransformerBlock")


@pytest.mark.parametrize("linear", [True, False], ids=["linear_proj", "conv_proj"])
@torch.no_grad()
def test_transformer_2d(linear):
    tm = _torch_transformer(linear)
    m = Transformer2DModel(2, 16, num_layers=2, norm_num_groups=8, use_linear_projection=linear)
    x, ctx = randn(0, 2, 32, 8, 6), randn(1, 2, 7, CROSS_DIM)
    params = flax_params(tm, m, nchw_to_nhwc(x), ctx)
    assert params["proj_in"]["kernel"].ndim == (2 if linear else 4)
    ours = m.apply({"params": params}, nchw_to_nhwc(x), ctx)
    ref = tm(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).sample
    assert_close(ours, nchw_to_nhwc(ref), MAX_ABS, REL, f"Transformer2DModel linear={linear}")


@torch.no_grad()
def test_transformer_2d_row_bands_full_sync():
    """On n=4 row bands (full_sync), attn1 gathers K,V through `kv_exchange`: equals 1 device."""
    n = 4
    tm = _torch_transformer(True)
    x, ctx = nchw_to_nhwc(randn(0, 2, 32, 8, 6)), randn(1, 2, 7, CROSS_DIM)
    plain = Transformer2DModel(2, 16, num_layers=2, norm_num_groups=8, use_linear_projection=True)
    params = flax_params(tm, plain, x, ctx)
    ref = plain.apply({"params": params}, x, ctx)
    patch = ParallelConfig(patches=n, mode="full_sync").context(displaced=False)
    banded = plain.clone(patch=patch)

    def body(xb):
        y, state = banded.apply({"params": params}, xb, ctx, mutable=[OUTBOX])
        return y, jax.tree.map(lambda a: a[None], state)

    mesh = Mesh(np.array(jax.devices()[:n]), ("patch",))
    f = jax.shard_map(
        body, mesh=mesh, in_specs=P(None, "patch"), out_specs=(P(None, "patch"), P("patch"))
    )
    out, state = jax.jit(f)(x)
    keys = {"/".join(k) for k in flatten(state[OUTBOX])}
    for i in range(2):
        for kv in "kv":
            assert f"transformer_blocks_{i}/attn1/kv_exchange/{kv}" in keys
    assert not any("attn2" in k for k in keys)
    # state: [n, B, L/n, C], each band's local K,V (what it sends to the next step)
    k_state = state[OUTBOX]["transformer_blocks_0"]["attn1"]["kv_exchange"]["k"]
    assert k_state.shape == (n, 2, 48 // n, 32)
    mx, rel = errors(out, ref)
    assert mx <= 1e-5 and rel <= 1e-6, (mx, rel)
