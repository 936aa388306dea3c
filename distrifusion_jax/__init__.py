"""distrifusion-jax: displaced patch parallelism for Stable Diffusion XL in JAX/Flax."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Loaders live in distrifusion_jax.io.checkpoint (JAX, orbax); imported on first use, so that
# `import distrifusion_jax.parallel.config` and the CLIs' environment setup stay JAX-free.
_LAZY = {"load_component", "load_unet"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from distrifusion_jax.io import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", "load_component", "load_unet"]
