"""PatchGroupNorm: GroupNorm whose statistics span all row bands.

Each band computes, per (batch, group), in fp32 and in two passes (the second also corrects the
first's rounding, see `group_moments`), its mean and its centred second moment (biased
variance): `s_i = [m_i, v_i]`, `m_i = E_i x`, `v_i = E_i (x - m_i)^2`.
Bands are equal-sized, so the whole image's statistics follow exactly from the bands' by the
parallel-variance (Chan et al.) formula, with no `E x^2 - (E x)^2` that would cancel where a
group's mean is large against its spread:

    combine(s_1..s_n):  m = mean_j m_j,   v = mean_j v_j + mean_j (m_j - m)^2.

Sync step: `all_gather` the `[2, B, G]` moments and combine (exact; biased variance, as torch).
Displaced step, by the mode's `groupnorm` rule (`parallel/config.py`), from every band's
moments of step t-1 (`s_j`, combined: `m, v`) and this band's fresh ones `s_i' = [m_i', v_i']`:
  - `"corrected"` (the original's `full = mean_j(S_j) + (S_i' - S_i)` on raw moments
    `S = [E x, E x^2]`, rewritten in centred terms; equal in exact arithmetic), with
    `d = m_i' - m_i`:  mean = m + d,  var = v + (v_i' - v_i) + 2 d (m_i - m);
  - `"stale"` (the original's `(sum_{j != i} S_j + S_i') / n`): combine with `s_i` replaced by
    `s_i'`;
  - `"local"`: `s_i'`; `"exact"`: as a sync step.
Where the displaced variance is negative, the local band's variance is used. The exchange and
the stale state keep their size: `[2, B, G]` per band, `[n, 2, B, G]` gathered.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.parallel.config import PatchContext
from distrifusion_jax.parallel.exchange import exchange, send, store
from distrifusion_jax.parallel.state import STALE

Dtype = Any


def group_moments(x: jax.Array, num_groups: int) -> jax.Array:
    """Per-(batch, group) mean and biased variance in fp32: `[B, H, W, C] -> [2, B, G]`.

    Corrected two-pass: the first mean `m` carries the sum's rounding (relative to the mean,
    not the spread); the deviations' mean `d` recovers it, so mean = m + d and
    var = E (x - m)^2 - d^2 are accurate to the input's own rounding, as torch's.

    Speed (XLA's CPU backend, jax 0.10): sums run over the pixels first, per channel
    (`[B, H*W, C] -> [B, C]`, contiguous rows), then over each group's channels, rather than
    over the strided `(H*W, C/G)` axes at once. The two second-pass sums each subtract `m`
    themselves: from one shared `x - m`, XLA writes the deviations to memory and reads them
    back twice (the barrier keeps the subtractions apart, so each fuses into its reduction).
    With the per-channel normalization below, PatchGroupNorm runs 3.5x faster at
    `[2, 128, 128, 320]` (23 -> 6.6 ms) and 1.6x at `[2, 64, 64, 640]` on 2 cores.
    """
    b, h, w, c = x.shape
    n = h * w * (c // num_groups)
    xr = x.astype(jnp.float32).reshape(b, h * w, c)  # [B, H*W, C]

    def group_sum(y: jax.Array) -> jax.Array:  # [B, H*W, C] -> [B, G]
        return jnp.sum(y, axis=1).reshape(b, num_groups, c // num_groups).sum(-1)

    m = group_sum(xr) / n  # [B, G]
    mc = jnp.repeat(m, c // num_groups, axis=1)[:, None, :]  # [B, 1, C]
    m1, m2 = jax.lax.optimization_barrier((mc, mc))
    d = group_sum(xr - m1) / n
    var = group_sum(jnp.square(xr - m2)) / n - jnp.square(d)
    return jnp.stack([m + d, var])


def combine(moments: jax.Array) -> jax.Array:
    """Whole-image `[2, B, G]` (mean, variance) from n equal bands' `[n, 2, B, G]` (Chan)."""
    mean = jnp.mean(moments[:, 0], axis=0)
    var = jnp.mean(moments[:, 1], axis=0) + jnp.mean(jnp.square(moments[:, 0] - mean), axis=0)
    return jnp.stack([mean, var])


def _corrected(stale: jax.Array, local: jax.Array, i: jax.Array) -> jax.Array:
    """Step t-1's whole-image statistics moved by this band's change (see the docstring)."""
    full = combine(stale)
    own = stale[i]  # [2, B, G]
    d = local[0] - own[0]
    var = full[1] + (local[1] - own[1]) + 2 * d * (own[0] - full[0])
    return jnp.stack([full[0] + d, var])


def _stale(stale: jax.Array, local: jax.Array, i: jax.Array) -> jax.Array:
    """Step t-1's bands with this band's fresh moments in place of its stale ones."""
    return combine(jax.lax.dynamic_update_index_in_dim(stale, local, i, 0))


# Whole-image (mean, var) `[2, B, G]` from every band's moments of step t-1 `[n, 2, B, G]` and
# this band's fresh ones `[2, B, G]` (band index i), by the mode's GroupNorm rule.
_STALE_RULES = {"corrected": _corrected, "stale": _stale}


class PatchGroupNorm(nn.Module):
    """GroupNorm on NHWC `[B, H, W, C]`; parameters `scale`, `bias` `[C]` as `nn.GroupNorm`."""

    num_groups: int = 32
    epsilon: float = 1e-5
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        g = self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {g} groups.")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        local = group_moments(x, g)  # [2, B, G]
        mean, var = self._combine(local)
        # One pass, per channel: (x - mean) * (rsqrt(var + eps) * scale) + bias, with the
        # group statistics repeated over the group's channels ([B, 1, 1, C] operands; a
        # [B, H, W, G, C/G] broadcast instead runs 1.5x slower on XLA's CPU backend).
        per_channel = lambda a: jnp.repeat(a, c // g, axis=1).reshape(b, 1, 1, c)
        gain = per_channel(jax.lax.rsqrt(var + self.epsilon)) * scale.astype(jnp.float32)
        y = (x.astype(jnp.float32) - per_channel(mean)) * gain + bias.astype(jnp.float32)
        return y.astype(self.dtype)

    def _combine(self, local: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Whole-image (mean, var) `[B, G]` from the local moments `[2, B, G]`."""
        ctx = self.patch
        if ctx is None or ctx.n == 1:
            full = local
        elif ctx.sync_groupnorm:
            gathered = exchange("moments", local, ctx.axis, ctx.n)  # [n, 2, B, G]
            full = combine(gathered)
            if ctx.rule.stale_moments:
                store(self, ctx, local={"moments": local}, received={"moments": gathered})
        elif ctx.rule.groupnorm == "local":
            full = local
        else:
            stale = self.get_variable(STALE, "moments")  # [n, 2, B, G] from step t-1
            i = jax.lax.axis_index(ctx.axis)
            full = _STALE_RULES[ctx.rule.groupnorm](stale, local, i)
            send(self, ctx, moments=local)  # read in step t+1
        mean, var = full[0], full[1]
        if full is not local:
            var = jnp.where(var < 0, local[1], var)
        return mean, jnp.maximum(var, 0.0)
