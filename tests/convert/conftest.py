"""A tiny random diffusers SDXL-style folder, written once per test session.

`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/` (each `save_pretrained`
of a tiny torch model with seeded random weights, no zeros), `scheduler/` and two stand-in
`tokenizer*/` folders (the converter copies them byte for byte; real vocab files are not needed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny import TINY_SDXL_UNET_CONFIG, randomize_, tiny_torch_unet

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


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> TinySDXL:
    import diffusers
    import transformers

    root = tmp_path_factory.mktemp("tiny_sdxl")
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
    diffusers.EulerDiscreteScheduler().save_pretrained(root / "scheduler")
    for name in ("tokenizer", "tokenizer_2"):
        (root / name).mkdir()
        (root / name / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
        (root / name / "vocab.json").write_text(json.dumps({"<|endoftext|>": 2, name: 3}))
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return TinySDXL(root, unet, vae, te1, te2)
