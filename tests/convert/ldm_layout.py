"""Test helper: diffusers UNet keys -> the original (SGM/LDM) single-file layout.

diffusers ships only the other direction (`convert_ldm_unet_checkpoint`). This inverse exists
to build original-layout test checkpoints; the tests then run diffusers' forward mapping on
them, so a mistake here shows up as keys that do not come back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PREFIX = "model.diffusion_model."

_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet(rest: str) -> str:
    layer, leaf = rest.split(".", 1)
    return f"{_RESNET[layer]}.{leaf}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """One diffusers UNet state-dict key -> its original-layout key (without the prefix)."""
    n = layers_per_block + 1  # blocks per level on the way down: L resnets + 1 downsampler
    for new, old in _TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    parts = key.split(".")
    if parts[0] == "down_blocks":
        b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{1 + b * n + i}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + b * n + i}.1.{rest}"
        return f"input_blocks.{(b + 1) * n}.0.op.{rest.removeprefix('conv.')}"
    if parts[0] == "mid_block":
        kind, i, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * i}.{_resnet(rest)}"
        return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{b * n + i}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{b * n + i}.1.{rest}"
        slot = 2 if up_has_attention[b] else 1
        return f"output_blocks.{b * n + layers_per_block}.{slot}.{rest}"
    raise KeyError(f"no original-layout key for {key!r}")


def unet_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers UNet state dict under original single-file keys (`model.diffusion_model.*`)."""
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    lpb = config["layers_per_block"]
    return {PREFIX + unet_key_to_ldm(k, lpb, up_attn): v for k, v in state_dict.items()}
