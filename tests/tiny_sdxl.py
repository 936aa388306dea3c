"""A tiny random diffusers SDXL-style folder (see `tests/conftest.py` for the session fixture).

`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/` (each `save_pretrained`
of a tiny torch model with seeded random weights, no zeros), `scheduler/` (SDXL's Euler config)
and two tiny byte-level CLIP tokenizers (`tests/tiny_tokenizer.py`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from tests.tiny import TINY_SDXL_UNET_CONFIG, randomize_, tiny_torch_unet
from tests.tiny_tokenizer import write_tiny_clip_tokenizer

TINY_VAE_CONFIG: dict[str, Any] = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)
TINY_CLIP: dict[str, Any] = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
)

MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.42.1",
    "force_zeros_for_empty_prompt": True,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@dataclasses.dataclass
class TinySDXL:
    """The folder and the torch models it was saved from."""

    root: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module


# SDXL base's scheduler/scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def write_tiny_sdxl(root: Path) -> TinySDXL:
    """Write the tiny folder into `root` (which exists) and return it with its torch models."""
    import diffusers
    import transformers

    unet = tiny_torch_unet(TINY_SDXL_UNET_CONFIG, seed=0)
    vae = randomize_(diffusers.AutoencoderKL(**TINY_VAE_CONFIG), seed=1)
    te1 = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**TINY_CLIP, hidden_act="quick_gelu")
    ).eval()
    te2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TINY_CLIP, hidden_act="gelu")
    ).eval()
    randomize_(te1, seed=2)
    randomize_(te2, seed=3)
    models = {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}
    for name, model in models.items():
        model.save_pretrained(root / name)
    diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(root / "scheduler")
    write_tiny_clip_tokenizer(root / "tokenizer")
    write_tiny_clip_tokenizer(root / "tokenizer_2", pad_token="!")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return TinySDXL(root, unet, vae, te1, te2)
