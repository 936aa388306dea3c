"""Scaled dot-product attention, chosen per backend: XLA's fused op, query blocks, or chunked.

`attention(q, k, v, mask)` computes `softmax(q k^T / sqrt(D)) v` with fp32 logits, like
`jax.nn.dot_product_attention`. Three implementations:

- "xla": `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU where it applies, XLA's
  otherwise). On CPU (jax 0.10, XLA's CPU backend) it is 4-12x slower than torch's SDPA: the
  head-batched `dot_general`s `[B, H, L, S]` run as many small GEMMs with no threading across
  them, and the `[B, H, L, S]` logits make several passes through memory.
- "blocked" (the CPU choice): heads flattened into one leading axis, `[B*H, L, D]`, mapped over
  (`lax.map`), and each head's queries in blocks of `q_chunk` mapped over too, so every matmul
  is a plain 2-D GEMM `[qc, D] x [D, S]` that XLA's CPU runtime runs on all its threads, and a
  block's logits `[qc, S]` (capped at `BLOCK_BYTES`) stay in cache for the max, exp, sum and
  the second GEMM. Exact softmax per block (all keys at once): the same sums as XLA's, ordered
  differently. On 2 cores (batch 2, fp32, 4096 tokens x 10 heads x 64): 0.34 s, vs 2.28 s
  for "xla" and 0.53 s for torch's SDPA (results/README.md).
- "chunked": query blocks mapped, key blocks scanned with a running max and sum (the
  flash-attention recurrence), so a block's logits are `[B, H, q_chunk, k_chunk]`. On a row
  band the keys are the whole image (or a PCPP window), so the logits of the first attention
  level are large: at 3840^2 on 8 bands 7,200 queries x 57,600 keys x 10 heads, 16.6 GB in
  fp32 per image; chunked never holds them.

`impl="auto"` picks by backend (`choose_impl`; the backend is `platform.trace_platform()` when the
function is traced): "blocked" on CPU, else "chunked" when the logits of one call exceed
`AUTO_CHUNK_BYTES` and "xla" below. The environment variable `DISTRIFUSION_ATTENTION`
(`xla`, `chunked`, `blocked`) overrides "auto", for tests and before/after benchmarks;
`platform.attention_traced_as(impl)` overrides both (cost counting traces "xla").
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from distrifusion_jax.platform import forced_attention, trace_platform

IMPLS = ("auto", "xla", "chunked", "blocked")
ENV = "DISTRIFUSION_ATTENTION"  # forces the implementation "auto" would pick
AUTO_CHUNK_BYTES = 1 << 30  # fp32 logits of one attention call above which "auto" chunks
BLOCK_Q = 512  # "blocked": queries per block, halved while `[qc, S]` fp32 exceeds BLOCK_BYTES
BLOCK_BYTES = 1 << 26
_NEG = -1e30  # masked logit: finite, so a block with no visible key gives no NaN


def choose_impl(backend: str, logits_bytes: int) -> str:
    """What "auto" runs on `backend` ("cpu", "gpu", "tpu", ...) for `logits_bytes` of fp32
    logits `[B, H, L, S]`: "blocked" on CPU, "chunked" above `AUTO_CHUNK_BYTES`, else "xla"."""
    if backend == "cpu":
        return "blocked"
    return "chunked" if logits_bytes > AUTO_CHUNK_BYTES else "xla"


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

    `mask`: broadcastable to `[B, H, L, S]`, True where a key is visible, or None ("chunked"
    and "blocked" take key masks `[.., .., 1, S]`; "blocked" hands other masks to "xla").
    `q_chunk`, `k_chunk`: block sizes of "chunked" ("blocked" uses `BLOCK_Q`).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {list(IMPLS)}.")
    b, length, h, _ = q.shape
    s = k.shape[1]
    if impl == "auto":
        impl = (
            forced_attention()
            or os.environ.get(ENV)
            or choose_impl(trace_platform(), 4 * b * h * length * s)
        )
        if impl not in IMPLS[1:]:
            raise ValueError(f"{ENV}={impl!r}; choose one of {list(IMPLS[1:])}.")
    if impl == "blocked" and (mask is None or mask.shape[-2] == 1):
        return blocked_attention(q, k, v, mask)
    if impl == "chunked":
        return chunked_attention(q, k, v, mask, q_chunk, k_chunk)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def blocked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, q_chunk: int = BLOCK_Q
) -> jax.Array:
    """Per head, per block of `q_chunk` queries, an exact softmax over all keys (2-D GEMMs);
    fp32 logits and sums. Shapes as `attention`; `mask` a key mask `[.., .., 1, S]` or None."""
    b, length, h, d = q.shape
    s = k.shape[1]
    qc = min(q_chunk, length)
    while qc > 8 and 4 * qc * s > BLOCK_BYTES:
        qc //= 2
    heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)  # [B*H, L, D]
    qp = _pad_to(heads(q), 1, qc)
    nq = qp.shape[1] // qc
    qb = qp.reshape(b * h, nq, qc, d)  # [B*H, nq, qc, D]
    if mask is None:
        mb = jnp.ones((b * h, s), bool)
    else:
        mb = jnp.broadcast_to(mask, (b, h, 1, s)).reshape(b * h, s)  # [B*H, S]
    scale = 1.0 / math.sqrt(d)
    contract_d = (((1,), (1,)), ((), ()))

    def one_head(args: tuple[jax.Array, ...]) -> jax.Array:
        qh, kh, vh, mh = args  # [nq, qc, D], [S, D], [S, D], [S]

        def one_block(x: jax.Array) -> jax.Array:  # [qc, D]
            logits = jax.lax.dot_general(x, kh, contract_d, preferred_element_type=jnp.float32)
            logits = logits * scale  # [qc, S]
            if mask is not None:
                logits = jnp.where(mh, logits, _NEG)
            p = jnp.exp(logits - logits.max(-1, keepdims=True))
            pv = jnp.dot(p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)  # [qc, D]
            return (pv / p.sum(-1, keepdims=True)).astype(q.dtype)

        return jax.lax.map(one_block, qh)  # [nq, qc, D]

    out = jax.lax.map(one_head, (qb, heads(k), heads(v), mb))  # [B*H, nq, qc, D]
    out = out.reshape(b, h, nq * qc, d)[:, :, :length]
    return out.transpose(0, 2, 1, 3)  # [B, L, H, D]


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
