"""Timestep and SDXL text-time embeddings (diffusers `models/embeddings.py`), always in fp32.

The sinusoidal projections (`time_proj`, `add_time_proj`) have no parameters, so they are plain
functions; `TimestepEmbedding` is the two-layer MLP named `time_embedding` / `add_embedding`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _frequencies(half: int, shift: float, max_period: int) -> np.ndarray:
    """`exp(-log(max_period) * i / (half - shift))`, `[half]` fp32, as a trace-time constant.

    The exponent is rounded in fp32 exactly as torch does; exp is taken in fp64. Computing it in
    XLA instead lets the compiler reassociate the division (up to ~14 ulp off torch's frequency,
    i.e. ~5e-5 in sin/cos at t ~ 1000), so we keep it out of the graph.
    """
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - shift)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def get_timestep_embedding(
    timesteps: jax.Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> jax.Array:
    """Sinusoidal embedding as diffusers' `get_timestep_embedding`: `[N] -> [N, dim]` fp32.

    Args:
      timesteps: `[N]`, may be fractional.
      embedding_dim: output width (odd widths get one zero column, as diffusers).
      flip_sin_to_cos: `[cos, sin]` order if True, else `[sin, cos]`.
      downscale_freq_shift: frequency i is `max_period ** (-i / (embedding_dim // 2 - shift))`.
      scale: multiplies the angles.
      max_period: lowest frequency's period.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [N], got shape {timesteps.shape}.")
    half = embedding_dim // 2
    freqs = jnp.asarray(_frequencies(half, downscale_freq_shift, max_period))  # [half]
    angles = scale * (timesteps.astype(jnp.float32)[:, None] * freqs[None, :])  # [N, half]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def text_time_input(
    text_embeds: jax.Array,
    time_ids: jax.Array,
    time_embed_dim: int,
    flip_sin_to_cos: bool,
    freq_shift: float,
) -> jax.Array:
    """SDXL's `add_embedding` input: `[B, P]`, `[B, k]` -> `[B, P + k * time_embed_dim]` fp32.

    Each micro-conditioning id (original size, crop top-left, target size) gets its own
    sinusoidal embedding (`add_time_proj`), concatenated after the pooled text embedding.
    """
    b = text_embeds.shape[0]
    t = get_timestep_embedding(
        time_ids.reshape(-1), time_embed_dim, flip_sin_to_cos, freq_shift
    )  # [B*k, D]
    t = t.reshape(b, -1)  # [B, k*D]
    return jnp.concatenate([text_embeds.astype(jnp.float32), t], axis=-1)


class TimestepEmbedding(nn.Module):
    """`linear_1 -> SiLU -> linear_2`: `[B, C_in] -> [B, time_embed_dim]`."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(
            self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = dense("linear_1")(x)
        x = nn.silu(x)
        return dense("linear_2")(x)
