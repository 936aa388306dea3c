"""AutoencoderKL (diffusers) in Flax, NHWC: `encode` images to the latent Gaussian, `decode`.

Parameter paths mirror the diffusers state dict (`encoder/down_blocks_0/resnets_0/conv1/kernel`,
`decoder/mid_block/attentions_0/to_q/kernel`, `quant_conv`, `post_quant_conv`), so
`distrifusion_jax.io.keys.convert_tensors` needs no VAE rules. Every conv is a `PatchConv` and every
GroupNorm a `PatchGroupNorm`, and the mid-block attention gets its K,V through `KVExchange`, so
a VAE built with `patch=PatchContext(...)` runs on row bands; `patch=None` is the plain model.
No tiling or slicing. `scaling_factor`/`shift_factor`/`force_upcast` are for the pipeline:
`latents = (mean - shift) * scaling_factor`, `decode(latents / scaling_factor + shift)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.models.attention_ops import attention
from distrifusion_jax.parallel import KVExchange, PatchContext, PatchConv, PatchGroupNorm

Dtype = Any

_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu}
_DOWN_BLOCKS = ("DownEncoderBlock2D",)
_UP_BLOCKS = ("UpDecoderBlock2D",)
_EPS = 1e-6  # diffusers' Encoder/Decoder fix resnet, attention and conv_norm_out eps to 1e-6


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers `AutoencoderKL` config.json fields (all of them; no tiling)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("sample_size", "latents_mean", "latents_std"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for key, kinds, allowed in (
            ("down_block_types", self.down_block_types, _DOWN_BLOCKS),
            ("up_block_types", self.up_block_types, _UP_BLOCKS),
            ("act_fn", (self.act_fn,), tuple(_ACTIVATIONS)),
        ):
            for kind in kinds:
                if kind not in allowed:
                    raise ValueError(
                        f"AutoencoderKL config {key}: {kind!r} is not supported; "
                        f"supported: {list(allowed)}."
                    )
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"AutoencoderKL config: {len(self.down_block_types)} down_block_types and "
                f"{len(self.up_block_types)} up_block_types must both equal the {n} "
                "block_out_channels."
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"AutoencoderKL config block_out_channels {c} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}."
                )

    @classmethod
    def from_diffusers(cls, d: dict) -> AutoencoderKLConfig:
        """From a diffusers vae/config.json dict; `_`-prefixed metadata keys are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in d.items():
            if key in fields:
                kw[key] = value
            elif not key.startswith("_"):
                raise ValueError(
                    f"AutoencoderKL config key {key!r} (value {value!r}) is not supported; "
                    f"supported keys: {sorted(fields)}."
                )
        return cls(**kw)

    def to_dict(self) -> dict:
        """A diffusers-style config dict; `from_diffusers(to_dict())` round-trips."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel (8 for SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)


def sdxl_vae_config() -> AutoencoderKLConfig:
    """The SDXL VAE (stabilityai/stable-diffusion-xl-base-1.0 vae/config.json)."""
    return AutoencoderKLConfig(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def tiny_config(**kw) -> AutoencoderKLConfig:
    """For tests only: two levels (32, 64), 8 groups, 4 latent channels."""
    base = dict(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    return AutoencoderKLConfig(**{**base, **kw})


class _Base(nn.Module):
    """Shared fields: the config, the patch context (None: plain model) and dtypes."""

    config: AutoencoderKLConfig
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def _kw(self) -> dict:
        return dict(patch=self.patch, dtype=self.dtype, param_dtype=self.param_dtype)

    def conv(self, features: int, name: str | None, kernel_size: int = 3, **kw) -> PatchConv:
        """A PatchConv; padding defaults to `kernel_size // 2` (same size at stride 1)."""
        kw.setdefault("padding", kernel_size // 2)
        return PatchConv(features, kernel_size, name=name, **self._kw, **kw)

    def norm(self, name: str) -> PatchGroupNorm:
        return PatchGroupNorm(self.config.norm_num_groups, _EPS, name=name, **self._kw)

    def sub(self, cls: type[nn.Module], name: str | None, **kw) -> nn.Module:
        """A child VAE module sharing this one's config, patch context and dtypes."""
        return cls(self.config, name=name, **self._kw, **kw)

    def act(self, x: jax.Array) -> jax.Array:
        return _ACTIVATIONS[self.config.act_fn](x)


class ResnetBlock2D(_Base):
    """diffusers ResnetBlock2D without time embedding: `[B, H, W, C_in] -> [B, H, W, C_out]`."""

    out_channels: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.out_channels
        h = self.conv(c, "conv1")(self.act(self.norm("norm1")(x)))
        h = self.conv(c, "conv2")(self.act(self.norm("norm2")(h)))
        if x.shape[-1] != c:
            x = self.conv(c, "conv_shortcut", kernel_size=1)(x)
        return x + h


class Attention(_Base):
    """Single-head spatial self-attention with GroupNorm and residual: `[B, H, W, C]` -> same."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        dense = lambda name: nn.Dense(
            c, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        t = self.norm("group_norm")(x).reshape(b, h * w, c)  # [B, L, C] (a band's L on a patch)
        q, k, v = dense("to_q")(t), dense("to_k")(t), dense("to_v")(t)
        k, v, mask = KVExchange(self.patch, name="kv_exchange")(k, v)  # full-image K,V
        # [B, L, 1, C]: one head of size C (diffusers: attention_head_dim = channels)
        y = attention(q[:, :, None], k[:, :, None], v[:, :, None], mask)  # chunked when large
        y = dense("to_out_0")(y.reshape(b, h * w, c)).reshape(b, h, w, c)
        return y + x


class UNetMidBlock2D(_Base):
    """resnets_0, then (attentions_i, resnets_{i+1}); attention optional: `[B, H, W, C]`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = self.sub(ResnetBlock2D, "resnets_0", out_channels=c)(x)
        if self.config.mid_block_add_attention:
            x = self.sub(Attention, "attentions_0")(x)
        return self.sub(ResnetBlock2D, "resnets_1", out_channels=c)(x)


class Downsample2D(_Base):
    """Pad 1 row below, 1 column right; stride-2 3x3 conv: `[B, H, W, C] -> [B, H/2, W/2, C]`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # The bottom pad row is, on a row band, the halo row from the band below (zeros for the
        # last band), which PatchConv fetches itself when padding=0; only pad it when unbanded.
        plain = self.patch is None or self.patch.n == 1
        x = jnp.pad(x, ((0, 0), (0, 1 if plain else 0), (0, 1), (0, 0)))
        return self.conv(x.shape[-1], "conv", stride=2, padding=0)(x)


class Upsample2D(_Base):
    """Nearest 2x upsampling then a 3x3 conv: `[B, H, W, C]` -> `[B, 2H, 2W, C]`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x.shape[-1], "conv")(x)


class DownEncoderBlock2D(_Base):
    """`layers_per_block` resnets, optional downsampler: `[B, H, W, C_in] -> [B, H', W', C]`."""

    out_channels: int = 0
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.config.layers_per_block):
            x = self.sub(ResnetBlock2D, f"resnets_{j}", out_channels=self.out_channels)(x)
        if self.add_downsample:
            x = self.sub(Downsample2D, "downsamplers_0")(x)
        return x


class Encoder(_Base):
    """Image `[B, H, W, in_channels]` -> moments `[B, H/f, W/f, 2 * latent_channels]`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        chans = cfg.block_out_channels
        x = self.conv(chans[0], "conv_in")(x)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            down = dict(out_channels=c, add_downsample=not last)
            x = self.sub(DownEncoderBlock2D, f"down_blocks_{i}", **down)(x)
        x = self.sub(UNetMidBlock2D, "mid_block")(x)
        x = self.act(self.norm("conv_norm_out")(x))
        return self.conv(2 * cfg.latent_channels, "conv_out")(x)


class UpDecoderBlock2D(_Base):
    """`layers_per_block + 1` resnets, optional upsampler: `[B, H, W, C_in] -> [B, H', W', C]`."""

    out_channels: int = 0
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.config.layers_per_block + 1):
            x = self.sub(ResnetBlock2D, f"resnets_{j}", out_channels=self.out_channels)(x)
        if self.add_upsample:
            x = self.sub(Upsample2D, "upsamplers_0")(x)
        return x


class Decoder(_Base):
    """Latent `[B, h, w, latent_channels]` -> image `[B, h*f, w*f, out_channels]`."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        chans = tuple(reversed(cfg.block_out_channels))
        x = self.conv(chans[0], "conv_in")(z)
        x = self.sub(UNetMidBlock2D, "mid_block")(x)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            up = dict(out_channels=c, add_upsample=not last)
            x = self.sub(UpDecoderBlock2D, f"up_blocks_{i}", **up)(x)
        x = self.act(self.norm("conv_norm_out")(x))
        return self.conv(cfg.out_channels, "conv_out")(x)


class AutoencoderKL(_Base):
    """diffusers AutoencoderKL on NHWC arrays. `__call__` (used by `init`) decodes the mean."""

    def setup(self):
        cfg, lat = self.config, self.config.latent_channels
        self.encoder = self.sub(Encoder, None)
        self.decoder = self.sub(Decoder, None)
        if cfg.use_quant_conv:
            self.quant_conv = self.conv(2 * lat, None, kernel_size=1)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = self.conv(lat, None, kernel_size=1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image `[B, H, W, 3]` in [-1, 1] -> (mean, logvar) `[B, H/f, W/f, 4]` each.

        logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution.
        """
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latent `[B, h, w, 4]` -> image `[B, f*h, f*w, 3]` (about [-1, 1])."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean: `[B, H, W, 3] -> [B, H, W, 3]`."""
        return self.decode(self.encode(x)[0])


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw from the posterior `N(mean, exp(logvar))`: `[B, h, w, C]`."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
