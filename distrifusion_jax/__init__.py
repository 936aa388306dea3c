"""distrifusion-jax: displaced patch parallelism for Stable Diffusion XL in JAX/Flax."""

__version__ = "0.1.0"

from distrifusion_jax.checkpoint import load_component, load_unet  # noqa: E402

__all__ = ["__version__", "load_component", "load_unet"]
