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
