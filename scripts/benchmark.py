"""Benchmark DistriFusion steps: FLOPs, exchange, stale memory, latency; prints a table, writes JSON.

    python scripts/benchmark.py --sdxl-shapes                 # full SDXL, abstract shapes only
    python scripts/benchmark.py --sdxl-shapes --controlnets   # the same with | without a ControlNet
    python scripts/benchmark.py --model distrifusion_jax/assets/tiny-sdxl --patches 1 2 4 8
    python scripts/benchmark.py --scaling --height 128 --repeats 8   # 1 vs 2 processes, pinned
    python scripts/benchmark.py --unet-vs-torch --sizes tiny,mid,full  # our UNet vs diffusers'
    python scripts/benchmark.py --startup    # generate.py waits: cold/warm cache, 10 prompts

What each mode measures, its assumptions and its JSON schema: docs/benchmark.md. The code:
distrifusion_jax/eval/benchmark_sdxl.py, benchmark_model.py and scaling.py (workers start
through eval/launcher.py); plots in eval/plots.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# JAX-free imports only: main() sets XLA_FLAGS before JAX is first imported.
from distrifusion_jax.eval.mode_labels import mode_fields
from distrifusion_jax.eval.scaling import DEFAULT_MODES
from distrifusion_jax.parallel.config import parse_compress
from distrifusion_jax.tiny import MODEL_DIR

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sdxl-shapes", action="store_true")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048, 3840])
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--patches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--mode",
        default="corrected_async_gn",
        help="MODE or MODE+fused (a displaced step's sends exchanged together)",
    )
    p.add_argument(
        "--pcpp",
        type=float,
        default=None,
        metavar="P",
        help="(model, --sdxl-shapes) PCPP portion p, e.g. 0.3",
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--cfg-split", action="store_true", help="(model) CFG halves on 2 groups")
    p.add_argument("--steps", type=int, default=20, help="(model) sampling steps")
    p.add_argument("--link-gbps", type=float, default=200.0, help="(--sdxl-shapes) projection")
    p.add_argument(
        "--codecs",
        nargs="+",
        default=[],
        help="(--sdxl-shapes) also trace these compress codecs: bytes per codec; with n = 16 in "
        "--patches (--cpu-devices 16) a 2-node x 8-GPU projection",
    )
    p.add_argument("--controlnets", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="(--sdxl-shapes) the step with K SDXL ControlNets (default 1) beside "
                   "the plain UNet: FLOPs, exchange and stale bytes with | without")  # fmt: skip
    p.add_argument(
        "--inter-node-gbps", type=float, default=25.0, help="(--codecs) GB/s per GPU between nodes"
    )
    p.add_argument("--repeats", type=int, default=8, help="(--scaling) steady steps per run")
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument(
        "--json",
        default=None,
        help="default results/benchmark.json (results/scaling.json with --scaling)",
    )
    p.add_argument("--scaling", action="store_true", help="1 process vs 2 processes (see above)")
    p.add_argument(
        "--scaling-modes",
        nargs="+",
        default=list(DEFAULT_MODES),
        help="(--scaling) modes; MODE+fused exchanges a displaced step's sends at once, "
        "MODE[+fused]:CODEC compresses them (e.g. corrected_async_gn+fused:residual+int4)",
    )
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], help="CPU cores to pin to")
    p.add_argument(
        "--link-rate",
        default=None,
        metavar="RATE",
        help="(--scaling) rate-limit loopback during the runs with tc (root), e.g. 200mbit",
    )
    p.add_argument("--scheduler", default="ddim", help="sampler")
    p.add_argument("--warmup-steps", type=int, default=4, help="w")
    p.add_argument("--scaling-timeout", type=int, default=1200, help="seconds per run")
    p.add_argument("--rounds", type=int, default=3, help="(--scaling) interleaved repetitions")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--unet-vs-torch", action="store_true", help="our UNet vs diffusers' (above)")
    p.add_argument("--startup", action="store_true", help="generate.py waits (eval/startup.py)")
    p.add_argument("--sizes", default="tiny,mid", help="(--unet-vs-torch) of tiny,mid,full")
    p.add_argument("--latent", type=int, default=32, help="(--unet-vs-torch) latent size")
    p.add_argument("--unet-repeats", type=int, default=3, help="(--unet-vs-torch) best of")
    p.add_argument("--target", nargs="+", default=None,
                   help="compile the displaced step for these accelerators without the devices "
                   "(h200x8 h100x8 a100x8 v5e-8 v5p-8; needs .[aot]): memory and overlap")  # fmt: skip
    args = p.parse_args(argv)
    for flag, label in [("--mode", args.mode)] + [
        ("--scaling-modes", m) for m in args.scaling_modes
    ]:
        try:
            mode_fields(label)
        except ValueError as e:
            p.error(f"{flag}: {e}")
    for codec in args.codecs:
        try:
            parse_compress(codec)
        except ValueError as e:
            p.error(f"--codecs: {e}")
    if args.controlnets and args.codecs:
        p.error("--controlnets and --codecs: run them apart")
    if args.json is None:
        flags = ["unet_vs_torch", "startup", "scaling", "sdxl_shapes"]
        name = next((f for f in flags if getattr(args, f)), "benchmark")
        name = "benchmark_sdxl_shapes" if name == "sdxl_shapes" else name
        name += "_controlnet" if args.sdxl_shapes and args.controlnets else ""
        args.json = str(REPO / "results" / f"{name}.json")
    return args


def write_json(path: str, res: dict) -> Path:
    """Write atomically (temporary file, then rename); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.target:  # distrifusion_jax/aot: the compiled schedule and memory of each target
        from distrifusion_jax.aot.__main__ import main as aot_main

        return aot_main([
            "--targets", *args.target, "--resolutions", *map(str, args.resolutions),
            "--mode", mode_fields(args.mode)["mode"],
            *(["--fused-exchange"] if mode_fields(args.mode)["fused_exchange"] else []),
            *(["--pcpp", str(args.pcpp)] if args.pcpp else []),
            "--json", str(REPO / "results" / "aot.json") if args.json.endswith("benchmark.json")
            else args.json, "--timeline", str(REPO / "results" / "aot_timeline.png"),
        ])  # fmt: skip
    t0 = time.perf_counter()
    if args.startup:  # fresh generate.py processes on the shipped model
        from distrifusion_jax.eval.startup import measure, table
        from distrifusion_jax.tiny import MODEL_DIR
        from distrifusion_jax.tiny.fashion_mnist import PROMPTS

        res = measure(MODEL_DIR, PROMPTS)
        write_json(args.json, res)
        print(table(res))
        return 0
    if args.unet_vs_torch:  # one real CPU device: no fake devices sharing its threads
        from distrifusion_jax.eval.unet_vs_torch import print_unet_vs_torch, unet_vs_torch

        res = unet_vs_torch(args.sizes.split(","), (args.latent,) * 2, args.unet_repeats)
        res["seconds_total"] = time.perf_counter() - t0
        write_json(args.json, res)
        print_unet_vs_torch(res)
        return 0
    # This process's fake CPU devices (cost analysis, model mode); scaling workers set their own.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.cpu_devices}"
    )
    from distrifusion_jax.eval import plots

    if args.scaling:
        from distrifusion_jax.eval.scaling import ScalingOptions, print_scaling, scaling

        h = args.height or 128
        opts = ScalingOptions(
            model=args.model,
            height=h,
            width=args.width or h,
            scheduler=args.scheduler,
            warmup_steps=args.warmup_steps,
            repeats=args.repeats,
            rounds=args.rounds,
            modes=tuple(args.scaling_modes),
            cores=tuple(args.cores),
            timeout=args.scaling_timeout,
            link_rate=args.link_rate,
        )
        try:
            res = scaling(opts)
        except RuntimeError as e:  # --link-rate without root or tc
            print(f"error: {e}", file=sys.stderr)
            return 2
        res["seconds_total"] = time.perf_counter() - t0
        out = write_json(args.json, res)
        if not args.no_plots:
            plots.plot_scaling(res, out.with_suffix(".png"))
        print_scaling(res)
        return 0
    if args.sdxl_shapes and args.controlnets:  # with | without K ControlNets (issue 16)
        from distrifusion_jax.eval.benchmark_controlnet import controlnet_rows, print_table

        rows = controlnet_rows(args.resolutions, args.patches, args.mode, args.pcpp,
                               args.controlnets)  # fmt: skip
        write_json(args.json, {"kind": "sdxl_shapes_controlnet", "mode": args.mode,
                               "pcpp": args.pcpp, "controlnets": args.controlnets, "rows": rows,
                               "seconds_total": time.perf_counter() - t0})  # fmt: skip
        print_table(rows)
        return 0
    if args.sdxl_shapes:
        from distrifusion_jax.eval.benchmark_sdxl import (
            print_codec_tables,
            print_sdxl_table,
            sdxl_rows,
            two_node_projection,
        )

        rows = sdxl_rows(
            args.resolutions, args.patches, args.mode, args.pcpp, args.link_gbps,
            tuple(args.codecs),
        )  # fmt: skip
        projection = two_node_projection(rows, inter_gbps=args.inter_node_gbps)
        res = {
            "kind": "sdxl_shapes",
            "mode": args.mode,
            "pcpp": args.pcpp,
            "link_gbps": args.link_gbps,
            "codecs": args.codecs,
            "rows": rows,
            "two_node_projection": projection,
            "seconds_total": time.perf_counter() - t0,
        }
        out = write_json(args.json, res)
        if not args.no_plots:
            plots.plot_sdxl(rows, out.with_suffix(".png"))
        print_sdxl_table(rows, args.link_gbps)
        print_codec_tables(rows, projection)
        return 0
    from distrifusion_jax.eval.benchmark_model import model_rows, print_model_table

    rows = model_rows(
        args.model,
        args.patches,
        mode=args.mode,
        pcpp=args.pcpp,
        cfg_split=args.cfg_split,
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        scheduler=args.scheduler,
        height=args.height,
        width=args.width,
    )
    res = {
        "kind": "model",
        "model": args.model,
        "mode": args.mode,
        "pcpp": args.pcpp,
        "cfg_split": args.cfg_split,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "warmup_steps": args.warmup_steps,
        "cpu_devices": args.cpu_devices,
        "cpu_count": os.cpu_count(),
        "device_note": f"{args.cpu_devices} fake CPU devices on {os.cpu_count()} cores: "
        "latency shows overhead, not speedup",
        "rows": rows,
        "seconds_total": time.perf_counter() - t0,
    }
    out = write_json(args.json, res)
    if not args.no_plots:
        plots.plot_model(res, out.with_suffix(".png"))
    print_model_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
