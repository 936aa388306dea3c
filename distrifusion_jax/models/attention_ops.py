"""Scaled dot-product attention, chosen per backend: XLA's, or chunked with an online softmax.

`attention(q, k, v, mask)` computes `softmax(q k^T / sqrt(D)) v` with fp32 logits, like
`jax.nn.dot_product_attention`. On a row band the keys are the whole image (or a PCPP window),
so the logits `[B, H, L_band, S]` of the first attention level are large: at 3840^2 on 8 bands
7,200 queries x 57,600 keys x 10 heads, 16.6 GB in fp32 per image. The chunked form never holds
them: query blocks of `q_chunk` tokens are mapped over, key blocks of `k_chunk` scanned with a
running max and sum (the flash-attention recurrence), so a block's logits are
`[B, H, q_chunk, k_chunk]`.

`impl`: "xla" (`jax.nn.dot_product_attention`), "chunked", or "auto": chunked when the logits
of one call would exceed `AUTO_CHUNK_BYTES`, XLA's otherwise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "chunked")
AUTO_CHUNK_BYTES = 1 << 30  # fp32 logits of one attention call above which "auto" chunks
_NEG = -1e30  # masked logit: finite, so a block with no visible key gives no NaN


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    impl: str = "auto",
    q_chunk: int = 1024,
    k_chunk: int = 4096,
) -> jax.Array:
    """`[B, L, H, D]` queries, `[B, S, H, D]` keys and values -> `[B, L, H, D]` (q's dtype).

    `mask`: broadcastable to `[B, H, L, S]`, True where a key is visible, or None.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {list(IMPLS)}.")
    b, length, h, _ = q.shape
    s = k.shape[1]
    if impl == "auto":
        impl = "chunked" if 4 * b * h * length * s > AUTO_CHUNK_BYTES else "xla"
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    return chunked_attention(q, k, v, mask, q_chunk, k_chunk)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    q_chunk: int = 1024,
    k_chunk: int = 4096,
) -> jax.Array:
    """Attention in query blocks (mapped) x key blocks (scanned, online softmax); fp32 logits
    and accumulators. Shapes as `attention`."""
    b, length, h, d = q.shape
    s = k.shape[1]
    qc, kc = min(q_chunk, length), min(k_chunk, s)
    if mask is None:
        mask = jnp.ones((1, 1, 1, s), bool)
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (mask.shape[2], s))  # [., ., L or 1, S]
    if mask.shape[2] != 1:
        raise ValueError("chunked attention takes key masks ([.., .., 1, S]) only.")
    kp, vp = _pad_to(k, 1, kc), _pad_to(v, 1, kc)
    mp = _pad_to(mask, 3, kc)  # padded keys are invisible
    nk = kp.shape[1] // kc
    kb = kp.reshape(b, nk, kc, h, d).swapaxes(0, 1)  # [nk, B, kc, H, D]
    vb = vp.reshape(b, nk, kc, h, d).swapaxes(0, 1)
    mb = jnp.moveaxis(mp.reshape(mp.shape[:3] + (nk, kc)), 3, 0)  # [nk, ., ., 1, kc]
    scale = 1.0 / math.sqrt(d)

    def one_block(qb: jax.Array) -> jax.Array:  # [B, qc, H, D]
        def step(carry, blk):
            m, l, acc = carry  # [B, H, qc], [B, H, qc], [B, H, qc, D]
            kk, vv, mm = blk
            logits = jnp.einsum("bqhd,bkhd->bhqk", qb, kk, preferred_element_type=jnp.float32)
            logits = jnp.where(mm, logits * scale, _NEG)
            m_new = jnp.maximum(m, logits.max(-1))
            p = jnp.where(mm, jnp.exp(logits - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(vv.dtype), vv,
                            preferred_element_type=jnp.float32)  # fmt: skip
            return (m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv), None

        init = (
            jnp.full((b, h, qb.shape[1]), _NEG, jnp.float32),
            jnp.zeros((b, h, qb.shape[1]), jnp.float32),
            jnp.zeros((b, h, qb.shape[1], d), jnp.float32),
        )
        (_, l, acc), _ = jax.lax.scan(step, init, (kb, vb, mb))
        return (acc / l[..., None]).swapaxes(1, 2).astype(q.dtype)  # [B, qc, H, D]

    qp = _pad_to(q, 1, qc)
    nq = qp.shape[1] // qc
    blocks = qp.reshape(b, nq, qc, h, d).swapaxes(0, 1)  # [nq, B, qc, H, D]
    out = jax.lax.map(one_block, blocks)  # [nq, B, qc, H, D]
    return out.swapaxes(0, 1).reshape(b, nq * qc, h, d)[:, :length]
