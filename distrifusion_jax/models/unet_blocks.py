"""UNet down, mid and up blocks (diffusers `unets/unet_2d_blocks.py`), NHWC.

Down blocks return `(x, skips)` with one skip per resnet (plus the downsampled output); up
blocks consume skips from the end of the tuple, as diffusers does. Each block sows its output
as "intermediates" `output` (apply with `mutable=["intermediates"]` to read them).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from distrifusion_jax.models.transformer import Transformer2DModel
from distrifusion_jax.parallel import PatchContext

Dtype = Any


def _per_layer(v: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class _Block(nn.Module):
    """Fields shared by all blocks."""

    out_channels: int
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def _kw(self) -> dict[str, Any]:
        return dict(patch=self.patch, dtype=self.dtype, param_dtype=self.param_dtype)

    def _resnet(self, i: int, out: int | None = None, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(
            out or self.out_channels,
            self.resnet_groups,
            self.resnet_eps,
            scale,
            name=f"resnets_{i}",
            **self._kw,
        )


class _AttnBlock(_Block):
    """Blocks with a Transformer2DModel after each resnet."""

    num_attention_heads: int = 1
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False

    def _attention(self, i: int, channels: int, depth: int) -> Transformer2DModel:
        heads = self.num_attention_heads
        return Transformer2DModel(
            heads,
            channels // heads,
            depth,
            self.resnet_groups,
            self.use_linear_projection,
            name=f"attentions_{i}",
            **self._kw,
        )


class DownBlock2D(_Block):
    """Resnets then an optional stride-2 conv: `[B, H, W, C] -> ([B, H/2, W/2, C'], skips)`."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = ()
        for i in range(self.num_layers):
            x = self._resnet(i)(x, temb)
            skips += (x,)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, name="downsamplers_0", **self._kw)(x)
            skips += (x,)
        self.sow("intermediates", "output", x)
        return x, skips


class CrossAttnDownBlock2D(_AttnBlock):
    """(Resnet, Transformer2DModel) pairs then an optional stride-2 conv."""

    add_downsample: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        depths = _per_layer(self.transformer_layers_per_block, self.num_layers)
        skips = ()
        for i in range(self.num_layers):
            x = self._resnet(i)(x, temb)
            x = self._attention(i, self.out_channels, depths[i])(x, encoder_hidden_states)
            skips += (x,)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, name="downsamplers_0", **self._kw)(x)
            skips += (x,)
        self.sow("intermediates", "output", x)
        return x, skips


class UNetMidBlock2DCrossAttn(_AttnBlock):
    """Resnet, then (Transformer2DModel, resnet) x num_layers: `[B, H, W, C] -> [B, H, W, C]`.

    `out_channels` must equal the input channels (diffusers' default).
    """

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array
    ) -> jax.Array:
        depths = _per_layer(self.transformer_layers_per_block, self.num_layers)
        c = self.out_channels
        x = self._resnet(0, c, self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            x = self._attention(i, c, depths[i])(x, encoder_hidden_states)
            x = self._resnet(i + 1, c, self.output_scale_factor)(x, temb)
        self.sow("intermediates", "output", x)
        return x


class UpBlock2D(_Block):
    """Resnets on `concat(x, skip)` then an optional nearest-2x + conv.

    `[B, H, W, C]` and `num_layers` skips -> `[B, 2H, 2W, out_channels]` (or `upsample_size`).
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        res_hidden_states_tuple: tuple[jax.Array, ...],
        temb: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        skips = tuple(res_hidden_states_tuple)
        for i in range(self.num_layers):
            skip, skips = skips[-1], skips[:-1]
            x = jnp.concatenate([x.astype(self.dtype), skip.astype(self.dtype)], axis=-1)
            x = self._resnet(i)(x, temb)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **self._kw)(x, upsample_size)
        self.sow("intermediates", "output", x)
        return x


class CrossAttnUpBlock2D(_AttnBlock):
    """(Resnet on `concat(x, skip)`, Transformer2DModel) pairs then an optional upsampler."""

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        res_hidden_states_tuple: tuple[jax.Array, ...],
        temb: jax.Array,
        encoder_hidden_states: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        depths = _per_layer(self.transformer_layers_per_block, self.num_layers)
        skips = tuple(res_hidden_states_tuple)
        for i in range(self.num_layers):
            skip, skips = skips[-1], skips[:-1]
            x = jnp.concatenate([x.astype(self.dtype), skip.astype(self.dtype)], axis=-1)
            x = self._resnet(i)(x, temb)
            x = self._attention(i, self.out_channels, depths[i])(x, encoder_hidden_states)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **self._kw)(x, upsample_size)
        self.sow("intermediates", "output", x)
        return x
