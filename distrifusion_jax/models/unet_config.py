"""UNetConfig: diffusers' `UNet2DConditionModel` config (`unet/config.json`) as a frozen dataclass.

Fields and defaults mirror the keyword arguments of diffusers' `UNet2DConditionModel.__init__`
(diffusers 0.42.1), so `UNetConfig.from_diffusers(json.load(f))` reads a published config and
`to_dict()` gives kwargs diffusers accepts. We implement the SD 1.x / 2.x / SDXL family; any
option set to a value we do not implement raises a one-line ValueError naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Written by diffusers' ConfigMixin next to the kwargs; not model options.
METADATA_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# key -> (the values we implement, how to say it). Keys not listed here and not checked in
# `_check_supported` either are implemented for any value, or have no effect on the block
# types above at inference (dropout, sample_size, resnet_skip_time_act, resnet_out_scale_factor,
# cross_attention_norm, addition_embed_type_num_heads, mid_block_only_cross_attention,
# upcast_attention: attention logits are always fp32 here).
_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "mid_block_type": (MID_BLOCKS, "'UNetMidBlock2DCrossAttn' or None"),
    "downsample_padding": ((1,), "1"),
    "reverse_transformer_layers_per_block": ((None,), "None"),
    "encoder_hid_dim": ((None,), "None"),
    "encoder_hid_dim_type": ((None,), "None"),
    "dual_cross_attention": ((False,), "False"),
    "class_embed_type": ((None,), "None"),
    "addition_embed_type": ((None, "text_time"), "None or 'text_time'"),
    "num_class_embeds": ((None,), "None"),
    "resnet_time_scale_shift": (("default",), "'default'"),
    "time_embedding_type": (("positional",), "'positional'"),
    "time_embedding_act_fn": ((None,), "None"),
    "timestep_post_act": ((None,), "None"),
    "time_cond_proj_dim": ((None,), "None"),
    "conv_in_kernel": ((3,), "3"),
    "conv_out_kernel": ((3,), "3"),
    "attention_type": (("default",), "'default'"),
    "class_embeddings_concat": ((False,), "False"),
    "use_linear_projection": ((True, False), "True or False"),
    "center_input_sample": ((True, False), "True or False"),
    "flip_sin_to_cos": ((True, False), "True or False"),
}


def _unsupported(key: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"UNet config {key}={value!r} is not supported; supported: {supported}.")


def _tuplify(v: Any) -> Any:
    """Lists (JSON) -> tuples, recursively, so the config is hashable."""
    if isinstance(v, (list, tuple)):
        return tuple(_tuplify(x) for x in v)
    return v


class DiffusersConfig:
    """The diffusers `config.json` round trip of a frozen config dataclass.

    A subclass sets `DIFFUSERS_CLASS` (the diffusers model class its config.json describes) and
    `LABEL` (how errors name it); its dataclass fields are the model's constructor arguments.
    """

    DIFFUSERS_CLASS = ""
    LABEL = ""

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> Any:
        """Read a diffusers `config.json` dict; ValueError on unknown or unsupported keys."""
        name = d.get("_class_name", cls.DIFFUSERS_CLASS)
        if name != cls.DIFFUSERS_CLASS:
            raise ValueError(
                f"{cls.LABEL} config _class_name={name!r} is not supported; "
                f"supported: {cls.DIFFUSERS_CLASS!r}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k not in METADATA_KEYS}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"{cls.LABEL} config has unknown key(s) {unknown} "
                f"(not {cls.DIFFUSERS_CLASS} arguments)."
            )
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """kwargs for the diffusers model class (tuples become lists, as in JSON)."""

        def listify(v: Any) -> Any:
            return [listify(x) for x in v] if isinstance(v, tuple) else v

        return {f.name: listify(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_diffusers(self) -> dict[str, Any]:
        """The dict of a diffusers `config.json` (with `_class_name`)."""
        return {"_class_name": self.DIFFUSERS_CLASS, **self.to_dict()}

    def replace(self, **kw: Any) -> Any:
        """A copy with fields `kw` changed (checked again)."""
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class UNetConfig(DiffusersConfig):
    """diffusers `UNet2DConditionModel` kwargs (same names, same defaults)."""

    DIFFUSERS_CLASS = "UNet2DConditionModel"
    LABEL = "UNet"

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuplify(getattr(self, f.name)))
        self._check_supported()
        self._check_lengths()

    # ---- checks -----------------------------------------------------------------------

    def _check_supported(self) -> None:
        for key, (values, text) in _ONLY.items():
            v = getattr(self, key)
            if not any(v is x or (type(v) is type(x) and v == x) for x in values):
                raise _unsupported(key, v, text)
        for t in self.down_block_types:
            if t not in DOWN_BLOCKS:
                raise _unsupported("down_block_types", t, f"entries in {list(DOWN_BLOCKS)}")
        for t in self.up_block_types:
            if t not in UP_BLOCKS:
                raise _unsupported("up_block_types", t, f"entries in {list(UP_BLOCKS)}")
        oca = self.only_cross_attention
        if any(oca if isinstance(oca, tuple) else (oca,)):
            raise _unsupported("only_cross_attention", oca, "False")
        if self.num_attention_heads is not None:
            # diffusers' UNet2DConditionModel itself rejects it (the attention_head_dim quirk).
            raise _unsupported(
                "num_attention_heads", self.num_attention_heads, "None (set attention_head_dim)"
            )
        if str(self.act_fn).lower() not in ("silu", "swish"):
            raise _unsupported("act_fn", self.act_fn, "'silu' or 'swish'")
        if not isinstance(self.norm_num_groups, int):
            raise _unsupported("norm_num_groups", self.norm_num_groups, "an int")
        tlpb = self.transformer_layers_per_block
        if isinstance(tlpb, tuple) and any(not isinstance(x, int) for x in tlpb):
            raise _unsupported("transformer_layers_per_block", tlpb, "an int or one int per level")
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(getattr(self, key), int):
                    raise _unsupported(key, getattr(self, key), "an int with 'text_time'")

    def _check_lengths(self) -> None:
        n = len(self.down_block_types)
        lengths = {
            "up_block_types": self.up_block_types,
            "block_out_channels": self.block_out_channels,
        }
        for key in (
            "layers_per_block",
            "attention_head_dim",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "only_cross_attention",
        ):
            v = getattr(self, key)
            if isinstance(v, tuple):
                lengths[key] = v
        for key, v in lengths.items():
            if len(v) != n:
                raise ValueError(
                    f"UNet config {key} has {len(v)} entries but down_block_types has {n}."
                )
        for i, (c, heads) in enumerate(zip(self.block_out_channels, self.heads_per_level)):
            if c % heads or c % self.norm_num_groups:
                raise ValueError(
                    f"UNet config level {i}: {c} channels must be divisible by "
                    f"attention_head_dim={heads} (heads) and norm_num_groups="
                    f"{self.norm_num_groups}."
                )

    # ---- resolved per-level values ----------------------------------------------------

    def _per_level(self, v: Any) -> tuple[Any, ...]:
        return tuple(v) if isinstance(v, tuple) else (v,) * len(self.down_block_types)

    @property
    def num_levels(self) -> int:
        return len(self.down_block_types)

    @property
    def num_downsamplers(self) -> int:
        """Stride-2 convs: every down block but the last downsamples."""
        return len(self.down_block_types) - 1

    @property
    def layers_per_level(self) -> tuple[int, ...]:
        return self._per_level(self.layers_per_block)

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads per level: diffusers reads `attention_head_dim` as the head COUNT."""
        return self._per_level(self.attention_head_dim)

    @property
    def transformer_depth_per_level(self) -> tuple[int, ...]:
        return self._per_level(self.transformer_layers_per_block)

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return self._per_level(self.cross_attention_dim)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


def _sd_common(**kw: Any) -> UNetConfig:
    base = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
    )
    base.update(kw)
    return UNetConfig(**base)


def sd15() -> UNetConfig:
    """runwayml/stable-diffusion-v1-5 `unet/config.json` (8 heads of 40/80/160 dims)."""
    return _sd_common(cross_attention_dim=768, attention_head_dim=8, sample_size=64)


def sd21() -> UNetConfig:
    """stabilityai/stable-diffusion-2-1 `unet/config.json` (768-v; head dim 64)."""
    return _sd_common(
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        sample_size=96,
    )


def sdxl_base() -> UNetConfig:
    """stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json`."""
    return UNetConfig(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),  # heads (diffusers' naming quirk): head dim 64
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6*256 (time_ids) + 1280 (pooled text)
        upcast_attention=None,  # as published
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
    )
