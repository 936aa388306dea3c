"""scripts/benchmark.py model mode: FLOPs split 1/n, the three exchange counts agree, JSON rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distrifusion_jax.eval.benchmark_model import model_rows, print_model_table
from distrifusion_jax.eval.mode_labels import mode_fields

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_model_mode_rows(tiny_sdxl, capsys):
    # n = 2 only (CI time); the VAE counts at n = 4: test_vae_exchange_three_counts_agree
    rows = model_rows(str(tiny_sdxl.root), [1, 2], steps=5, warmup_steps=1)
    assert [r["n"] for r in rows] == [1, 2]
    one, *parallel = rows
    assert one["exchanged_elements"] == 0 and one["state_bytes"] == 0
    assert one["compile_and_first_steps_seconds"] > one["median_step_seconds"] > 0
    for r in parallel:
        # Every layer splits by rows; only the replicated embeddings and text K,V do not.
        assert abs(r["flops_ratio_vs_1"] * r["n"] - 1) < 0.03, r["flops_ratio_vs_1"]
        assert r["compiled_exchange"]["elements"] == r["exchanged_elements"] > 0
        assert sum(r["analytic_elements"].values()) == r["exchanged_elements"]
        assert r["state_bytes"] > 0 and r["peak_bytes"] > 0
        assert r["median_step_seconds"] > 0 and r["end_to_end_seconds"] > 0
        for name, v in r["vae"].items():  # the band-parallel VAE: encode and decode
            assert v["compiled_exchange"]["elements"] == v["exchanged_elements"] > 0, name
            assert sum(v["analytic_elements"].values()) == v["exchanged_elements"], name
    assert all(v["exchanged_elements"] == 0 for v in one["vae"].values())
    res = {
        "model": "tiny",
        "steps": 5,
        "scheduler": "ddim",
        "mode": "corrected_async_gn",
        "warmup_steps": 1,
        "cfg_split": False,
        "device_note": "fake",
        "rows": rows,
    }
    print_model_table(res)
    out = capsys.readouterr().out
    assert "HLO k el" in out and " encode " in out and " decode " in out


@pytest.mark.parametrize("n", [2, 4])
def test_vae_exchange_three_counts_agree(tiny_sdxl, n):
    """The VAE encode and decode on n row bands: jaxpr, compiled HLO and formula agree."""
    from distrifusion_jax.eval.benchmark_model import vae_rows
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    pipe = DistriSDXLPipeline.from_pretrained(tiny_sdxl.root, parallel=ParallelConfig(patches=n))
    for name, v in vae_rows(pipe, 64, 64).items():
        formula = sum(v["analytic_elements"].values())
        print(f"[vae {name}] n={n}: jaxpr {v['exchanged_elements']:.0f} HLO "
              f"{v['compiled_exchange']['elements']:.0f} formula {formula:.0f} elements")  # fmt: skip
        assert v["compiled_exchange"]["elements"] == v["exchanged_elements"] == formula > 0


@pytest.mark.slow
def test_script_writes_json(tmp_path):
    """The command line: flags, JSON schema and table (one n, so it stays quick)."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark.py"),
            "--patches",
            "1",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
            "--cpu-devices",
            "1",
            "--json",
            str(out),
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["kind"] == "model" and [r["n"] for r in res["rows"]] == [1]
    assert "step ms" in run.stdout


def test_mode_labels():
    """Labels are the library's modes, optionally `+fused`; bad labels name the fix."""
    assert mode_fields("stale_gn+fused") == {
        "mode": "stale_gn",
        "fused_exchange": True,
        "compress": None,
    }
    assert mode_fields("full_sync")["fused_exchange"] is False
    assert mode_fields("corrected_async_gn+fused:residual+int4") == {
        "mode": "corrected_async_gn",
        "fused_exchange": True,
        "compress": "residual+int4",
    }
    assert mode_fields("corrected_async_gn:bf16")["compress"] == "bf16"
    for bad in ("corrected", "corrected_async_gn+fast", "corrected_async_gn:"):
        with pytest.raises(ValueError, match=r"\+fused"):
            mode_fields(bad)
    with pytest.raises(ValueError, match="int4"):  # the message lists the codecs
        mode_fields("corrected_async_gn:int3")


def test_throttled_loopback_refuses_cleanly():
    """No rate: nothing changes. A rate tc cannot apply (not root, no tc, or a bad rate) is a
    RuntimeError that says how to fix it, and leaves no qdisc behind."""
    import shutil
    import subprocess

    from distrifusion_jax.eval.scaling import throttled_loopback

    with throttled_loopback(None):
        pass
    with pytest.raises(RuntimeError, match="root|failed"), throttled_loopback("not-a-rate"):
        pass
    if shutil.which("tc"):
        shown = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True,
                               text=True, check=False).stdout  # fmt: skip
        assert "tbf" not in shown


def test_two_node_projection():
    """The boundary device gets 8/15 of its K,V and one halo over the inter-node link; a codec
    that shrinks the bytes turns a link-bound step compute-bound."""
    from distrifusion_jax.eval.benchmark_sdxl import PAPER_ONE_GPU_STEP_S, two_node_projection

    gb = 1e9
    row = {"resolution": 2048, "n": 16, "flops_ratio_vs_1": 0.07,
           "codec_bytes": {"none": {"all_gather@patch": 3 * gb, "ppermute@patch": 0.2 * gb},
                           "int4": {"all_gather@patch": 0.75 * gb, "ppermute@patch": 0.05 * gb}}}  # fmt: skip
    proj = two_node_projection([row, {**row, "n": 8}])  # n = 8: one node, not projected
    assert [p["codec"] for p in proj] == ["none", "int4"]
    none, int4 = proj
    assert none["inter_node_bytes"] == pytest.approx(3 * gb * 8 / 15 + 0.1 * gb)
    assert none["inter_node_bytes"] + none["intra_node_bytes"] == pytest.approx(3.2 * gb)
    compute = PAPER_ONE_GPU_STEP_S[2048] * 0.07
    assert none["comm_ms"] == pytest.approx(none["inter_node_bytes"] / 25e9 * 1e3)
    assert not none["compute_bound"] and int4["compute_bound"]
    assert int4["speedup_vs_1"] == pytest.approx(1 / 0.07)
    assert none["compute_ms"] == pytest.approx(compute * 1e3)


def test_controlnet_rows(capsys):
    """`--sdxl-shapes --controlnets` on tiny configs: rows with | without a ControlNet, n = 1, 2;
    the ControlNet adds FLOPs, exchange (jaxpr = formula) and stale state; the table prints."""
    import jax.numpy as jnp

    from distrifusion_jax.eval.benchmark_controlnet import controlnet_rows, print_table
    from distrifusion_jax.models import UNetConfig
    from distrifusion_jax.models.controlnet_config import ControlNetConfig
    from tests.controlnet_fixtures import TINY_SDXL_CONTROLNET_CONFIG
    from tests.tiny import TINY_SDXL_UNET_CONFIG

    rows = controlnet_rows(
        [64], [2], unet=UNetConfig.from_diffusers(dict(TINY_SDXL_UNET_CONFIG)),
        controlnet=ControlNetConfig.from_diffusers(TINY_SDXL_CONTROLNET_CONFIG), dtype=jnp.float32,
    )  # fmt: skip
    assert [(r["resolution"], r["n"], r["controlnets"]) for r in rows] == [(64, 1, 1), (64, 2, 1)]
    one, two = rows
    assert (
        one["with"]["exchanged_elements"] == 0 and one["with_over_without"]["state_bytes"] is None
    )
    assert one["with"]["flops_ratio_vs_1"] == 1 and one["with_over_without"]["flops"] > 1
    for key in ("flops", "exchanged_bytes", "state_bytes"):
        assert two["with_over_without"][key] > 1, key
    for v in (two["without"], two["with"]):
        assert sum(v["analytic_elements"].values()) == v["exchanged_elements"] > 0
    print_table(rows)
    assert "with 1 ControlNet" in capsys.readouterr().out
