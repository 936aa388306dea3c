"""A tiny random diffusers SDXL *refiner* folder beside the tiny base (`tests/tiny_sdxl.py`).

As stable-diffusion-xl-refiner-1.0: `text_encoder_2/` + `tokenizer_2/` only (diffusers'
`text_encoder=None, tokenizer=None`), `requires_aesthetics_score` (5 time ids: original size,
crop top-left, aesthetic score), `force_zeros_for_empty_prompt: false`, and one more
downsampling level than the base (the real refiner has 4 levels to the base's 3). Its own
text encoder has other random weights than the base's; `vae/`, `tokenizer_2/` and `scheduler/`
are copies of the base's (diffusers' docs share the base's VAE with the refiner).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.tiny import TINY_SDXL_POOLED_DIM, TINY_SDXL_UNET_CONFIG, randomize_, tiny_torch_unet
from tests.tiny_sdxl import MODEL_INDEX, TINY_CLIP

TINY_REFINER_UNET_CONFIG: dict[str, Any] = {
    **TINY_SDXL_UNET_CONFIG,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 1, 1),
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": TINY_CLIP["hidden_size"],  # text_encoder_2 alone
    "projection_class_embeddings_input_dim": 5 * 8 + TINY_SDXL_POOLED_DIM,  # 5 time ids + pooled
}

REFINER_INDEX: dict[str, Any] = {
    **MODEL_INDEX,
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "force_zeros_for_empty_prompt": False,
    "requires_aesthetics_score": True,
    "text_encoder": [None, None],
    "tokenizer": [None, None],
}


def write_tiny_refiner(root: Path, base: Path) -> Path:
    """Write the refiner folder into `root` (which exists), copying shared parts from `base`."""
    import transformers

    tiny_torch_unet(TINY_REFINER_UNET_CONFIG, seed=11).save_pretrained(root / "unet")
    te2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TINY_CLIP, hidden_act="gelu")
    ).eval()
    randomize_(te2, seed=12).save_pretrained(root / "text_encoder_2")
    for name in ("vae", "tokenizer_2", "scheduler"):
        shutil.copytree(base / name, root / name)
    (root / "model_index.json").write_text(json.dumps(REFINER_INDEX, indent=2))
    return root
