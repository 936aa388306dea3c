"""Configs of the shipped tiny model, as diffusers / transformers write them.

64x64 images, a two-level VAE that downsamples by 2 as SDXL's does by 8 (so the band-parallel
decoder runs its upsampler; the 32x32x4 latent has 32 rows and n = 8 row bands fit), SDXL's UNet
block layout with text_time conditioning at toy width, and two CLIP text encoders with the real
49,408-token vocabulary (hidden 32).
"""

from __future__ import annotations

from typing import Any

from distrifusion_jax.models.clip import CLIPTextConfig
from distrifusion_jax.models.unet_config import UNetConfig
from distrifusion_jax.models.vae import AutoencoderKLConfig
from distrifusion_jax.sampling.schedulers import SDXL_SCHEDULER_CONFIG

VAE_FACTOR = 2  # image pixels per latent pixel (SDXL: 8)
LATENT = 32  # latent rows and columns: n = 8 bands of 4 rows
RES = LATENT * VAE_FACTOR  # default image size, 64 px
TIME_IDS = (RES, RES, 0, 0, RES, RES)  # SDXL micro-conditioning: original size, crop, target
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.23.0"

UNET_CONFIG: dict[str, Any] = {
    "sample_size": LATENT,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,  # te1 hidden 32 + te2 hidden 32
    "transformer_layers_per_block": [1, 1, 1],
    "attention_head_dim": [1, 1, 2],  # head COUNTS (diffusers' naming): head dim 16 / 32 / 32
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": 6 * 16 + 32,  # time_ids + te2 projection
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],  # 8 channels at 64x64 px, 16 at the 32x32 latent
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": RES,
    "mid_block_add_attention": False,  # no attention over the 1024 latent pixels: kept cheap
    "force_upcast": False,
}
_TE_COMMON: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
TE1_CONFIG = dict(_TE_COMMON, hidden_act="quick_gelu")  # as SDXL's CLIP ViT-L text tower
TE2_CONFIG = dict(_TE_COMMON, hidden_act="gelu")  # as SDXL's OpenCLIP bigG text tower
SCHEDULER_CONFIG: dict[str, Any] = {  # SDXL base's, as diffusers writes it
    "_class_name": SDXL_SCHEDULER_CONFIG["_class_name"],
    "_diffusers_version": DIFFUSERS_VERSION,
    **SDXL_SCHEDULER_CONFIG,
}
CLASS_NAMES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
}


def component_configs() -> dict[str, dict[str, Any]]:
    """config.json of each component (`unet`, `vae`, `text_encoder`, `text_encoder_2`)."""
    unet = UNetConfig.from_diffusers(UNET_CONFIG).to_diffusers()
    unet["_diffusers_version"] = DIFFUSERS_VERSION
    vae = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        **AutoencoderKLConfig.from_diffusers(VAE_CONFIG).to_dict(),
    }
    te = {}
    for name, cfg in (("text_encoder", TE1_CONFIG), ("text_encoder_2", TE2_CONFIG)):
        te[name] = {
            "architectures": [CLASS_NAMES[name]],
            **CLIPTextConfig.from_hf(cfg).to_dict(),
            "transformers_version": TRANSFORMERS_VERSION,
        }
    return {"unet": unet, "vae": vae, **te}
