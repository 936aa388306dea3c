"""`benchmark.py --unet-vs-torch` on the tiny config: the result's fields, and our UNet's output
equal to diffusers' (fp32, same weights: the parity tests' 1e-5 relative bar)."""

import json

import pytest

from distrifusion_jax.eval.unet_vs_torch import unet_vs_torch


def test_tiny_unet_and_one_op():
    res = unet_vs_torch(["tiny"], repeats=1, op_repeats=1, ops=["GroupNorm"], log=lambda s: None)
    res = json.loads(json.dumps(res))  # JSON-ready
    assert res["kind"] == "unet_vs_torch" and res["batch"] == 1 and res["latent"] == [32, 32]
    assert res["torch_threads"] == res["threads"] >= 1
    assert res["attention_impl"] in ("blocked", "xla", "chunked")
    (row,) = res["unet"]
    assert row["config"] == "tiny" and row["params"] > 0
    assert row["ours_s"] > 0 and row["torch_s"] > 0 and row["ours_first_call_s"] > 0
    assert row["ratio"] == pytest.approx(row["ours_s"] / row["torch_s"])
    assert row["rel_l2"] <= 1e-5 and row["max_abs"] <= 1e-4, row
    (op,) = res["ops"]
    assert op["op"].startswith("GroupNorm") and op["ours_s"] > 0 and op["torch_s"] > 0
    assert op["rel_l2"] <= 1e-6, op


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown sizes"):
        unet_vs_torch(["huge"])
