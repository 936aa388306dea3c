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


class KVExchange(nn.Module):
    """`(k, v)` local `[B, L/n, C]` -> full `[B, L, C]` each. No parameters; state in "stale"."""

    patch: PatchContext | None = None

    @nn.compact
    def __call__(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        ctx = self.patch
        if ctx is None or ctx.n == 1:
            return k, v
        if ctx.sync_exchange:
            k_full = jax.lax.all_gather(k, ctx.axis, axis=1, tiled=True)
            v_full = jax.lax.all_gather(v, ctx.axis, axis=1, tiled=True)
            self._store(k_full, v_full)
            return k_full, v_full
        k_stale = self.get_variable("stale", "k")
        v_stale = self.get_variable("stale", "v")
        start = jax.lax.axis_index(ctx.axis) * k.shape[1]
        k_full = jax.lax.dynamic_update_slice_in_dim(k_stale, k.astype(k_stale.dtype), start, 1)
        v_full = jax.lax.dynamic_update_slice_in_dim(v_stale, v.astype(v_stale.dtype), start, 1)
        if ctx.refresh_state:
            # Sent now, read in step t+1: XLA can overlap the transfer with this step.
            self._store(
                jax.lax.all_gather(k, ctx.axis, axis=1, tiled=True),
                jax.lax.all_gather(v, ctx.axis, axis=1, tiled=True),
            )
        return k_full.astype(k.dtype), v_full.astype(v.dtype)

    def _store(self, k_full: jax.Array, v_full: jax.Array) -> None:
        if self.is_mutable_collection("stale"):
            self.put_variable("stale", "k", k_full)
            self.put_variable("stale", "v", v_full)
