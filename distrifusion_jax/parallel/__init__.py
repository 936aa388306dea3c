"""Everything that knows there are n devices.

Glossary: B batch, H/W latent rows/columns at a UNet level, C channels, n row bands (devices
on the `patch` mesh axis), L = H*W tokens, p halo rows, w warm-up steps (steps 0..w are sync).

`parallel.config` (ParallelConfig, the mode table) imports no JAX; the layers are loaded on
first use, so `from distrifusion_jax.parallel import ParallelConfig` stays light too.
"""

from __future__ import annotations

import importlib

from distrifusion_jax.parallel.config import (
    DEFAULT_MODE,
    MODE_RULES,
    MODES,
    ModeRule,
    ParallelConfig,
    PatchContext,
)

_LAYERS = {
    "KVExchange": "distrifusion_jax.parallel.attention",
    "PatchConv": "distrifusion_jax.parallel.conv",
    "PatchGroupNorm": "distrifusion_jax.parallel.groupnorm",
}

__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "MODE_RULES",
    "KVExchange",
    "ModeRule",
    "ParallelConfig",
    "PatchContext",
    "PatchConv",
    "PatchGroupNorm",
]


def __getattr__(name: str):
    if name in _LAYERS:
        return getattr(importlib.import_module(_LAYERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
