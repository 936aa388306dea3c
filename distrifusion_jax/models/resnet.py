"""ResnetBlock2D, Downsample2D, Upsample2D (diffusers `resnet.py`, `downsampling.py`,
`upsampling.py`).

NHWC. Every conv is a `PatchConv` and every GroupNorm a `PatchGroupNorm`, so on a row band
(`patch` set) halos and statistics come from the other bands; `patch=None` is the plain model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.models.layers import Dense
from distrifusion_jax.parallel import PatchContext, PatchConv, PatchGroupNorm

Dtype = Any


class ResnetBlock2D(nn.Module):
    """`[B, H, W, C_in]`, temb `[B, T]` -> `[B, H, W, out_channels]` ("default" time shift)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        kw = dict(patch=self.patch, dtype=self.dtype, param_dtype=self.param_dtype)
        # Inside the block everything is fp32 but the convs' inputs (cast to dtype by the conv),
        # so in bf16 it rounds 3 times (conv1 and conv2 inputs, the output), torch's about 8.
        f32 = dict(kw, out_dtype=jnp.float32)
        norm_kw = dict(kw, dtype=jnp.float32)
        c = self.out_channels
        h = PatchGroupNorm(self.groups, self.eps, name="norm1", **norm_kw)(x)
        h = nn.silu(h)
        h = PatchConv(c, 3, 1, 1, name="conv1", **f32)(h)
        t = Dense(
            c,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            out_dtype=jnp.float32,
            name="time_emb_proj",
        )(nn.silu(temb))  # [B, C]
        h = h + t[:, None, None, :]
        h = PatchGroupNorm(self.groups, self.eps, name="norm2", **norm_kw)(h)
        h = nn.silu(h)
        h = PatchConv(c, 3, 1, 1, name="conv2", **f32)(h)
        if x.shape[-1] != c:
            x = PatchConv(c, 1, 1, 0, name="conv_shortcut", **f32)(x)
        return ((x + h) / self.output_scale_factor).astype(self.dtype)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (padding 1): `[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_channels]`."""

    out_channels: int
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return PatchConv(
            self.out_channels,
            3,
            2,
            1,
            patch=self.patch,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output row for torch's `interpolate(mode="nearest", size=...)`."""
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)  # torch computes it in float32
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour upsampling `[B, H, W, C] -> [B, 2H, 2W, C]`, or to `size=(H', W')`."""
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    x = jnp.take(x, _nearest_index(h, size[0]), axis=1)
    return jnp.take(x, _nearest_index(w, size[1]), axis=2)


class Upsample2D(nn.Module):
    """Nearest 2x (or to `output_size`), then 3x3 conv: `[B, H, W, C] -> [B, 2H, 2W, C_out]`."""

    out_channels: int
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, output_size)
        return PatchConv(
            self.out_channels,
            3,
            1,
            1,
            patch=self.patch,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
