"""Tiny SDXL- and SD1.5-style UNets (torch-randomised weights) and their conditioning."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from distrifusion_jax.models import UNet2DConditionModel, UNetConfig
from tests.tiny import (
    TINY_SD15_UNET_CONFIG,
    TINY_SDXL_POOLED_DIM,
    TINY_SDXL_UNET_CONFIG,
    flax_params,
    randn,
    tiny_torch_unet,
)

CONFIGS = {"sdxl": TINY_SDXL_UNET_CONFIG, "sd15": TINY_SD15_UNET_CONFIG}


@functools.cache
def tiny_unet(kind: str):
    """(module, params) with the random weights of diffusers' tiny UNet of that kind."""
    cfg = CONFIGS[kind]
    model = UNet2DConditionModel(UNetConfig.from_diffusers(dict(cfg)))
    x, t, ehs, _ = example_inputs(kind, batch=1, hw=(16, 16), guided=False)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    params = flax_params(
        tiny_torch_unet(cfg),
        model,
        x,
        t,
        flat(ehs["encoder_hidden_states"]),
        {k: flat(v) for k, v in ehs.items() if k != "encoder_hidden_states"} or None,
    )
    return model, params


def example_inputs(kind: str, batch: int, hw: tuple[int, int], guided: bool, seed: int = 0):
    """(latents [B,H,W,4], t, cond with leading [G,B], None)."""
    cfg = CONFIGS[kind]
    g = 2 if guided else 1
    x = jnp.asarray(randn(seed, batch, *hw, 4))
    cond = {
        "encoder_hidden_states": jnp.asarray(0.5 * randn(seed + 1, g, batch, 7, cfg["cross_attention_dim"]))
    }
    if kind == "sdxl":
        cond["text_embeds"] = jnp.asarray(randn(seed + 2, g, batch, TINY_SDXL_POOLED_DIM))
        ids = np.array([256.0, 192.0, 0.0, 0.0, 256.0, 192.0], np.float32)
        cond["time_ids"] = jnp.asarray(np.broadcast_to(ids, (g, batch, 6)))
    return x, jnp.zeros((batch,)), cond, None
