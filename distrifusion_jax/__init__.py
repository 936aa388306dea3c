"""distrifusion-jax: displaced patch parallelism for Stable Diffusion XL in JAX/Flax."""

__version__ = "0.1.0"
