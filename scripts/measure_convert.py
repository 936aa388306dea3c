"""Peak RSS and wall time of `python -m convert` on the full-size SDXL UNet, bf16.

    python scripts/measure_convert.py [--workdir /tmp/sdxl_convert_measure] [--keep] [--no-load]

Each step runs in its own process, one after the other (peak RSS is read per child with
`os.wait4`, so the steps do not mix):
  1. make: diffusers `UNet2DConditionModel(**SDXL config)` built in torch bf16 (random init) and
     `save_pretrained` to WORKDIR/src/unet: ~25-60 s, 5.1 GB on disk, ~5.6 GB RSS;
  2. convert: `python -m convert WORKDIR/src/unet WORKDIR/dst --dtype bfloat16`;
  3. load: `load_unet(WORKDIR/dst, jnp.bfloat16)` (orbax restore), unless --no-load.
Prints one line per step and a JSON summary; deletes WORKDIR unless --keep. Needs ~12 GB free.

Measured 2026-11-22 on the 2-core / 24 GiB CPU machine (shared, load ~3), 2,567,463,684 params
= 5.135 GB bf16: make 51 s / 5.72 GB; convert 48.6 s, peak RSS 5.58 GB = 1.087x the params
(DST 5.136 GB). load (then: numpy restore in 256 MB batches + device_put) 39 s, 9.16 GB =
1.78x; restoring straight into jax arrays (the current code) peaked at 1.13-1.24x on a 1.5 GB
slice of the same tree (down_blocks_2), not yet re-measured at full size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make(src: Path, preset: str) -> None:
    """Random bf16 SDXL UNet (or the tiny test one), saved as a diffusers folder."""
    import torch
    from diffusers import UNet2DConditionModel

    from distrifusion_jax.models.unet_config import sdxl_base

    if preset == "tiny":  # to try this script in seconds
        from tests.tiny import TINY_SDXL_UNET_CONFIG as config
    else:
        config = sdxl_base().to_dict()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: 5 GB instead of 10
    UNet2DConditionModel(**config).save_pretrained(src)


def load(dst: Path) -> None:
    import jax
    import jax.numpy as jnp

    from distrifusion_jax import load_unet

    _, params = load_unet(dst, dtype=jnp.bfloat16)
    jax.block_until_ready(params)


def run_child(cmd: list[str]) -> dict[str, float]:
    """Run `cmd`; its wall time and peak RSS (this child only), or exit on failure."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"measure_convert: {' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def param_bytes(folder: Path) -> int:
    """Bytes of the tensors in a diffusers folder's safetensors (header only)."""
    from distrifusion_jax.io.weights import find_weights, open_file

    with open_file(find_weights(folder)) as src:
        names = src.keys()
        return sum(src.nbytes(k) for k in names)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdxl_convert_measure"))
    p.add_argument("--keep", action="store_true", help="keep the 5 GB source and the output")
    p.add_argument("--no-load", action="store_true", help="skip measuring load_unet")
    p.add_argument("--preset", choices=["sdxl", "tiny"], default="sdxl", help=argparse.SUPPRESS)
    p.add_argument("step", nargs="?", choices=["_make", "_load"], help=argparse.SUPPRESS)
    args = p.parse_args()
    src, dst = args.workdir / "src" / "unet", args.workdir / "dst"
    if args.step == "_make":
        return make(src, args.preset)
    if args.step == "_load":
        return load(dst)

    me = [sys.executable, str(Path(__file__).resolve()), "--workdir", str(args.workdir)]
    me += ["--preset", args.preset]
    results: dict[str, object] = {"preset": args.preset}
    try:
        if not src.is_dir():
            results["make"] = run_child([*me, "_make"])
            print(f"make:    {results['make']}", flush=True)
        shutil.rmtree(dst, ignore_errors=True)
        nbytes = param_bytes(src)
        cmd = [sys.executable, "-m", "convert", str(src), str(dst), "--dtype", "bfloat16"]
        results["convert"] = run_child(cmd)
        results["convert"]["peak_rss_over_params"] = round(
            results["convert"]["peak_rss_gb"] * 1e9 / nbytes, 3
        )
        print(f"convert: {results['convert']}", flush=True)
        if not args.no_load:
            results["load"] = run_child([*me, "_load"])
            results["load"]["peak_rss_over_params"] = round(
                results["load"]["peak_rss_gb"] * 1e9 / nbytes, 3
            )
            print(f"load:    {results['load']}", flush=True)
        results["param_gb"] = round(nbytes / 1e9, 3)
        results["dst_gb"] = round(du(dst) / 1e9, 3)
        print(json.dumps(results))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
