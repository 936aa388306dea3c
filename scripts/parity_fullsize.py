"""Our Flax UNet vs diffusers' PyTorch UNet on the same randomized weights, at full size.

    python scripts/parity_fullsize.py [--config full|mid|tiny] [--workdir DIR] [--depth 1]
        [--samples 4] [--dtypes float32,bfloat16] [--keep-weights] [--redo-ours] [--json OUT]

Builds the diffusers UNet (`full`: SDXL base, 2.57B params; `mid`: SDXL widths with 2
transformer layers at the deepest level; `tiny`: the test topology), perturbs every parameter,
saves it as a diffusers folder (safetensors), converts it with `distrifusion_jax.cli.convert`,
loads it with `load_unet` and runs both on `--samples` inputs (32x32 latent, batch 1, t = 500,
999, 250, 750): fp32, and bf16 (ours in bf16 vs torch fp32, beside torch bf16 vs torch fp32).
Prints, for every submodule `--depth` deep (1: blocks) and the output, the relative L2 pooled
over the samples; then each sample's output error and the worst submodule. The "w16" columns
measure against torch fp32 run on the bf16-rounded weights: the activation rounding alone.

Stages are cached in WORKDIR (default /tmp/parity_CONFIG): a rerun skips what is there;
`--redo-ours` reruns our side only (after a change to the model). Full size, 2 CPU cores: about
8 min; peak memory about 11 GB (torch stage, conversion, ours fp32: one at a time); 21 GB of
disk while the weights are kept. Exit code 1 when fp32 misses 1e-5 or our bf16 error exceeds
torch's own bf16 error (pooled relative L2 of the output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from distrifusion_jax.eval.parity import run_parity, worst

FP32_BAR = 1e-5
COLUMNS = {  # header -> label in the result's rows
    "ours fp32": "ours fp32 vs torch fp32",
    "ours bf16": "ours bf16 vs torch fp32",
    "torch bf16": "torch bf16 vs torch fp32",
    "ours bf16 w16": "ours bf16 vs torch fp32 w16",
    "torch bf16 w16": "torch bf16 vs torch fp32 w16",
}


def table(result: dict) -> list[str]:
    """One line per submodule: pooled relative L2 for each comparison that ran."""
    rows = result["rows"]
    cols = {h: lab for h, lab in COLUMNS.items() if lab in rows}
    paths = list(next(iter(rows.values())))
    width = max(len(p) for p in paths) + 2
    out = [f"{'submodule':{width}s}" + "".join(f"{h:>16s}" for h in cols)]
    for path in paths:
        cells = "".join(f"{rows[lab][path]['rel_l2']:>16.3e}" for lab in cols.values())
        out.append(f"{path:{width}s}{cells}")
    out.append("")
    for h, lab in cols.items():
        per = ", ".join(f"{e:.3e}" for e in rows[lab]["output"]["per_sample"])
        name, err = worst(rows[lab])
        out.append(f"{h:>14s}: output per sample {per}; worst submodule {name} {err:.3e}")
    return out


def verdict(result: dict) -> list[str]:
    """Failures against the bars (empty: all met)."""
    rows, bad = result["rows"], []
    fp32 = rows.get(COLUMNS["ours fp32"])
    if fp32 and fp32["output"]["rel_l2"] > FP32_BAR:
        bad.append(f"fp32 output rel L2 {fp32['output']['rel_l2']:.3e} > {FP32_BAR:g}")
    ours, ref = rows.get(COLUMNS["ours bf16"]), rows.get(COLUMNS["torch bf16"])
    if ours and ref and ours["output"]["rel_l2"] > ref["output"]["rel_l2"]:
        bad.append(
            f"bf16 output rel L2 {ours['output']['rel_l2']:.3e} > torch bf16's "
            f"{ref['output']['rel_l2']:.3e}"
        )
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["full", "mid", "tiny"], default="full")
    p.add_argument("--workdir", help="stage cache (default /tmp/parity_CONFIG)")
    p.add_argument("--depth", type=int, default=1, help="submodule depth (1: blocks)")
    p.add_argument("--samples", type=int, default=4, help="inputs the errors are pooled over")
    p.add_argument("--dtypes", default="float32,bfloat16", help="our dtypes, comma-separated")
    p.add_argument("--size", type=int, default=32, help="latent height and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-weights", action="store_true", help="keep unet/ and flax/ for reruns")
    p.add_argument("--redo-ours", action="store_true", help="rerun our side only")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts (parity imports it lazily)

    t0 = time.perf_counter()
    result = run_parity(
        args.config,
        args.workdir or f"/tmp/parity_{args.config}",
        dtypes=[d for d in args.dtypes.split(",") if d],
        depth=args.depth,
        hw=(args.size, args.size),
        samples=args.samples,
        seed=args.seed,
        keep_weights=args.keep_weights,
        redo_ours=args.redo_ours,
        log=lambda s: print(f"{time.perf_counter() - t0:7.1f}s {s}", flush=True),
    )
    print(
        f"\n{args.config} UNet, {result['params']:,} params, {args.size}x{args.size} latent, "
        f"batch 1, {args.samples} samples; relative L2 pooled over the samples, against torch "
        "fp32 (w16: torch fp32 on the bf16-rounded weights)\n"
    )
    print("\n".join(table(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    bad = verdict(result)
    print("\n" + ("; ".join(bad) if bad else "all bars met"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
