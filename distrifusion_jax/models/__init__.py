"""Flax models named as diffusers: UNet2DConditionModel (SD 1.x / 2.x / SDXL), VAE, CLIP."""

from distrifusion_jax.models.unet import UNet2DConditionModel
from distrifusion_jax.models.unet_config import UNetConfig, sd15, sd21, sdxl_base

__all__ = ["UNet2DConditionModel", "UNetConfig", "sd15", "sd21", "sdxl_base"]
