"""The on-disk cache of a component's expected parameter tree (`io/param_shapes.py`)."""

import jax
import jax.numpy as jnp
import pytest

from distrifusion_jax.io import components, param_shapes
from distrifusion_jax.tiny import configs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "distrifusion-jax" / "param-shapes"


def shapes(tree):
    return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), tree)


def test_second_load_reads_the_cache_and_equals_the_trace(cache, monkeypatch):
    comp = components.get("vae")
    raw = configs.VAE_CONFIG
    module = comp.make(raw, jnp.float32)
    calls = []
    real = components.Component.target
    monkeypatch.setattr(components.Component, "target", lambda s, m: calls.append(m) or real(s, m))
    first = param_shapes.expected_params(comp, module, raw, jnp.float32)
    second = param_shapes.expected_params(comp, module, raw, jnp.float32)
    assert len(calls) == 1
    assert shapes(second) == shapes(first) == shapes(real(comp, module))
    assert len(list(cache.glob("vae-*.json"))) == 1


def test_other_dtype_or_config_is_another_entry(cache):
    comp = components.get("vae")
    raw = configs.VAE_CONFIG
    f32 = param_shapes.expected_params(comp, comp.make(raw, jnp.float32), raw, jnp.float32)
    bf16 = param_shapes.expected_params(comp, comp.make(raw, jnp.bfloat16), raw, jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(f32)} == {jnp.dtype(jnp.float32)}
    assert {a.dtype for a in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    wider = {**raw, "latent_channels": 8}
    w = param_shapes.expected_params(comp, comp.make(wider, jnp.float32), wider, jnp.float32)
    assert shapes(w) != shapes(f32)
    assert len(list(cache.glob("vae-*.json"))) == 3


def test_a_corrupt_entry_is_traced_again(cache):
    comp = components.get("vae")
    raw = configs.VAE_CONFIG
    module = comp.make(raw, jnp.float32)
    good = param_shapes.expected_params(comp, module, raw, jnp.float32)
    (entry,) = cache.glob("vae-*.json")
    entry.write_text("{not json")
    assert shapes(param_shapes.expected_params(comp, module, raw, jnp.float32)) == shapes(good)
