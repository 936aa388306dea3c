"""Convert the tiny SDXL folder, load it back, and compare with diffusers/torch."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from distrifusion_jax import load_component, load_unet
from distrifusion_jax.io import checkpoint
from distrifusion_jax.io.convert import convert
from distrifusion_jax.io.keys import flatten
from tests.tiny import TINY_SDXL_POOLED_DIM, assert_close, nchw_to_nhwc, nhwc_to_nchw, randn


@pytest.fixture(scope="module")
def converted(tiny_sdxl, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "fp32"
    convert(tiny_sdxl.root, dst, "float32")
    return dst


def assert_trees_equal(a, b) -> None:
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_layout_and_manifest(tiny_sdxl, converted):
    index = json.loads((converted / "model_index.json").read_text())
    meta = index[checkpoint.META_KEY]
    assert meta["dtype"] == "float32" and meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["converter_version"]
    assert index["unet"] == ["distrifusion_jax", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert "feature_extractor" not in index
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert (converted / name / "params").is_dir()
        saved = json.loads((converted / name / "config.json").read_text())
        assert saved == json.loads((tiny_sdxl.root / name / "config.json").read_text())
    copied = ("tokenizer/vocab.json", "tokenizer_2/vocab.json", "scheduler/scheduler_config.json")
    for rel in copied:
        assert (converted / rel).read_bytes() == (tiny_sdxl.root / rel).read_bytes()
    # nothing left beside DST
    assert sorted(p.name for p in converted.parent.iterdir()) == ["fp32"]


def test_converted_equals_direct_load(tiny_sdxl, converted):
    _, from_dst = load_unet(converted)
    _, from_root = load_unet(tiny_sdxl.root)
    _, from_folder = load_unet(tiny_sdxl.root / "unet")
    _, from_dst_folder = load_unet(converted / "unet")
    assert_trees_equal(from_dst, from_root)
    assert_trees_equal(from_folder, from_root)
    assert_trees_equal(from_dst_folder, from_root)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(from_dst))


@pytest.mark.parametrize("name", ["vae", "text_encoder", "text_encoder_2"])
def test_other_components_round_trip(tiny_sdxl, converted, name):
    module, from_dst = load_component(converted, name)
    _, from_root = load_component(tiny_sdxl.root, name)
    assert_trees_equal(from_dst, from_root)
    assert (
        type(module).__name__
        == json.loads((tiny_sdxl.root / "model_index.json").read_text())[name][1]
    )


def test_converted_unet_matches_torch(tiny_sdxl, converted):
    module, params = load_unet(converted)
    x = randn(0, 1, 4, 16, 16)  # [B, C, H, W] as torch takes it
    ctx = randn(1, 1, 8, 64)
    pooled = randn(2, 1, TINY_SDXL_POOLED_DIM)
    time_ids = np.array([[32, 32, 0, 0, 32, 32]], np.float32)
    t = 417.0
    with torch.no_grad():
        ref = tiny_sdxl.unet(
            torch.from_numpy(x),
            torch.tensor([t]),
            torch.from_numpy(ctx),
            added_cond_kwargs={
                "text_embeds": torch.from_numpy(pooled),
                "time_ids": torch.from_numpy(time_ids),
            },
        ).sample
    out = jax.jit(module.apply)(
        {"params": params},
        nchw_to_nhwc(x),
        jnp.array([t]),
        ctx,
        {"text_embeds": pooled, "time_ids": time_ids},
    )
    # fp32, 'highest' matmul precision: summation order only.
    assert_close(nhwc_to_nchw(out), ref, max_abs=1e-4, rel_l2=1e-5, label="converted unet vs torch")


def test_bfloat16_conversion(tiny_sdxl, converted, tmp_path):
    dst = tmp_path / "bf16"
    convert(tiny_sdxl.root / "unet", dst, "bfloat16")
    assert json.loads((dst / "model_index.json").read_text())[checkpoint.META_KEY]["dtype"] == (
        "bfloat16"
    )
    module, params = load_unet(dst, dtype=jnp.bfloat16)
    assert module.param_dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _, fp32 = load_unet(converted)
    assert_trees_equal(params, jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), fp32))
    # a bf16 checkpoint restored as fp32 is the exact upcast
    _, up = load_unet(dst, dtype=jnp.float32)
    assert_trees_equal(up, jax.tree.map(lambda a: a.astype(jnp.float32), params))


def test_restore_is_strict(converted, tmp_path):
    """A saved tree that does not fit the config fails with the key named."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(converted / "unet", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["cross_attention_dim"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.ConversionError, match="mis-shaped.*attn2/to_k"):
        load_unet(bad)


def test_restore_in_batches_equals_one_call(converted):
    """Batched (partial) orbax restores give the same tree as one restore of everything."""
    folder = converted / "unet" / "params"
    whole = checkpoint.restore_params(folder, batch_bytes=1 << 40)
    batched = checkpoint.restore_params(folder, batch_bytes=1 << 20)  # ~8 batches
    assert_trees_equal(batched, whole)
    halves = checkpoint.restore_params(folder, dtype=jnp.bfloat16, batch_bytes=1 << 20)
    assert_trees_equal(halves, jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), whole))
