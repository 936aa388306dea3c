"""Reading tensors: safetensors (bf16, sharded, variants), corrupt files, pickles."""

from __future__ import annotations

import copy

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distrifusion_jax import load_unet
from distrifusion_jax.io import weights
from distrifusion_jax.io.components import COMPONENTS, convert_params
from tests.tiny import TINY_SDXL_UNET_CONFIG


def test_reads_every_dtype_exactly(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2, 3).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    with weights.open_file(tmp_path / "x.safetensors") as src:
        assert sorted(src.keys()) == sorted(tensors)
        for k, t in tensors.items():
            a = src.read(k)
            assert src.shape(k) == tuple(t.shape)
            np.testing.assert_array_equal(a, weights.torch_to_numpy(t))
        assert src.read("bf16").dtype == ml_dtypes.bfloat16


def test_truncated_and_garbage_files_fail_clearly(tmp_path):
    save_file({"a": torch.randn(64, 64)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    for name in ("cut", "junk"):
        with pytest.raises(weights.WeightsError, match="truncated or corrupt"):
            weights.open_file(tmp_path / f"{name}.safetensors")


def test_sharded_variant_equals_cast_torch_weights(tiny_sdxl, tmp_path):
    """`save_pretrained(variant="fp16", max_shard_size=...)`: index + shards, read by variant."""
    folder = tmp_path / "unet"
    half = copy.deepcopy(tiny_sdxl.unet).to(torch.float16)  # the fixture's model stays fp32
    half.save_pretrained(folder, variant="fp16", max_shard_size="2MB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert weights.find_weights(folder, "fp16").name.endswith(".safetensors.index.fp16.json")
    with pytest.raises(weights.WeightsError, match="pass --variant fp16"):
        weights.find_weights(folder)

    _, params = load_unet(folder, variant="fp16")
    _, ref = load_unet(tiny_sdxl.root)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        half = np.asarray(b).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(a), half)


def test_missing_shard_is_named(tiny_sdxl, tmp_path):
    folder = tmp_path / "unet"
    tiny_sdxl.unet.save_pretrained(folder, max_shard_size="2MB")
    shard = max(folder.glob("*-of-*.safetensors"))
    shard.unlink()
    with pytest.raises(weights.WeightsError, match=f"not there: {shard.name}"):
        weights.open_weights(folder)


def test_pickle_refused_then_allowed(tiny_sdxl, tmp_path):
    folder = tmp_path / "unet"
    tiny_sdxl.unet.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(weights.PickleRefused, match="--allow-pickle"):
        weights.open_weights(folder)
    _, params = load_unet(folder, allow_pickle=True)
    _, ref = load_unet(tiny_sdxl.root)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_weights_lists_what_is_there(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(weights.WeightsError, match="no weights files at all"):
        weights.find_weights(tmp_path)


def test_conversion_reads_each_tensor_once(tiny_sdxl):
    from distrifusion_jax.models.unet import UNet2DConditionModel
    from distrifusion_jax.models.unet_config import UNetConfig

    src = weights.open_weights(tiny_sdxl.root / "unet")
    reads: list[str] = []
    read = src.read
    src.read = lambda key: reads.append(key) or read(key)
    module = UNet2DConditionModel(UNetConfig.from_diffusers(TINY_SDXL_UNET_CONFIG))
    convert_params(src, COMPONENTS["unet"], module)
    assert sorted(reads) == sorted(src.keys())
