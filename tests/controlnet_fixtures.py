"""Tiny random ControlNets (diffusers torch, seeded) beside the tiny UNets of `tests/tiny.py`.

`controlnet_config(unet_config, ...)` keeps the UNet's trunk (as diffusers'
`ControlNetModel.from_unet` does) and sets the conditioning embedding's channels so that it
downsamples by the factor given (the tiny SDXL VAE's 2; published ControlNets: 8).
"""

from __future__ import annotations

from typing import Any

import torch

from tests.tiny import TINY_SD15_UNET_CONFIG, TINY_SDXL_UNET_CONFIG, randomize_

# UNet config keys a ControlNet shares (diffusers `ControlNetModel.from_unet`).
_SHARED = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
    "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "upcast_attention", "resnet_time_scale_shift",
)  # fmt: skip


def controlnet_config(unet_config: dict[str, Any], factor: int, **kw: Any) -> dict[str, Any]:
    """diffusers ControlNetModel kwargs for the trunk of `unet_config`, embedding `factor`x."""
    cfg = {k: unet_config[k] for k in _SHARED if k in unet_config}
    chans = {1: (8,), 2: (8, 16), 4: (8, 8, 16), 8: (8, 8, 16, 16)}[factor]
    cfg["conditioning_embedding_out_channels"] = chans
    cfg.update(kw)
    return cfg


# SDXL-style: factor 2 = the tiny SDXL folder's VAE factor. SD1.5-style: factor 8, as published.
TINY_SDXL_CONTROLNET_CONFIG = controlnet_config(TINY_SDXL_UNET_CONFIG, 2)
TINY_SD15_CONTROLNET_CONFIG = controlnet_config(TINY_SD15_UNET_CONFIG, 8)


def tiny_torch_controlnet(config: dict[str, Any], seed: int = 10) -> torch.nn.Module:
    """diffusers `ControlNetModel(**config)` with random weights (zero convs too), fp32."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return randomize_(ControlNetModel(**config), seed)
