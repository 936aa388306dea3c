"""Compile the displaced step (and the sampler) for accelerators that are not here; report
memory and overlap.

    python -m distrifusion_jax.aot --targets h200x8 h100x8 --resolutions 1024 2048 3840
    python -m distrifusion_jax.aot --targets h200x8 --resolutions 512 --layers 1,1,1 --json -
    python -m distrifusion_jax.aot --targets h200x8 --resolutions 1024 --controlnets 1

Needs the target's XLA plugin importable: `pip install ".[aot]"` (GPU), `jax[tpu]` (TPU).
Prints a table (and `--json` rows; `-` for stdout); `--timeline PNG` draws the first row's step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: nothing runs on a device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from distrifusion_jax.aot.overlap import TARGETS
    from distrifusion_jax.parallel.config import DEFAULT_MODE, MODES

    p = argparse.ArgumentParser(prog="python -m distrifusion_jax.aot", description=__doc__)
    p.add_argument("--targets", nargs="+", default=["h200x8"], choices=sorted(TARGETS))
    p.add_argument("--resolutions", nargs="+", type=int, default=[1024])
    p.add_argument("--programs", nargs="+", default=["step"], choices=["step", "sampler"])
    p.add_argument("--layers", default=None,
                   help="transformer layers per block, e.g. 1,1,1 (default: SDXL's 1,2,10)")
    p.add_argument("--mode", default=DEFAULT_MODE, choices=MODES)
    p.add_argument("--pcpp", type=float, default=None)
    p.add_argument("--fused-exchange", action="store_true")
    p.add_argument("--controlnets", type=int, default=0, metavar="K",
                   help="the step with K SDXL ControlNets (controlnet-canny-sdxl-1.0 shapes)")  # fmt: skip
    p.add_argument("--steps", type=int, default=50, help="(sampler) sampling steps")
    p.add_argument("--json", default=None, help="write the rows as JSON here ('-': stdout)")
    p.add_argument("--timeline", default=None, help="PNG of the first row's step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distrifusion_jax.aot.report import aot_rows, plot_timeline, print_aot_table
    from distrifusion_jax.models import sdxl_base
    from distrifusion_jax.models.controlnet_config import ControlNetConfig
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.sampling.schedulers import SDXL_SCHEDULER_CONFIG

    config = sdxl_base()
    if args.layers:
        layers = tuple(int(x) for x in args.layers.split(","))
        config = dataclasses.replace(config, transformer_layers_per_block=layers)
    controlnets = (ControlNetConfig.from_unet(config),) * args.controlnets  # SDXL's: its trunk
    parallel = ParallelConfig(
        patches=8, mode=args.mode, pcpp=args.pcpp, fused_exchange=args.fused_exchange
    )
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    rows, overlaps = aot_rows(
        args.targets, args.resolutions, config, parallel, tuple(args.programs),
        SDXL_SCHEDULER_CONFIG, args.steps, log, controlnets,
    )  # fmt: skip
    if args.json == "-":
        print(json.dumps(rows))
    else:
        print_aot_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    if args.timeline and rows:
        r = rows[0]
        ov = overlaps[(r["target"], r["resolution"], r["program"])]
        title = (f"{r['target']}, {r['resolution']}^2, n={r['n']}, {r['mode']}: hidden "
                 f"{r['hidden_fraction_simulated']:.2f} of {r['transfer_ms']:.2f} ms transfer")
        plot_timeline(ov, title, args.timeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
