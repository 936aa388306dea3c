"""KVExchange: keys and values for self-attention (`attn1`) on a row band.

Tokens are row-major, so band i holds the contiguous token range [i*l, (i+1)*l), l = L/n.
Sync step: `all_gather` this step's local K,V and use them now (exact).
Displaced step: use the full K,V of step t-1 (gathered at the start of this step) with this
band's own slice replaced by the fresh local K,V, and park the fresh K,V for step t+1.

PCPP (`ctx.pcpp = p`, arXiv 2412.02962), displaced steps only: the band attends to its own
fresh tokens plus the r = round(p * l) nearest tokens of each neighbour band (the last r of
band i-1, the first r of band i+1; p*h rows when that is whole), from step t-1. Only those
rows are sent, to the two neighbours (`ppermute`), instead of every band's K,V to everyone;
edge bands mask the missing neighbour. Warm-up steps are DistriFusion's exact steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.parallel.config import PatchContext
from distrifusion_jax.parallel.exchange import exchange, send, store
from distrifusion_jax.parallel.state import STALE

Mask = jax.Array | None


def pcpp_tokens(portion: float, local_tokens: int) -> int:
    """r: tokens of each neighbour band a band attends to under PCPP portion p."""
    return round(portion * local_tokens)


class KVExchange(nn.Module):
    """`(k, v)` local `[B, l, C]` -> `(k, v, mask)` for the band's attention.

    K,V are the full image's `[B, L, C]`, or under PCPP in a displaced step the window
    `[B, r + l + r, C]`, with `mask` `[1, 1, 1, r + l + r]` (False: no neighbour there; pass it
    to `jax.nn.dot_product_attention`); otherwise `mask` is None. No parameters; state in "stale".
    """

    patch: PatchContext | None = None

    @nn.compact
    def __call__(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, Mask]:
        ctx = self.patch
        if ctx is None or ctx.n == 1:
            return k, v, None
        if ctx.sync_exchange:
            k_full = exchange("k", k, ctx.axis, ctx.n)
            v_full = exchange("v", v, ctx.axis, ctx.n)
            if ctx.pcpp is None:
                store(self, ctx, local={"k": k, "v": v}, received={"k": k_full, "v": v_full})
            else:  # the neighbours' edge rows for the displaced steps
                local = _edge_rows(k, v, pcpp_tokens(ctx.pcpp, k.shape[1]))
                store(self, ctx, local, _neighbour_rows(k_full, v_full, k.shape[1], ctx))
            return k_full, v_full, None
        if ctx.pcpp is not None:
            return self._partial(k, v, ctx)
        k_stale = self.get_variable(STALE, "k")
        v_stale = self.get_variable(STALE, "v")
        start = jax.lax.axis_index(ctx.axis) * k.shape[1]
        k_full = jax.lax.dynamic_update_slice_in_dim(k_stale, k.astype(k_stale.dtype), start, 1)
        v_full = jax.lax.dynamic_update_slice_in_dim(v_stale, v.astype(v_stale.dtype), start, 1)
        send(self, ctx, k=k, v=v)  # exchanged at the start of step t+1
        return k_full.astype(k.dtype), v_full.astype(v.dtype), None

    def _partial(self, k: jax.Array, v: jax.Array, ctx: PatchContext):
        """PCPP displaced step: own fresh K,V between the neighbours' stale edge rows."""
        l = k.shape[1]
        r = pcpp_tokens(ctx.pcpp, l)
        if r == 0:
            return k, v, None
        above = self.get_variable(STALE, "above").astype(k.dtype)  # [2, B, r, C] from band i-1
        below = self.get_variable(STALE, "below").astype(k.dtype)  # [2, B, r, C] from band i+1
        send(self, ctx, **_edge_rows(k, v, r))  # for step t+1
        i = jax.lax.axis_index(ctx.axis)
        edge = jnp.ones((r,), bool)
        mask = jnp.concatenate([edge & (i > 0), jnp.ones((l,), bool), edge & (i < ctx.n - 1)])
        k_win = jnp.concatenate([above[0], k, below[0]], axis=1)
        v_win = jnp.concatenate([above[1], v, below[1]], axis=1)
        return k_win, v_win, mask[None, None, None, :]


def _edge_rows(k: jax.Array, v: jax.Array, r: int) -> dict[str, jax.Array]:
    """What this band sends its neighbours under PCPP: its last r tokens of K,V (read by band
    i+1 as "above") and its first r (read by band i-1 as "below"), stacked `[2, B, r, C]`."""
    kv = jnp.stack([k, v])  # [2, B, l, C]
    return {"above": kv[:, :, kv.shape[2] - r :], "below": kv[:, :, :r]}


def _neighbour_rows(k_full, v_full, l: int, ctx: PatchContext) -> dict[str, jax.Array]:
    """From the full K,V `[B, L, C]`: band i-1's last r and band i+1's first r tokens, stacked
    `[2, B, r, C]` (zeros where there is no neighbour), as `send` would deliver them."""
    r = pcpp_tokens(ctx.pcpp, l)
    kv = jnp.stack([k_full, v_full])  # [2, B, L, C]
    padded = jnp.pad(kv, ((0, 0), (0, 0), (r, r), (0, 0)))  # token t at t + r
    i = jax.lax.axis_index(ctx.axis)
    above = jax.lax.dynamic_slice_in_dim(padded, i * l, r, axis=2)  # tokens [i*l - r, i*l)
    below = jax.lax.dynamic_slice_in_dim(padded, (i + 1) * l + r, r, axis=2)
    return {"above": above, "below": below}
