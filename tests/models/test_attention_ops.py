"""Chunked online-softmax attention equals XLA's (fp32, reordered sums only: 1e-6 relative),
with padding, key masks and fully masked key blocks; `auto` picks by the size of the logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrifusion_jax.models import attention_ops
from distrifusion_jax.models.attention_ops import attention, chunked_attention


def _qkv(seed, b, length, s, h, d):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for n in (length, s, s)]


@pytest.mark.parametrize("length,s,qc,kc", [(100, 70, 32, 16), (64, 64, 64, 64), (7, 130, 4, 50)])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_xla(length, s, qc, kc, masked):
    q, k, v = _qkv(length, 2, length, s, 3, 8)
    mask = None
    if masked:  # the first 30 keys hidden: a whole key block is masked when kc <= 30
        mask = jnp.asarray(np.arange(s) >= 30)[None, None, None, :]
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    got = chunked_attention(q, k, v, mask, q_chunk=qc, k_chunk=kc)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert got.shape == want.shape and err <= 1e-6, err


def test_auto_chunks_only_large_logits(monkeypatch):
    q, k, v = _qkv(0, 1, 64, 64, 2, 8)
    calls = []
    monkeypatch.setattr(attention_ops, "chunked_attention", lambda *a: calls.append(1) or a[0])
    attention(q, k, v)  # 32 KB of logits
    assert not calls
    monkeypatch.setattr(attention_ops, "AUTO_CHUNK_BYTES", 1024)
    attention(q, k, v)
    assert calls == [1]
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, impl="flash")
