"""PatchGroupNorm: GroupNorm whose statistics span all row bands.

Moments `s = [E x, E x^2]` per (batch, group) are computed in fp32 on the local band.
Sync step: `all_gather` and average (exact: bands are equal-sized), biased variance as torch.
Displaced step, `corrected_async_gn`: full = mean_j(s_j^{t-1}) + (s_i^t - s_i^{t-1});
`stale_gn`: full = (sum_{j != i} s_j^{t-1} + s_i^t) / n; `separate_gn`/`no_sync`: local.
Where the combined variance is negative, the local band's variance is used.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.parallel.config import PatchContext
from distrifusion_jax.parallel.exchange import STALE, exchange, send, store

Dtype = Any


def group_moments(x: jax.Array, num_groups: int) -> jax.Array:
    """Per-(batch, group) moments in fp32: `[B, H, W, C] -> [2, B, G]` (E x, E x^2)."""
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h * w, num_groups, c // num_groups)
    m1 = jnp.mean(xg, axis=(1, 3))
    m2 = jnp.mean(jnp.square(xg), axis=(1, 3))
    return jnp.stack([m1, m2])


class PatchGroupNorm(nn.Module):
    """GroupNorm on NHWC `[B, H, W, C]`; parameters `scale`, `bias` `[C]` as `nn.GroupNorm`."""

    num_groups: int = 32
    epsilon: float = 1e-5
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {g} groups.")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        local = group_moments(x, g)  # [2, B, G]
        mean, var = self._combine(local)
        xg = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        y = (xg - mean[:, None, None, :, None]) * jax.lax.rsqrt(
            var[:, None, None, :, None] + self.epsilon
        )
        y = y.reshape(b, h, w, c) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)

    def _combine(self, local: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Whole-image (mean, var) `[B, G]` from the local moments `[2, B, G]`."""
        ctx = self.patch
        if ctx is None or ctx.n == 1:
            full = local
        elif ctx.sync_groupnorm:
            gathered = exchange("moments", local, ctx.axis, ctx.n)  # [n, 2, B, G]
            full = jnp.mean(gathered, axis=0)
            if ctx.stale_groupnorm_state:
                store(self, moments=gathered)
        elif ctx.mode in ("separate_gn", "no_sync"):
            full = local
        else:
            stale = self.get_variable(STALE, "moments")  # [n, 2, B, G] from step t-1
            i = jax.lax.axis_index(ctx.axis)
            if ctx.mode == "corrected_async_gn":
                full = jnp.mean(stale, axis=0) + (local - stale[i])
            else:  # stale_gn
                full = (jnp.sum(stale, axis=0) - stale[i] + local) / ctx.n
            send(self, ctx, moments=local)  # read in step t+1
        mean, m2 = full[0], full[1]
        var = m2 - jnp.square(mean)
        if full is not local:
            var = jnp.where(var < 0, local[1] - jnp.square(local[0]), var)
        return mean, jnp.maximum(var, 0.0)
