"""Everything that knows there are n devices.

Glossary: B batch, H/W latent rows/columns at a UNet level, C channels, n row bands (devices
on the `patch` mesh axis), L = H*W tokens, p halo rows, w warm-up steps (steps 0..w are sync).
"""

from distrifusion_jax.parallel.attention import KVExchange
from distrifusion_jax.parallel.config import MODES, ParallelConfig, PatchContext
from distrifusion_jax.parallel.conv import PatchConv
from distrifusion_jax.parallel.groupnorm import PatchGroupNorm

__all__ = ["MODES", "KVExchange", "ParallelConfig", "PatchContext", "PatchConv", "PatchGroupNorm"]
