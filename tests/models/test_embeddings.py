"""Timestep / text-time embeddings vs diffusers (fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding as torch_timestep_embedding

from distrifusion_jax.models.embeddings import (
    TimestepEmbedding,
    get_timestep_embedding,
    text_time_input,
)
from tests.tiny import (
    TINY_SDXL_POOLED_DIM,
    TINY_SDXL_UNET_CONFIG,
    assert_close,
    flax_params,
    randn,
    randomize_,
    tiny_torch_unet,
)

# Angles reach ~1e3 (t=999, SDXL time_ids 1024): one fp32 ulp of an angle is ~6e-5, so sin/cos
# of the same fp32 angle may differ by a few ulp between libraries; max 1e-4 absolute.
TIMESTEPS = np.array([0.0, 1.0, 17.5, 500.0, 999.0, 1024.0], np.float32)


@pytest.mark.parametrize(
    "dim,flip,shift", [(32, True, 0), (33, False, 1), (8, True, 0), (320, True, 0)]
)
def test_timestep_embedding(dim, flip, shift):
    ours = get_timestep_embedding(jnp.asarray(TIMESTEPS), dim, flip, shift)
    ref = torch_timestep_embedding(torch.from_numpy(TIMESTEPS), dim, flip, shift)
    assert ours.dtype == jnp.float32 and ours.shape == (len(TIMESTEPS), dim)
    assert_close(ours, ref, 1e-4, 1e-5, f"timesteps dim={dim} flip={flip} shift={shift}")


@torch.no_grad()
def test_timestep_embedding_mlp():
    tm = randomize_(TorchTimestepEmbedding(32, 128), seed=1)
    m = TimestepEmbedding(128)
    x = randn(0, 2, 32)
    params = flax_params(tm, m, x)
    ours = m.apply({"params": params}, x)
    assert_close(ours, tm(torch.from_numpy(x)), 1e-5, 1e-6, "TimestepEmbedding")


@torch.no_grad()
def test_text_time_add_embedding():
    """SDXL `get_aug_embed`: add_time_proj(time_ids) ++ text_embeds -> add_embedding."""
    cfg = TINY_SDXL_UNET_CONFIG
    tm = tiny_torch_unet(cfg, seed=2)
    text = randn(1, 2, TINY_SDXL_POOLED_DIM)
    ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 1024, 768]], np.float32)
    emb = torch.zeros(2, 4 * cfg["block_out_channels"][0])
    cond = {"text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(ids)}
    ref = tm.get_aug_embed(emb, None, cond)

    add_in = text_time_input(jnp.asarray(text), jnp.asarray(ids), 8, True, 0)
    assert add_in.shape == (2, cfg["projection_class_embeddings_input_dim"])
    m = TimestepEmbedding(emb.shape[1])
    params = flax_params(tm.add_embedding, m, add_in)
    assert_close(m.apply({"params": params}, add_in), ref, 1e-4, 1e-5, "text_time add_embedding")
