"""UNet2DConditionModel (SD 1.x / 2.x / SDXL) in Flax linen, NHWC, named as diffusers.

Parameter paths are diffusers' state-dict keys with list indices joined by `_`
(`down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel`), so
`distrifusion_jax.io.keys.convert_tensors` maps a diffusers checkpoint with no per-model rules.
With `patch` set, the model runs on one row band per device (see `parallel/`). Block outputs
are sown as "intermediates" `down_blocks_0/output`, `mid_block/output`, ... for debugging.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.models.embeddings import (
    TimestepEmbedding,
    get_timestep_embedding,
    text_time_input,
)
from distrifusion_jax.models.unet_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from distrifusion_jax.models.unet_config import UNetConfig
from distrifusion_jax.parallel import PatchContext, PatchConv, PatchGroupNorm

Dtype = Any


class UNet2DConditionModel(nn.Module):
    """Noise prediction `[B, H, W, C_in] -> [B, H, W, C_out]` (H: the local row band with `patch`).

    Attributes:
      config: the diffusers config (`UNetConfig.from_diffusers`, or a preset such as `sdxl_base()`).
      patch: row-band context (None: the plain single-device model).
      dtype: activations (timestep embeddings, GroupNorm statistics and softmax stay fp32).
      param_dtype: parameters.
    """

    config: UNetConfig
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: dict[str, jax.Array] | None = None,
        down_block_additional_residuals: tuple[jax.Array, ...] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
    ) -> jax.Array:
        """Args:
          sample: `[B, H, W, in_channels]` noisy latents (NHWC).
          timesteps: scalar or `[B]`.
          encoder_hidden_states: `[B, S, cross_attention_dim]` text embeddings.
          added_cond_kwargs: SDXL only: `text_embeds` `[B, P]` (pooled) and `time_ids` `[B, 6]`.
          down_block_additional_residuals: ControlNet residuals, one per skip (`conv_in`'s
            output, then each down block's), each `[B, H_l, W_l, C_l]` like its skip.
          mid_block_additional_residual: ControlNet residual added to the mid block's output.

        Returns:
          `[B, H, W, out_channels]` in `dtype`.
        """
        cfg = self.config
        kw = dict(patch=self.patch, dtype=self.dtype, param_dtype=self.param_dtype)
        groups, eps = cfg.norm_num_groups, cfg.norm_eps

        # Time (and SDXL text-time) embedding, fp32: [B, time_embed_dim].
        emb = time_text_embedding(
            cfg, sample.shape[0], timesteps, added_cond_kwargs, self.param_dtype
        )

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        # conv_in reads the latent, which must be exact: its halo is always exchanged now.
        x = PatchConv(cfg.block_out_channels[0], 3, 1, 1, exact=True, name="conv_in", **kw)(sample)
        ctx = encoder_hidden_states.astype(self.dtype)

        x, skips = down_path(cfg, x, emb, ctx, kw)
        if down_block_additional_residuals is not None:
            res = tuple(down_block_additional_residuals)
            if len(res) != len(skips):
                raise ValueError(
                    f"{len(res)} down_block_additional_residuals for {len(skips)} UNet skips."
                )
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, res))
        if cfg.mid_block_type is not None:
            x = mid_block(cfg, x, emb, ctx, kw)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)

        heads = cfg.heads_per_level
        depth = cfg.transformer_depth_per_level
        layers = cfg.layers_per_level
        block_kw = dict(resnet_eps=eps, resnet_groups=groups, **kw)
        attn_kw = dict(use_linear_projection=cfg.use_linear_projection, **block_kw)

        rev = lambda v: tuple(reversed(v))
        for i, kind in enumerate(cfg.up_block_types):
            c = rev(cfg.block_out_channels)[i]
            n = rev(layers)[i] + 1
            res, skips = skips[-n:], skips[:-n]
            last = i == cfg.num_levels - 1
            # Upsample to the next skip's size: 2x, except where diffusers forwards an odd size.
            size = None if last else tuple(skips[-1].shape[1:3])
            name = f"up_blocks_{i}"
            if kind == "CrossAttnUpBlock2D":
                x = CrossAttnUpBlock2D(
                    c,
                    n,
                    num_attention_heads=rev(heads)[i],
                    transformer_layers_per_block=rev(depth)[i],
                    add_upsample=not last,
                    name=name,
                    **attn_kw,
                )(x, res, emb, ctx, size)
            else:
                x = UpBlock2D(c, n, add_upsample=not last, name=name, **block_kw)(x, res, emb, size)

        # GroupNorm -> SiLU in fp32; conv_out casts to dtype (one rounding).
        x = PatchGroupNorm(groups, eps, name="conv_norm_out", **dict(kw, dtype=jnp.float32))(x)
        x = nn.silu(x)
        return PatchConv(cfg.out_channels, 3, 1, 1, name="conv_out", **kw)(x)


# ---- pieces shared with ControlNetModel (called inside a compact method: the submodules they
# build belong to the caller, under the same names) ----------------------------------------


def time_text_embedding(
    cfg: UNetConfig,
    batch: int,
    timesteps: jax.Array | float,
    added_cond_kwargs: dict[str, jax.Array] | None,
    param_dtype: Dtype = jnp.float32,
) -> jax.Array:
    """`time_embedding(time_proj(t)) [+ add_embedding(text_time)]`: `[B, T]` fp32."""
    t = jnp.atleast_1d(jnp.asarray(timesteps, jnp.float32))
    t = jnp.broadcast_to(t, (batch,))  # [B]
    t_emb = get_timestep_embedding(
        t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
    )  # [B, C0]
    fp32 = dict(dtype=jnp.float32, param_dtype=param_dtype)
    emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **fp32)(t_emb)
    if cfg.addition_embed_type == "text_time":
        cond = added_cond_kwargs or {}
        missing = [k for k in ("text_embeds", "time_ids") if k not in cond]
        if missing:
            raise ValueError(
                f"addition_embed_type 'text_time' needs added_cond_kwargs {missing} "
                f"(pooled text_embeds [B, P] and time_ids [B, 6])."
            )
        add = text_time_input(
            cond["text_embeds"],
            cond["time_ids"],
            cfg.addition_time_embed_dim,
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )  # [B, projection_class_embeddings_input_dim]
        emb = emb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **fp32)(add)
    return emb


def down_path(
    cfg: UNetConfig, x: jax.Array, emb: jax.Array, ctx: jax.Array, kw: dict[str, Any]
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`down_blocks_*` on `conv_in`'s output `[B, H, W, C0]` -> (last output, skips): the skips
    are `conv_in`'s output then every resnet/attention and downsampler output, as diffusers'."""
    heads = cfg.heads_per_level
    depth = cfg.transformer_depth_per_level
    layers = cfg.layers_per_level
    block_kw = dict(resnet_eps=cfg.norm_eps, resnet_groups=cfg.norm_num_groups, **kw)
    attn_kw = dict(use_linear_projection=cfg.use_linear_projection, **block_kw)
    skips: tuple[jax.Array, ...] = (x,)
    for i, kind in enumerate(cfg.down_block_types):
        c = cfg.block_out_channels[i]
        last = i == cfg.num_levels - 1
        name = f"down_blocks_{i}"
        if kind == "CrossAttnDownBlock2D":
            x, res = CrossAttnDownBlock2D(
                c,
                layers[i],
                num_attention_heads=heads[i],
                transformer_layers_per_block=depth[i],
                add_downsample=not last,
                name=name,
                **attn_kw,
            )(x, emb, ctx)
        else:
            x, res = DownBlock2D(c, layers[i], add_downsample=not last, name=name, **block_kw)(
                x, emb
            )
        skips += res
    return x, skips


def mid_block(
    cfg: UNetConfig,
    x: jax.Array,
    emb: jax.Array,
    ctx: jax.Array,
    kw: dict[str, Any],
    num_layers: int = 1,
) -> jax.Array:
    """`mid_block`: `[B, h, w, C_last] -> [B, h, w, C_last]` (`num_layers=0`: diffusers'
    `UNetMidBlock2D` without attention, one resnet)."""
    return UNetMidBlock2DCrossAttn(
        cfg.block_out_channels[-1],
        num_layers,
        num_attention_heads=cfg.heads_per_level[-1],
        transformer_layers_per_block=cfg.transformer_depth_per_level[-1],
        output_scale_factor=cfg.mid_block_scale_factor,
        resnet_eps=cfg.norm_eps,
        resnet_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        name="mid_block",
        **kw,
    )(x, emb, ctx)
