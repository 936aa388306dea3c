"""How long a user waits for `generate.py` (`benchmark.py --startup`).

Each run is a fresh `python scripts/generate.py` process on this machine (the shipped model
unless `--model`), timed from process start to exit, in this order:

- `cold`: an empty compile cache (every program compiles, the cache is filled);
- `warm`: the same command again (programs come from the cache);
- `warm, N prompts`: `--prompts-file` with N prompts (the 10 class prompts), one PNG each;
- `no cache`: `--no-compile-cache` (every program compiles, nothing is stored).

Reported per run: wall seconds, and the command's own split of its first image (compile beyond
a steady step, denoise, prompt encoding, decode). Runs are sequential in one process tree;
ratios between them are from one run of this script. JSON: {"kind": "startup", "model": str,
"cpu_count": int, "load_average_before": [float], "runs": [{"name": str, "wall_s": float,
"images": int, "compile_s": float, "denoise_s": float, "encode_s": float, "decode_s": float}],
"second_run_s": float, "prompts": int, "prompts_vs_one": float}.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GENERATE = Path(__file__).resolve().parents[2] / "scripts" / "generate.py"
_SPLIT = re.compile(
    r"compile ~([\d.]+) s.*denoise ([\d.]+) s, encode ([\d.]+) s, decode ([\d.]+) s"
)


def _run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(GENERATE), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"generate.py {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return wall, done.stdout


def measure(model: Path, prompts: Sequence[str]) -> dict[str, Any]:
    """Run the four commands (module docstring) on `model` and return the JSON result;
    `prompts` fill the prompts file (10 for the reported ratio)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        work = Path(tmp)
        prompts_file = work / "prompts.txt"
        prompts_file.write_text("".join(f"{p}\n" for p in prompts))
        cache = ["--compile-cache", str(work / "cache")]
        runs = [
            ("cold", cache),
            ("warm", cache),
            (f"warm, {len(prompts)} prompts", [*cache, "--prompts-file", str(prompts_file)]),
            ("no cache", ["--no-compile-cache"]),
        ]
        rows = []
        for i, (name, extra) in enumerate(runs):
            out = ["--model", str(model), "--output", str(work / f"run{i}.png")]
            wall, stdout = _run([*out, *extra], env)
            splits = _SPLIT.findall(stdout)
            compile_s, denoise_s, encode_s, decode_s = map(float, splits[0])
            rows.append(
                {
                    "name": name,
                    "wall_s": wall,
                    "images": len(splits),
                    "compile_s": compile_s,
                    "denoise_s": denoise_s,
                    "encode_s": encode_s,
                    "decode_s": decode_s,
                }
            )
    by = {r["name"]: r for r in rows}
    return {
        "kind": "startup",
        "model": str(model),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "runs": rows,
        "second_run_s": by["warm"]["wall_s"],
        "prompts": len(prompts),
        "prompts_vs_one": by[f"warm, {len(prompts)} prompts"]["wall_s"] / by["warm"]["wall_s"],
    }


def table(result: dict[str, Any]) -> str:
    """A markdown table of `measure`'s result."""
    lines = [
        "| run | images | wall s | compile s | denoise s | encode s | decode s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['name']} | {r['images']} | {r['wall_s']:.1f} | {r['compile_s']:.2f} | "
            f"{r['denoise_s']:.2f} | {r['encode_s']:.2f} | {r['decode_s']:.2f} |"
        )
    lines.append(
        f"\nsecond run {result['second_run_s']:.1f} s; {result['prompts']} prompts / 1 prompt "
        f"{result['prompts_vs_one']:.2f}x (warm cache)"
    )
    return "\n".join(lines)
