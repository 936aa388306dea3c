"""ControlNetConfig: diffusers' `ControlNetModel` config (`config.json`) as a frozen dataclass.

Fields and defaults mirror the keyword arguments of diffusers' `ControlNetModel.__init__`
(diffusers 0.42.1). The ControlNet's trunk is a UNet encoder (conv_in, time/text-time
embedding, down blocks, mid block), so `as_unet()` gives the `UNetConfig` that builds it and
runs the same support checks; options only a ControlNet has are checked here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from distrifusion_jax.models.unet_config import DiffusersConfig, UNetConfig, _tuplify, sdxl_base

CONTROLNET_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
CHANNEL_ORDERS = ("rgb", "bgr")


def _unsupported(key: str, value: Any, supported: str) -> ValueError:
    return ValueError(
        f"ControlNet config {key}={value!r} is not supported; supported: {supported}."
    )


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(DiffusersConfig):
    """diffusers `ControlNetModel` kwargs (same names, same defaults)."""

    DIFFUSERS_CLASS = "ControlNetModel"
    LABEL = "ControlNet"

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuplify(getattr(self, f.name)))
        if self.mid_block_type not in CONTROLNET_MID_BLOCKS:
            raise _unsupported(
                "mid_block_type", self.mid_block_type, str(list(CONTROLNET_MID_BLOCKS))
            )
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise _unsupported(
                "controlnet_conditioning_channel_order",
                self.controlnet_conditioning_channel_order,
                "'rgb' or 'bgr'",
            )
        if self.global_pool_conditions:
            raise _unsupported("global_pool_conditions", True, "False")
        emb = self.conditioning_embedding_out_channels
        if not emb:
            raise _unsupported("conditioning_embedding_out_channels", emb, "a tuple of ints")
        self.as_unet()  # the trunk's own checks (block types, heads, groups, lengths)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **kw: Any) -> ControlNetConfig:
        """diffusers' `ControlNetModel.from_unet`: every field the two configs share (the
        trunk: blocks, channels, attention, embeddings) from `unet`, the rest default, then
        `kw` (e.g. `conditioning_embedding_out_channels`)."""
        unet_fields = {f.name for f in dataclasses.fields(unet)}
        shared = {f.name for f in dataclasses.fields(cls) if f.name in unet_fields}
        return cls(**{**{k: getattr(unet, k) for k in shared}, **kw})

    # ---- derived ----------------------------------------------------------------------

    def as_unet(self) -> UNetConfig:
        """The UNet config whose encoder half (conv_in, embeddings, down and mid blocks) is this
        ControlNet's trunk. Heads: `num_attention_heads or attention_head_dim` (diffusers'
        ControlNet accepts either; our UNetConfig reads heads from `attention_head_dim`)."""
        n = len(self.down_block_types)
        return UNetConfig(
            in_channels=self.in_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
            down_block_types=self.down_block_types,
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D",) * n,
            only_cross_attention=self.only_cross_attention,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            downsample_padding=self.downsample_padding,
            mid_block_scale_factor=self.mid_block_scale_factor,
            act_fn=self.act_fn,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=self.transformer_layers_per_block,
            encoder_hid_dim=self.encoder_hid_dim,
            encoder_hid_dim_type=self.encoder_hid_dim_type,
            attention_head_dim=self.num_attention_heads or self.attention_head_dim,
            use_linear_projection=self.use_linear_projection,
            class_embed_type=self.class_embed_type,
            addition_embed_type=self.addition_embed_type,
            addition_time_embed_dim=self.addition_time_embed_dim,
            num_class_embeds=self.num_class_embeds,
            upcast_attention=self.upcast_attention,
            resnet_time_scale_shift=self.resnet_time_scale_shift,
            projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim,
        )

    @property
    def mid_block_layers(self) -> int:
        """Attention layers of the mid block (0: diffusers' `UNetMidBlock2D`, one resnet)."""
        return 1 if self.mid_block_type == "UNetMidBlock2DCrossAttn" else 0

    @property
    def conditioning_factor(self) -> int:
        """How much `controlnet_cond_embedding` downsamples the conditioning image (8 in the
        published SD/SDXL ControlNets: three stride-2 convs). Must equal the VAE factor."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def num_residuals(self) -> int:
        """Down-block residuals: conv_in's output, one per resnet, one per downsampler."""
        n = len(self.down_block_types)
        return 1 + n * self.layers_per_block + (n - 1)


def sdxl_controlnet() -> ControlNetConfig:
    """diffusers/controlnet-canny-sdxl-1.0 `config.json`: the SDXL base UNet's encoder and mid
    block (as diffusers' `ControlNetModel.from_unet(sdxl_base)`), an 8x conditioning embedding;
    1.25B parameters."""
    return ControlNetConfig.from_unet(sdxl_base())
