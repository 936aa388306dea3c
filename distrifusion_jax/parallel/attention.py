"""KVExchange: full-image keys and values for self-attention (`attn1`) on a row band.

Tokens are row-major, so band i holds the contiguous token range [i*L/n, (i+1)*L/n).
Sync step: `all_gather` this step's local K,V and use them now (exact).
Displaced step: use the full K,V gathered in step t-1 with this band's own slice replaced
by the fresh local K,V, and `all_gather` the fresh K,V for step t+1 (not read here).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from distrifusion_jax.parallel.config import PatchContext
from distrifusion_jax.parallel.exchange import STALE, exchange, send, store


class KVExchange(nn.Module):
    """`(k, v)` local `[B, L/n, C]` -> full `[B, L, C]` each. No parameters; state in "stale"."""

    patch: PatchContext | None = None

    @nn.compact
    def __call__(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        ctx = self.patch
        if ctx is None or ctx.n == 1:
            return k, v
        if ctx.sync_exchange:
            k_full = exchange("k", k, ctx.axis, ctx.n)
            v_full = exchange("v", v, ctx.axis, ctx.n)
            store(self, k=k_full, v=v_full)
            return k_full, v_full
        k_stale = self.get_variable(STALE, "k")
        v_stale = self.get_variable(STALE, "v")
        start = jax.lax.axis_index(ctx.axis) * k.shape[1]
        k_full = jax.lax.dynamic_update_slice_in_dim(k_stale, k.astype(k_stale.dtype), start, 1)
        v_full = jax.lax.dynamic_update_slice_in_dim(v_stale, v.astype(v_stale.dtype), start, 1)
        if ctx.refresh_state:
            send(self, ctx, k=k, v=v)  # read in step t+1
        return k_full.astype(k.dtype), v_full.astype(v.dtype)
