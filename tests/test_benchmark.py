"""scripts/benchmark.py model mode: FLOPs split 1/n, the three exchange counts agree, JSON rows."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import benchmark  # noqa: E402


def test_model_mode_rows(tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = benchmark.main(["--model", str(tiny_sdxl.root), "--patches", "1", "2", "4", "--steps",
                         "5", "--warmup-steps", "1", "--json", str(out), "--no-plots"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "model" and [r["n"] for r in res["rows"]] == [1, 2, 4]
    one, *parallel = res["rows"]
    assert one["exchanged_elements"] == 0 and one["state_bytes"] == 0
    for r in parallel:
        # Every layer splits by rows; only the replicated embeddings and text K,V do not.
        assert abs(r["flops_ratio_vs_1"] * r["n"] - 1) < 0.03, r["flops_ratio_vs_1"]
        assert r["compiled_exchange"]["elements"] == r["exchanged_elements"] > 0
        assert sum(r["analytic_elements"].values()) == r["exchanged_elements"]
        assert r["state_bytes"] > 0 and r["peak_bytes"] > 0
        assert r["median_step_seconds"] > 0 and r["end_to_end_seconds"] > 0
    assert "HLO k el" in capsys.readouterr().out


def test_mode_labels():
    """The script's spelled-out modes are the library's; bad labels name the fix."""
    from distrifusion_jax.parallel.config import MODES

    assert benchmark.MODES == MODES
    assert benchmark.mode_fields("stale_gn+fused") == {"mode": "stale_gn", "fused_exchange": True}
    assert benchmark.mode_fields("full_sync") == {"mode": "full_sync", "fused_exchange": False}
    for bad in ("corrected", "corrected_async_gn+fast"):
        with pytest.raises(ValueError, match=r"\+fused"):
            benchmark.mode_fields(bad)
