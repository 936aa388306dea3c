"""ControlNetModel (SD 1.x / 2.x / SDXL) in Flax linen, NHWC, named as diffusers.

A copy of the UNet's encoder (conv_in, time/text-time embedding, down blocks, mid block; the
same layer classes, so with `patch` set it runs on a row band with its own stale state) whose
input is the noisy latent plus an embedding of the conditioning image, and whose outputs are
1x1 "zero convs" of every skip and of the mid block: residuals the UNet adds to its own.

Parameter paths are diffusers' state-dict keys with list indices joined by `_`
(`controlnet_cond_embedding/blocks_0/kernel`, `controlnet_down_blocks_3/kernel`), so the generic
converter (`io.keys.convert_tensors`) maps a diffusers ControlNet with no extra rules.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.models.controlnet_config import ControlNetConfig
from distrifusion_jax.models.unet import down_path, mid_block, time_text_embedding
from distrifusion_jax.parallel import PatchContext, PatchConv

Dtype = Any
Residuals = tuple[tuple[jax.Array, ...], jax.Array]  # (down residuals, mid residual)


class ControlNetConditioningEmbedding(nn.Module):
    """Conditioning image `[B, H*f, W*f, C_cond]` -> `[B, H, W, C0]` (f = 2^(len(channels) - 1)).

    `conv_in`, then per level a 3x3 conv and a stride-2 3x3 conv (`blocks_{2i}`, `blocks_{2i+1}`),
    SiLU after each, then `conv_out` (zero-initialised in diffusers).
    """

    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(patch=self.patch, dtype=self.dtype, param_dtype=self.param_dtype)
        chans = self.block_out_channels
        x = nn.silu(PatchConv(chans[0], 3, 1, 1, name="conv_in", **kw)(x))
        for i in range(len(chans) - 1):
            x = nn.silu(PatchConv(chans[i], 3, 1, 1, name=f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(PatchConv(chans[i + 1], 3, 2, 1, name=f"blocks_{2 * i + 1}", **kw)(x))
        return PatchConv(self.out_channels, 3, 1, 1, name="conv_out", **kw)(x)  # [B, H, W, C0]


def guess_mode_scales(num_down: int) -> np.ndarray:
    """diffusers' guess-mode weights `logspace(-1, 0, num_down + 1)`: 0.1 for the first down
    residual up to 1.0 for the mid one, `[num_down + 1]` fp32."""
    return np.logspace(-1, 0, num_down + 1).astype(np.float32)


class ControlNetModel(nn.Module):
    """Residuals for the UNet from a noisy latent band and the matching conditioning image band.

    Attributes:
      config: the diffusers config (`ControlNetConfig.from_diffusers`).
      patch: row-band context (None: the plain single-device model).
      dtype: activations (timestep embeddings, GroupNorm statistics and softmax stay fp32).
      param_dtype: parameters.
    """

    config: ControlNetConfig
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        added_cond_kwargs: dict[str, jax.Array] | None = None,
        conditioning_scale: jax.Array | float = 1.0,
        guess_mode: bool = False,
    ) -> Residuals:
        """Args:
          sample: `[B, H, W, in_channels]` noisy latents (NHWC).
          timesteps: scalar or `[B]`.
          encoder_hidden_states: `[B, S, cross_attention_dim]` text embeddings.
          controlnet_cond: `[B, H*f, W*f, conditioning_channels]` conditioning image in [0, 1]
            (f: `config.conditioning_factor`, the VAE factor for published ControlNets).
          added_cond_kwargs: SDXL only: `text_embeds` `[B, P]` and `time_ids` `[B, 6]`.
          conditioning_scale: scalar or `[B]`, multiplies every residual.
          guess_mode: scale residuals by `guess_mode_scales` (0.1 ... 1.0) too (static).

        Returns:
          (down residuals, one per UNet skip, `[B, H_l, W_l, C_l]`; mid residual
          `[B, H_last, W_last, C_last]`), in `dtype`.
        """
        cn = self.config
        cfg = cn.as_unet()
        kw = dict(patch=self.patch, dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w = sample.shape[:3]
        f = cn.conditioning_factor
        if controlnet_cond.shape[1:3] != (h * f, w * f):
            raise ValueError(
                f"conditioning image rows x cols {tuple(controlnet_cond.shape[1:3])} must be "
                f"{f}x the latent's {(h, w)} (conditioning_embedding_out_channels "
                f"{cn.conditioning_embedding_out_channels} downsample {f}x)."
            )
        if cn.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]

        emb = time_text_embedding(cfg, b, timesteps, added_cond_kwargs, self.param_dtype)
        # conv_in reads the latent, which must be exact: its halo is always exchanged now.
        x = PatchConv(cfg.block_out_channels[0], 3, 1, 1, exact=True, name="conv_in", **kw)(sample)
        x = x + ControlNetConditioningEmbedding(
            cfg.block_out_channels[0],
            cn.conditioning_embedding_out_channels,
            name="controlnet_cond_embedding",
            **kw,
        )(controlnet_cond)
        ctx = encoder_hidden_states.astype(self.dtype)
        x, skips = down_path(cfg, x, emb, ctx, kw)
        x = mid_block(cfg, x, emb, ctx, kw, num_layers=cn.mid_block_layers)

        zero_conv = lambda c, name: PatchConv(c, 1, 1, 0, name=name, **kw)
        down = tuple(
            zero_conv(s.shape[-1], f"controlnet_down_blocks_{i}")(s) for i, s in enumerate(skips)
        )
        mid = zero_conv(x.shape[-1], "controlnet_mid_block")(x)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        scale = jnp.broadcast_to(scale, (b,)).reshape(b, 1, 1, 1)  # [B, 1, 1, 1]
        weights = guess_mode_scales(len(down)) if guess_mode else np.ones(len(down) + 1)
        rescale = lambda r, wt: (r.astype(jnp.float32) * (scale * float(wt))).astype(self.dtype)
        down = tuple(rescale(r, wt) for r, wt in zip(down, weights[:-1]))
        return down, rescale(mid, weights[-1])
