"""Transformer2DModel and its parts (diffusers `transformer_2d.py`, `attention.py`,
`attention_processor.py`), continuous input, `layer_norm` blocks, GEGLU feed-forward.

Tokens are the NHWC pixels in row-major order, `[B, H*W, C]`, so a row band of the image is a
contiguous token range. Self-attention (`attn1`) hands its local K,V to `KVExchange`, which
returns the whole image's K,V on a band; cross-attention (`attn2`) reads the text only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.models.attention_ops import attention
from distrifusion_jax.models.layers import Dense
from distrifusion_jax.parallel import KVExchange, PatchContext, PatchConv, PatchGroupNorm
from distrifusion_jax.parallel.state import TEXT_KV  # cross-attention K,V of the text, cached

Dtype = Any


class Attention(nn.Module):
    """Multi-head attention `[B, L, C] -> [B, L, out_dim]`; self-attention when `context` is None.

    `to_q`/`to_k`/`to_v` have no bias, `to_out_0` has one; scale `1/sqrt(dim_head)`. The result
    is in `out_dtype` (default `dtype`).
    """

    heads: int
    dim_head: int
    out_dim: int
    self_attention: bool = True
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.dim_head

        def dense(features: int, name: str, bias: bool, out_dtype: Dtype = None) -> Dense:
            return Dense(
                features,
                use_bias=bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                out_dtype=out_dtype,
                name=name,
            )

        if self.self_attention and context is not None:
            raise ValueError("self-attention (attn1) takes no context.")
        src = x if context is None else context
        q = dense(inner, "to_q", False)(x)  # [B, L, inner]
        if not self.self_attention and self.has_variable(TEXT_KV, "k"):
            # Text K,V are the same for every step of a generation: computed once, then read.
            k, v = self.get_variable(TEXT_KV, "k"), self.get_variable(TEXT_KV, "v")
        else:
            k = dense(inner, "to_k", False)(src)  # [B, S, inner]
            v = dense(inner, "to_v", False)(src)
            if not self.self_attention and self.is_mutable_collection(TEXT_KV):
                self.put_variable(TEXT_KV, "k", k)
                self.put_variable(TEXT_KV, "v", v)
        mask = None
        if self.self_attention:
            # On a row band: K,V of every band (fresh, or stale with our slice fresh), or a
            # PCPP window of the neighbours' nearest rows (masked where there is none).
            k, v, mask = KVExchange(patch=self.patch, name="kv_exchange")(k, v)  # [B, S, inner]
        b = q.shape[0]
        q = q.reshape(b, -1, self.heads, self.dim_head)  # [B, L, heads, dh]
        k = k.reshape(b, -1, self.heads, self.dim_head)
        v = v.reshape(b, -1, self.heads, self.dim_head)
        o = attention(q, k, v, mask)  # [B, L, heads, dh]; fp32 logits, chunked when large
        o = o.reshape(b, -1, inner)
        return dense(self.out_dim, "to_out_0", True, self.out_dtype)(o)


class GEGLU(nn.Module):
    """`proj` to `2 * inner`, then `hidden * gelu(gate)` (erf GELU): `[.., C] -> [.., inner]`."""

    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(
            2 * self.inner_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            out_dtype=jnp.float32,  # the gate and product in fp32: one rounding, at the end
            name="proj",
        )(x)
        hidden, gate = jnp.split(x, 2, axis=-1)
        return (hidden * jax.nn.gelu(gate, approximate=False)).astype(self.dtype)


class FeedForward(nn.Module):
    """`net_0` (GEGLU, inner = 4 * dim) -> `net_2` (Linear): `[B, L, dim] -> [B, L, dim]`,
    in `out_dtype` (default `dtype`)."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
        return Dense(self.dim, name="net_2", out_dtype=self.out_dtype, **kw)(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention, feed-forward: `[B, L, dim] -> [B, L, dim]`.

    The residual stream keeps the input's dtype: each branch ends in fp32 and is added to it
    before one rounding (torch bf16 rounds the branch and then the sum). `Transformer2DModel`
    passes an fp32 stream, so in bf16 the stream is rounded only once, after `proj_out`.
    """

    dim: int
    heads: int
    dim_head: int
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name: str) -> nn.LayerNorm:
            # torch LayerNorm: eps 1e-5 and the two-pass variance.
            return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kw)

        def attn(name: str, self_attention: bool) -> Attention:
            return Attention(
                self.heads,
                self.dim_head,
                self.dim,
                self_attention,
                self.patch,
                out_dtype=jnp.float32,
                name=name,
                **kw,
            )

        stream = x.dtype
        x = (attn("attn1", True)(norm("norm1")(x)) + x).astype(stream)
        x = (attn("attn2", False)(norm("norm2")(x), context) + x).astype(stream)
        ff = FeedForward(self.dim, out_dtype=jnp.float32, name="ff", **kw)
        return (ff(norm("norm3")(x)) + x).astype(stream)


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks -> proj_out, plus residual.

    `[B, H, W, C]`, context `[B, S, D]` -> `[B, H, W, C]`. `use_linear_projection` picks
    Linear proj_in/out on tokens (SD 2.x, SDXL) or 1x1 convs on pixels (SD 1.x). Between
    proj_in and proj_out the token stream is fp32 whatever `dtype` (a few MB at SDXL sizes):
    in bf16 it is rounded once, not after each of the blocks' 3 residual adds.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = PatchGroupNorm(self.norm_num_groups, 1e-6, patch=self.patch, name="norm", **kw)(x)
        if self.use_linear_projection:
            proj_in = Dense(inner, out_dtype=jnp.float32, name="proj_in", **kw)
            x = proj_in(x.reshape(b, h * w, c))  # [B, L, inner] fp32
        else:
            x = PatchConv(inner, 1, 1, 0, patch=self.patch, name="proj_in", **kw)(x)
            x = x.reshape(b, h * w, inner).astype(jnp.float32)  # [B, L, inner]
        context = context.astype(self.dtype)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                self.patch,
                name=f"transformer_blocks_{i}",
                **kw,
            )(x, context)
        if self.use_linear_projection:
            proj_out = Dense(c, out_dtype=jnp.float32, name="proj_out", **kw)
            x = proj_out(x).reshape(b, h, w, c)  # fp32
        else:
            x = x.reshape(b, h, w, inner)
            x = PatchConv(c, 1, 1, 0, patch=self.patch, name="proj_out", **kw)(x)
        return (x + residual).astype(self.dtype)
