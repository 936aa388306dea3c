"""distrifusion_jax/cli/generate.py (scripts/generate.py): writes a PNG with its settings; every bad input is one line on stderr,
a non-zero exit and no output file; two local processes give the one-process image."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distrifusion_jax.cli import generate
from distrifusion_jax.cli.jobs import make_jobs, read_prompts_file
from distrifusion_jax.eval.launcher import free_port

REPO = Path(__file__).resolve().parents[1]

FAST = ["--steps", "3", "--warmup-steps", "1"]


@pytest.mark.slow
def test_writes_png_with_metadata(tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = generate.main(
        [
            "--model",
            str(tiny_sdxl.root),
            "--output",
            str(out),
            "--patches",
            "4",
            "--cfg-split",
            "--seed",
            "7",
            "--pcpp",
            "--fused-exchange",
            *FAST,
        ]
    )
    assert rc == 0
    img = Image.open(out)
    assert img.size == (64, 64)
    assert img.text["prompt"] == generate.DEFAULT_PROMPT and img.text["seed"] == "7"
    parallel = json.loads(img.text["parallel"])
    assert parallel["patches"] == 4 and parallel["cfg_split"] is True
    assert parallel["pcpp"] == 0.3 and parallel["fused_exchange"] is True
    printed = capsys.readouterr().out
    assert "ms/step" in printed and "compile" in printed


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--scheduler", "lms"], "Unknown scheduler"),
        (["--height", "66"], "divisible"),
        (["--width", "63"], "multiples"),
        (["--patches", "16"], "devices"),
        (["--patches", "8", "--height", "16"], "patches"),
        (["--mode", "full_sync", "--cfg-split", "--guidance", "1.0"], "guidance"),
        (["--pcpp", "1.5"], "0 <= p <= 1"),
        (["--mode", "full_sync", "--patches", "2", "--pcpp"], "displaced"),
        (["--patches", "2", "--compress", "int3"], "unknown compress codec"),
        (["--mode", "full_sync", "--patches", "2", "--compress", "int8"], "sends nothing"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_input_one_line_no_file(tiny_sdxl, tmp_path, capsys, extra, message):
    out = tmp_path / "img.png"
    args = ["--model", str(tiny_sdxl.root), "--output", str(out), *FAST, *extra]
    rc = generate.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "img.png"
    out.write_bytes(b"keep me")
    rc = generate.main(["--model", str(tiny_sdxl.root), "--output", str(out), *FAST])
    assert rc != 0 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_prompts_file_lines(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# a comment\na red dress\n\na blue coat\t42\n  a bag  \n")
    assert read_prompts_file(f, 10) == [("a red dress", 10), ("a blue coat", 42), ("a bag", 12)]
    jobs = make_jobs("unused", 10, tmp_path / "out.png", 2, f)
    assert [j.paths[1].name for j in jobs] == ["out-000-1.png", "out-001-1.png", "out-002-1.png"]
    for text, message in [("a dress\tseven\n", "not an integer"), ("# only\n", "no prompts")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompts_file(f, 0)


def test_prompts_file_bad_input(tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "out" / "img.png"
    out.parent.mkdir()
    for prompts, message in [(tmp_path / "missing.txt", "does not exist"), (None, "seed")]:
        if prompts is None:
            prompts = tmp_path / "bad.txt"
            prompts.write_text("a dress\tx\n")
        args = ["--model", str(tiny_sdxl.root), "--output", str(out), "--prompts-file"]
        assert generate.main([*args, str(prompts), *FAST]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_prompts_file_one_png_per_line(tiny_sdxl, tmp_path):
    """Each line's image has its own metadata and equals a single-prompt run."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dress\na blue coat\t42\n")
    model = ["--model", str(tiny_sdxl.root), *FAST]
    rc = generate.main(
        [*model, "--prompts-file", str(prompts), "--output", str(tmp_path / "m.png")]
    )
    assert rc == 0
    first, second = Image.open(tmp_path / "m-000.png"), Image.open(tmp_path / "m-001.png")
    assert (first.text["prompt"], first.text["seed"]) == ("a red dress", "0")
    assert (second.text["prompt"], second.text["seed"]) == ("a blue coat", "42")
    single = tmp_path / "one.png"
    args = ["--prompt", "a blue coat", "--seed", "42", "--output", str(single)]
    assert generate.main([*model, *args]) == 0
    assert np.array_equal(np.asarray(second), np.asarray(Image.open(single)))


@pytest.mark.slow
def test_compile_cache_folder(tmp_path):
    """The compile cache is written where --compile-cache says; --no-compile-cache writes none."""
    cmd = [sys.executable, str(REPO / "scripts" / "generate.py"), "--steps", "2"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for extra, cache in [([], tmp_path / "cache"), (["--no-compile-cache"], tmp_path / "none")]:
        out = tmp_path / f"{cache.name}.png"
        args = [*cmd, "--compile-cache", str(cache), "--output", str(out), *extra]
        run = subprocess.run(
            args, check=False, env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "cache").iterdir())) >= 3  # the step programs, encoders, decoder
    assert not (tmp_path / "none").exists()


def test_tokenizer_without_torch_prints_no_banner():
    """transformers without PyTorch prints a banner on import; we only use its tokenizer."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from distrifusion_jax.prompt import load_clip_tokenizer\n"
        "from distrifusion_jax.tiny import MODEL_DIR\n"
        "load_clip_tokenizer(MODEL_DIR / 'tokenizer')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "PyTorch was not found" not in run.stderr + run.stdout
    bare = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; import transformers"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert "PyTorch was not found" in bare.stderr  # the banner this guards against


@pytest.mark.slow
def test_two_processes_equal_one(tiny_sdxl, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) == 1 process x 8 devices."""
    common = [
        sys.executable,
        str(REPO / "scripts" / "generate.py"),
        "--model",
        str(tiny_sdxl.root),
        "--patches",
        "4",
        "--cfg-split",
        *FAST,
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                *common,
                "--output",
                str(tmp_path / f"multi{i}.png"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert not (tmp_path / "multi1.png").exists()  # only process 0 writes
    env8 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    single = subprocess.run(
        [*common, "--output", str(tmp_path / "one.png")],
        env=env8,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr
    a = np.asarray(Image.open(tmp_path / "multi0.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "one.png"), np.int16)
    assert np.abs(a - b).max() <= 1
