"""Chunked online-softmax and blocked (CPU) attention equal XLA's (fp32, reordered sums only:
1e-6 relative), with padding, key masks and fully masked key blocks; `auto` picks by backend
(`choose_impl`) and the size of the logits, and the environment variable overrides it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrifusion_jax.models import attention_ops
from distrifusion_jax.models.attention_ops import (
    attention,
    blocked_attention,
    choose_impl,
    chunked_attention,
)


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


@pytest.mark.parametrize("length,s,qc", [(100, 70, 32), (64, 64, 64), (7, 130, 4)])
@pytest.mark.parametrize("mask_shape", [None, (1, 1, 1), (2, 3, 1)])
def test_blocked_equals_xla(length, s, qc, mask_shape):
    q, k, v = _qkv(length, 2, length, s, 3, 8)
    keys, mask = np.arange(s), None
    if mask_shape == (1, 1, 1):  # the first 30 keys hidden
        mask = jnp.asarray(keys >= 30)[None, None, None, :]
    elif mask_shape:  # every third key hidden, from an offset b + h
        b, h = np.indices((2, 3))
        mask = jnp.asarray((keys + b[..., None] + h[..., None]) % 3 > 0)[:, :, None, :]
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    got = jax.jit(blocked_attention, static_argnums=4)(q, k, v, mask, qc)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert got.shape == want.shape and err <= 1e-6, err


def test_choose_impl():
    big = 2 * attention_ops.AUTO_CHUNK_BYTES
    assert choose_impl("cpu", 1024) == choose_impl("cpu", big) == "blocked"
    for accelerator in ("gpu", "cuda", "rocm", "tpu"):
        assert choose_impl(accelerator, 1024) == "xla"  # cuDNN / XLA's fused attention
        assert choose_impl(accelerator, big) == "chunked"


def _spy(monkeypatch) -> list[str]:
    calls = []
    for name in ("blocked_attention", "chunked_attention"):
        fake = lambda *a, name=name: calls.append(name) or a[0]
        monkeypatch.setattr(attention_ops, name, fake)
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **kw: calls.append("xla") or real(*a, **kw))  # fmt: skip
    return calls


def test_auto_follows_backend_and_env(monkeypatch):
    q, k, v = _qkv(0, 1, 64, 64, 2, 8)
    calls = _spy(monkeypatch)
    monkeypatch.delenv(attention_ops.ENV, raising=False)
    attention(q, k, v)  # this test runs on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    attention(q, k, v)  # 32 KB of logits
    monkeypatch.setattr(attention_ops, "AUTO_CHUNK_BYTES", 1024)
    attention(q, k, v)
    assert calls == ["blocked_attention", "xla", "chunked_attention"]
    calls.clear()
    for forced in ("xla", "blocked", "chunked"):
        monkeypatch.setenv(attention_ops.ENV, forced)
        attention(q, k, v)
    attention(q, k, v, impl="xla")  # an explicit impl wins over the environment
    assert calls == ["xla", "blocked_attention", "chunked_attention", "xla"]
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, impl="flash")
    monkeypatch.setenv(attention_ops.ENV, "flash")
    with pytest.raises(ValueError, match=attention_ops.ENV):
        attention(q, k, v)


def test_blocked_hands_query_masks_to_xla(monkeypatch):
    q, k, v = _qkv(1, 1, 16, 16, 2, 8)
    calls = _spy(monkeypatch)
    attention(q, k, v, jnp.tril(jnp.ones((16, 16), bool))[None, None], impl="blocked")
    assert calls == ["xla"]
