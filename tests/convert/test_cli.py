"""`python -m convert`: every bad input is one stderr line, a non-zero exit, and no DST."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distrifusion_jax.cli.convert import main
from distrifusion_jax.io.convert import convert

WEIGHTS = "diffusion_pytorch_model.safetensors"
REPO = Path(__file__).resolve().parents[2]


def unet_copy(tiny_sdxl, tmp_path: Path, edit=None, edit_config=None) -> Path:
    """A copy of the tiny unet/ folder, its state dict and config edited in place."""
    folder = tmp_path / "src" / "unet"
    shutil.copytree(tiny_sdxl.root / "unet", folder)
    if edit is not None:
        sd = dict(load_file(folder / WEIGHTS))
        edit(sd)
        save_file(sd, folder / WEIGHTS)
    if edit_config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        edit_config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_failed_cleanly(capsys, dst: Path, code: int, err: str, exit_code: int, *words: str):
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not dst.exists()
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def test_missing_src(capsys, tmp_path):
    dst = tmp_path / "out"
    code, _, err = run_main(capsys, tmp_path / "nope", dst)
    assert_failed_cleanly(capsys, dst, code, err, 2, "does not exist", "diffusers model folder")


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    dst = tmp_path / "out"
    code, _, err = run_main(capsys, tmp_path / "empty", dst)
    assert_failed_cleanly(capsys, dst, code, err, 2, "no config.json", "model_index.json")


def test_truncated_safetensors(capsys, tiny_sdxl, tmp_path):
    src = unet_copy(tiny_sdxl, tmp_path)
    data = (src / WEIGHTS).read_bytes()
    (src / WEIGHTS).write_bytes(data[: len(data) // 2])
    dst = tmp_path / "out"
    code, _, err = run_main(capsys, src, dst)
    assert_failed_cleanly(capsys, dst, code, err, 1, "truncated or corrupt", WEIGHTS)


def test_missing_key(capsys, tiny_sdxl, tmp_path):
    src = unet_copy(tiny_sdxl, tmp_path, edit=lambda sd: sd.pop("conv_out.bias"))
    dst = tmp_path / "out"
    code, _, err = run_main(capsys, src, dst)
    assert_failed_cleanly(capsys, dst, code, err, 1, "1 missing key(s): conv_out/bias")


def test_extra_key(capsys, tiny_sdxl, tmp_path):
    src = unet_copy(tiny_sdxl, tmp_path, edit=lambda sd: sd.update(extra_thing=torch.ones(2)))
    dst = tmp_path / "out"
    code, _, err = run_main(capsys, src, dst)
    assert_failed_cleanly(capsys, dst, code, err, 1, "1 unexpected key(s): extra_thing")


def test_wrong_shape(capsys, tiny_sdxl, tmp_path):
    src = unet_copy(
        tiny_sdxl, tmp_path, edit=lambda sd: sd.update({"conv_in.bias": torch.zeros(33)})
    )
    dst = tmp_path / "out"
    code, _, err = run_main(capsys, src, dst)
    assert_failed_cleanly(capsys, dst, code, err, 1, "mis-shaped", "conv_in.bias", "(33,)")


def test_unsupported_block_type(capsys, tiny_sdxl, tmp_path):
    def edit(cfg):
        cfg["down_block_types"] = ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]

    src = unet_copy(tiny_sdxl, tmp_path, edit_config=edit)
    dst = tmp_path / "out"
    code, _, err = run_main(capsys, src, dst)
    assert_failed_cleanly(capsys, dst, code, err, 1, "SimpleCrossAttnDownBlock2D", "supported")


def test_pickle_needs_flag(capsys, tiny_sdxl, tmp_path):
    src = tmp_path / "src" / "unet"
    tiny_sdxl.unet.save_pretrained(src, safe_serialization=False)
    dst = tmp_path / "out"
    code, _, err = run_main(capsys, src, dst)
    assert_failed_cleanly(capsys, dst, code, err, 2, "pickle", "arbitrary code", "--allow-pickle")
    code, _, err = run_main(capsys, src, dst, "--allow-pickle")
    assert code == 0 and (dst / "unet" / "params").is_dir(), err


def test_variant_missing_names_what_is_there(capsys, tiny_sdxl, tmp_path):
    src = unet_copy(tiny_sdxl, tmp_path)
    (src / WEIGHTS).rename(src / "diffusion_pytorch_model.fp16.safetensors")
    dst = tmp_path / "out"
    code, _, err = run_main(capsys, src, dst)
    assert_failed_cleanly(capsys, dst, code, err, 1, "fp16.safetensors", "--variant fp16")
    code, _, err = run_main(capsys, src, dst, "--variant", "fp16")
    assert code == 0, err


def test_existing_dst_needs_force(capsys, tiny_sdxl, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    code, _, err = run_main(capsys, tiny_sdxl.root / "unet", dst)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--force" in err
    assert (dst / "keep.txt").read_text() == "old"

    # --force with a failing conversion keeps the old DST untouched
    bad = unet_copy(tiny_sdxl, tmp_path, edit=lambda sd: sd.pop("conv_out.bias"))
    code, _, err = run_main(capsys, bad, dst, "--force")
    assert code == 1 and (dst / "keep.txt").read_text() == "old"

    code, _, err = run_main(capsys, tiny_sdxl.root / "unet", dst, "--force", "--dtype", "bfloat16")
    assert code == 0, err
    assert not (dst / "keep.txt").exists() and (dst / "unet" / "params").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_usage_errors_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["only-src"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["a", "b", "--dtype", "float64"])
    assert e.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGTERM"])
def test_interrupted_run_leaves_nothing(capsys, tiny_sdxl, tmp_path, monkeypatch, how):
    """Interrupted while saving the second component: no DST, no temporary folder."""
    from distrifusion_jax.io import checkpoint

    save = checkpoint.save_params
    calls = []

    def interrupted_save(directory, params):
        calls.append(directory)
        save(directory, params)  # the first component is written in full
        if len(calls) == 2:
            if how == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_params", interrupted_save)
    dst = tmp_path / "out"
    if how == "SIGTERM":
        with pytest.raises(SystemExit) as e:
            main([str(tiny_sdxl.root), str(dst)])
        assert e.value.code == 128 + signal.SIGTERM
    else:
        assert main([str(tiny_sdxl.root), str(dst)]) == 130
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_entry_point_subprocess(tiny_sdxl, tmp_path):
    """The real `python -m convert`: success prints per-component lines; an error one line."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "convert"]
    ok = subprocess.run(
        [*cmd, str(tiny_sdxl.root / "unet"), str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "unet: 1,976,516 params" in ok.stdout
    bad = subprocess.run(
        [*cmd, str(tiny_sdxl.root / "unet"), str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        (
            f"convert: error: DST {tmp_path / 'out'} already exists; pass --force to replace it, "
            "or another DST"
        )
    ]


def test_root_reports_skipped_components(tiny_sdxl, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_sdxl.root, src)
    index = json.loads((src / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (src / "model_index.json").write_text(json.dumps(index))
    report = convert(src, tmp_path / "out")
    assert set(report.converted) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert set(report.copied) == {"tokenizer", "tokenizer_2", "scheduler"}
    assert report.skipped == {
        "safety_checker": "stable_diffusion/StableDiffusionSafetyChecker: no converter"
    }
