"""Benchmark DistriFusion steps: FLOPs, exchange, stale memory, latency; prints a table, writes JSON.

    python scripts/benchmark.py --sdxl-shapes                 # full SDXL, abstract shapes only
    python scripts/benchmark.py --model distrifusion_jax/assets/tiny-sdxl --patches 1 2 4 8
    python scripts/benchmark.py --scaling --height 128 --repeats 8   # 1 vs 2 processes, pinned

`--sdxl-shapes`: the full SDXL base UNet at 1024^2, 2048^2, 3840^2, n = 2, 4, 8, batch 2 (CFG
pair on every device, no CFG split), traced from `jax.eval_shape` params (no weights, nothing
executed): per-device FLOPs of the displaced step (XLA cost analysis of the lowered program)
vs the single-device step, elements received per device per step (counted from the step's
collectives, and from the layer-shape formulas), stale-state bytes per device (bf16
activations, fp32 GroupNorm moments), beside the original's Table 2, and a projected speedup on
8 A100s (NVLink) from those figures. Projection assumptions (printed with the table): the
1-GPU step time is the paper's measured one (Fig. 6: 5.02 / 23.7 / 140 s for 50 steps at
1024 / 2048 / 3840), which fixes an effective FLOP rate per resolution; an n-GPU step computes
its FLOPs at that same rate (no loss of GPU efficiency on smaller patches: an upper bound);
the exchange moves its bf16 bytes at `--link-gbps` (default 200 GB/s, NCCL all-gather bus
bandwidth on 8 x A100 SXM NVLink3, ~2/3 of the 300 GB/s per direction); displaced steps hide
the exchange behind compute, max(compute, comm); synchronous patch parallelism adds them.

Model mode (default; `--model` a converted or diffusers folder, default the shipped model):
for each n in `--patches` (and `--mode`, `--cfg-split`), at `--height` x `--width` (default
the model's size), `--steps` sampling steps: compile time (the steps that compile: 0, 1 and
w+1) apart from the steady-state step (median of the others), end-to-end latency of a second,
warm call (encode + denoise + decode), per-device FLOPs vs the single-device step (ideal 1/n),
elements and bytes received per device per step counted three ways (the step's jaxpr, the
compiled HLO's collectives, the layer-shape formulas of `analytic_exchange`; `--mode
corrected_async_gn+fused` exchanges the same elements in a few collectives), stale-state
bytes, and peak bytes per device from XLA's memory analysis of the compiled step. On fake CPU
devices (`--cpu-devices`, sharing this machine's cores) latency shows overhead, not speedup;
`--scaling` measures real speedup.

JSON schema (`--json`, default results/benchmark.json or results/benchmark_sdxl_shapes.json):
{"kind": "sdxl_shapes" | "model", "mode": str, ..., "rows": [{"resolution": int, "n": int,
"batch": int, "flops_per_device": float, "flops_ratio_vs_1": float, "exchanged_elements":
float, "exchanged_bytes": float, "analytic_elements": {layer kind: float}, "state_bytes": int,
"by_kind": {...}, and for sdxl_shapes "original_elements": float | null,
"original_state_bytes": float | null, "projected_speedup_displaced": float,
"projected_speedup_sync": float, "paper_speedup": float | null; for model
"compiled_exchange": {"elements", "bytes", "calls", "by_op"}, "peak_bytes": int | null,
"compile_and_first_steps_seconds": float, "median_step_seconds": float,
"end_to_end_seconds": float, "speedup_vs_1": float}]}.

`--scaling`: real multi-process scaling on this CPU. The same generation (one prompt, CFG pair,
`--height` x `--width`, default 128^2, DDIM) runs as 1 process with 1 CPU device, then as 2
processes (`jax.distributed`, coordinator on 127.0.0.1) with 1 device each and n = 2 row bands,
in the modes `--scaling-modes` (default: corrected_async_gn = DistriFusion, one collective per
layer as on an accelerator; corrected_async_gn+fused = the same with a displaced step's sends
exchanged together at its end, `ParallelConfig(fused_exchange=True)`; full_sync =
synchronous patch parallelism; no_sync = the same displaced computation with no exchange after
warm-up, the no-communication bound of the paper's Table 2; naive_patch `row` = independent
bands, whose attention over half the tokens costs a quarter, so it is faster than any exact
split). Every process gets one compute thread (`--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`) and is pinned to its own core with `taskset -c` (`--cores`;
the 1-process run uses the first). Steps 0..w are synchronous, w+1.. displaced; the first call
of each of the three jitted step functions (steps 0, 1, w+1) compiles and is reported apart.
The step time is the median over the other displaced steps (`--repeats` per run) of the slower
process, pooled over `--rounds` interleaved repetitions of all runs; the median of the steady
synchronous steps (2..w) is reported too. The shipped tiny model's VAE factor is 1, so 128 px
is a 128^2 latent with 4096-token self-attention (~1.5-2 s per step on one core; 256 px is
~70 s per step, its 16k-token attention being memory-bound).
JSON (`--json`, default results/scaling.json): {"kind": "scaling", "model": str,
"height": int, "width": int, "batch": 2, "scheduler": str, "warmup_steps": int, "steps": int,
"repeats": int, "rounds": int, "cores": [int], "cpu_count": int,
"load_average_before" / "load_average_after": [float], "runs": [{"name": str,
"processes": int, "n": int, "mode": str, "naive_split": str | null, "median_step_s": float,
"round_medians_s": [float], "median_sync_step_s": float | null,
"compile_and_first_steps_s": float, "speedup_vs_1": float, "round_speedups": [float],
"rounds": [{"displaced": [float], "sync": [float], "step_times": [[float] per process],
"compile_and_first_steps_s": float, "load_seconds": float, "wall_seconds": float,
"load_average": [float]}]}], "speedup": float (1-process / 2-process corrected_async_gn
median step), "speedup_fused": float | null (the same for corrected_async_gn+fused),
"cost": {"n1/MODE" | "n2/MODE": {"flops_per_device": float, "exchanged_bytes": float,
"collective_calls": int, "by_kind": {...}}} (XLA cost analysis and the step's collectives,
abstract shapes), "seconds_total": float}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# parallel.config.MODES, spelled out: importing the package here would import JAX before
# main() sets XLA_FLAGS.
MODES = ("full_sync", "corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "no_sync",
         "naive_patch")


def mode_fields(label: str) -> dict:
    """`MODE` or `MODE+fused` (a displaced step's sends exchanged together) -> ParallelConfig
    fields; ValueError naming the fix for anything else."""
    mode, _, option = label.partition("+")
    if mode not in MODES or option not in ("", "fused"):
        raise ValueError(f"unknown mode {label!r}: use one of {list(MODES)}, optionally with "
                         "'+fused' (e.g. corrected_async_gn+fused)")
    return {"mode": mode, "fused_exchange": option == "fused"}
# distrifuser Table 2 / reference notes §7: elements per device per step at n=8, batch 2,
# and stale-buffer GB per device (fp16).
ORIGINAL = {
    (1024, 8): (0.424e9, 0.97e9),
    (2048, 8): (1.583e9, 3.62e9),
    (3840, 8): (5.376e9, 12.29e9),
    (1024, 4): (0.339e9, 0.90e9),
    (2048, 4): (1.307e9, 3.49e9),
    (3840, 4): (4.516e9, 12.04e9),
    (1024, 2): (0.218e9, 0.87e9),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sdxl-shapes", action="store_true")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048, 3840])
    p.add_argument("--model", default=str(REPO / "distrifusion_jax" / "assets" / "tiny-sdxl"))
    p.add_argument("--patches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--mode", default="corrected_async_gn",
                   help="MODE or MODE+fused (a displaced step's sends exchanged together)")
    p.add_argument("--pcpp", type=float, default=None, metavar="P",
                   help="(model, --sdxl-shapes) PCPP portion p, e.g. 0.3")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--cfg-split", action="store_true", help="(model) CFG halves on 2 groups")
    p.add_argument("--steps", type=int, default=20, help="(model) sampling steps")
    p.add_argument("--link-gbps", type=float, default=200.0, help="(--sdxl-shapes) projection")
    p.add_argument("--repeats", type=int, default=8, help="(--scaling) steady steps per run")
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--json", default=None,
                   help="default results/benchmark.json (results/scaling.json with --scaling)")
    p.add_argument("--scaling", action="store_true", help="1 process vs 2 processes (see above)")
    p.add_argument("--scaling-modes", nargs="+",
                   default=["corrected_async_gn", "corrected_async_gn+fused", "full_sync",
                            "no_sync", "naive_patch"],
                   help="(--scaling) modes; MODE+fused exchanges a displaced step's sends at once")
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], help="CPU cores to pin to")
    p.add_argument("--scheduler", default="ddim", help="sampler")
    p.add_argument("--warmup-steps", type=int, default=4, help="w")
    p.add_argument("--scaling-timeout", type=int, default=1200, help="seconds per run")
    p.add_argument("--rounds", type=int, default=3, help="(--scaling) interleaved repetitions")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--scaling-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag, label in [("--mode", args.mode)] + [("--scaling-modes", m) for m in
                                                   args.scaling_modes]:
        try:
            mode_fields(label)
        except ValueError as e:
            p.error(f"{flag}: {e}")
    if args.json is None:
        name = "scaling" if args.scaling else "benchmark_sdxl_shapes" if args.sdxl_shapes else (
            "benchmark")
        args.json = str(REPO / "results" / f"{name}.json")
    return args


# distrifuser Fig. 6: measured speedup on A100s, 50-step DDIM, no CFG split; 1-GPU seconds.
PAPER_SPEEDUP = {
    (1024, 2): 1.5, (1024, 4): 2.2, (1024, 8): 2.8,
    (2048, 2): 1.8, (2048, 4): 3.1, (2048, 8): 4.9,
    (3840, 2): 1.8, (3840, 4): 3.4, (3840, 8): 6.1,
}
PAPER_ONE_GPU_STEP_S = {1024: 5.02 / 50, 2048: 23.7 / 50, 3840: 140 / 50}
# Table 2, "No Comm." on 8 A100s: the compute-only step, GPU efficiency on 1/8 patches included.
PAPER_NO_COMM_STEP_S = {(1024, 8): 1.48 / 50, (2048, 8): 4.14 / 50, (3840, 8): 21.3 / 50}


def cond_shapes(pipe, h: int, w: int):
    """Abstract conditioning `[G, B, ...]` of one prompt at h x w pixels."""
    import jax

    from distrifusion_jax.prompt import encode_prompts

    cond = encode_prompts(pipe.encoders, ["x"], None, True, pipe.is_sdxl,
                          [h, w, 0, 0, h, w] if pipe.is_sdxl else None)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cond)


def sdxl_rows(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from distrifusion_jax.models import UNet2DConditionModel, sdxl_base
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.parallel.cost import step_cost

    model = UNet2DConditionModel(sdxl_base(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    f32 = jnp.float32
    params = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
        jnp.zeros((1, 77, 2048)),
        {"text_embeds": jnp.zeros((1, 1280)), "time_ids": jnp.zeros((1, 6))},
    )["params"]
    link = args.link_gbps * 1e9
    rows = []
    for res in args.resolutions:
        lat = jax.ShapeDtypeStruct((1, res // 8, res // 8, 4), f32)
        cond = {
            "encoder_hidden_states": jax.ShapeDtypeStruct((2, 1, 77, 2048), f32),
            "text_embeds": jax.ShapeDtypeStruct((2, 1, 1280), f32),
            "time_ids": jax.ShapeDtypeStruct((2, 1, 6), f32),
        }
        base = None
        for n in [1] + [k for k in args.patches if k > 1]:
            t0 = time.perf_counter()
            pc = ParallelConfig(patches=n, pcpp=args.pcpp, **mode_fields(args.mode))
            c = step_cost(model, params, pc, lat, cond)
            base = c.flops if n == 1 else base
            orig = ORIGINAL.get((res, n), (None, None))
            row = {
                "resolution": res, "n": n, "batch": 2, "flops_per_device": c.flops,
                "flops_ratio_vs_1": c.flops / base, "ideal_ratio": 1 / n,
                "exchanged_elements": c.exchanged_elements, "exchanged_bytes": c.exchanged_bytes,
                "analytic_elements": c.analytic_elements,
                "state_bytes": c.state_bytes, "original_elements": orig[0],
                "original_state_bytes": orig[1], "by_kind": c.by_kind,
                "trace_seconds": time.perf_counter() - t0,
            }
            if res in PAPER_ONE_GPU_STEP_S:
                t1 = PAPER_ONE_GPU_STEP_S[res]
                compute = t1 * c.flops / base
                comm = c.exchanged_bytes / link
                row["projected_speedup_displaced"] = t1 / max(compute, comm)
                row["projected_speedup_sync"] = t1 / (compute + comm)
                row["projected_comm_ms"] = comm * 1e3
                row["projected_compute_ms"] = compute * 1e3
                no_comm = PAPER_NO_COMM_STEP_S.get((res, n))
                if no_comm is not None:  # the same with the paper's measured compute time
                    row["projected_speedup_displaced_no_comm_calibrated"] = t1 / max(no_comm, comm)
                    row["projected_speedup_sync_no_comm_calibrated"] = t1 / (no_comm + comm)
            row["paper_speedup"] = PAPER_SPEEDUP.get((res, n))
            rows.append(row)
            print(f"  traced {res}^2 n={n} in {row['trace_seconds']:.1f} s", file=sys.stderr)
    return rows


def print_sdxl_table(rows: list[dict], link_gbps: float) -> None:
    head = (f"{'res':>5} {'n':>2} {'TFLOP/dev':>10} {'x 1-dev':>8} {'ideal':>6} "
            f"{'recv G el':>9} {'formula':>8} {'orig G el':>9} {'stale GB':>8} {'orig GB':>7} "
            f"{'proj x':>7} {'sync x':>7} {'paper x':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        oe = f"{r['original_elements'] / 1e9:.3f}" if r.get("original_elements") else "-"
        ob = f"{r['original_state_bytes'] / 1e9:.2f}" if r.get("original_state_bytes") else "-"
        pd = f"{r['projected_speedup_displaced']:.2f}" if "projected_speedup_sync" in r else "-"
        ps = f"{r['projected_speedup_sync']:.2f}" if "projected_speedup_sync" in r else "-"
        pp = f"{r['paper_speedup']:.1f}" if r.get("paper_speedup") else "-"
        print(f"{r['resolution']:>5} {r['n']:>2} {r['flops_per_device'] / 1e12:>10.2f} "
              f"{r['flops_ratio_vs_1']:>8.4f} {1 / r['n']:>6.3f} "
              f"{r['exchanged_elements'] / 1e9:>9.3f} "
              f"{sum(r['analytic_elements'].values()) / 1e9:>8.3f} {oe:>9} "
              f"{r['state_bytes'] / 1e9:>8.2f} {ob:>7} {pd:>7} {ps:>7} {pp:>7}")
    print(f"proj x: projected speedup of the displaced step on A100s = t1 / max(t1 * FLOPs ratio, "
          f"bytes / {link_gbps:.0f} GB/s), t1 = the paper's 1-GPU step; sync x: t1 / (compute + "
          f"comm), synchronous patch parallelism; paper x: measured (Fig. 6). The projection "
          f"assumes no GPU efficiency is lost on 1/n-size patches, which the paper's numbers "
          f"show is false at 1024^2 (an upper bound).")
    for r in rows:
        if "projected_speedup_displaced_no_comm_calibrated" in r:
            print(f"  {r['resolution']}^2 n={r['n']} with the paper's measured No-Comm step as the "
                  f"compute time: displaced "
                  f"{r['projected_speedup_displaced_no_comm_calibrated']:.2f}x, sync "
                  f"{r['projected_speedup_sync_no_comm_calibrated']:.2f}x (paper: "
                  f"{r['paper_speedup']:.1f}x DistriFusion; exchange "
                  f"{r['projected_comm_ms']:.1f} ms/step at {link_gbps:.0f} GB/s)")


def model_rows(args) -> list[dict]:
    import jax
    import numpy as np

    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.parallel.cost import step_cost
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    rows, base, base_step = [], None, None
    for n in args.patches:
        fields = mode_fields(args.mode if n > 1 else "corrected_async_gn")
        pc = ParallelConfig(patches=n, cfg_split=args.cfg_split, warmup_steps=args.warmup_steps,
                            pcpp=args.pcpp if n > 1 else None, **fields)
        pipe = DistriSDXLPipeline.from_pretrained(args.model, parallel=pc)
        h = args.height or pipe.default_size
        w = args.width or pipe.default_size
        f = pipe.vae_scale_factor
        lat = jax.ShapeDtypeStruct((1, h // f, w // f, pipe.unet.config.in_channels), np.float32)
        c = step_cost(pipe.unet, pipe.unet_params, pc, lat, cond_shapes(pipe, h, w), compile=True)
        base = c.flops if base is None else base
        kw = dict(height=h, width=w, num_inference_steps=args.steps, scheduler=args.scheduler,
                  progress=iter)
        pipe(SCALING_PROMPT, **kw)  # first call: compiles
        first = list(pipe.timings.step_times)
        t0 = time.perf_counter()
        pipe(SCALING_PROMPT, **kw)  # warm call: end-to-end latency
        total = time.perf_counter() - t0
        compile_steps = {0, 1, pc.warmup_steps + 1}
        steady = [s for i, s in enumerate(pipe.timings.step_times) if i not in compile_steps]
        row = {
            "resolution": h, "width": w, "n": n, "mode": pc.mode,
            "fused_exchange": pc.fused_exchange, "cfg_split": args.cfg_split,
            "devices": pc.num_devices,
            "batch": 2, "flops_per_device": c.flops, "flops_ratio_vs_1": c.flops / base,
            "exchanged_elements": c.exchanged_elements, "exchanged_bytes": c.exchanged_bytes,
            "analytic_elements": c.analytic_elements, "by_kind": c.by_kind,
            "compiled_exchange": {k: v for k, v in c.compiled.items() if k != "peak_bytes"},
            "peak_bytes": c.compiled["peak_bytes"], "state_bytes": c.state_bytes,
            "compile_and_first_steps_seconds": sum(first[i] for i in compile_steps
                                                   if i < len(first)),
            "median_step_seconds": float(np.median(steady)),
            "end_to_end_seconds": total,
        }
        base_step = row["median_step_seconds"] if base_step is None else base_step
        row["speedup_vs_1"] = base_step / row["median_step_seconds"]
        rows.append(row)
        print(f"  n={n}: median step {row['median_step_seconds'] * 1e3:.1f} ms", file=sys.stderr)
    return rows


def print_model_table(res: dict) -> None:
    print(f"{res['model']} at {res['rows'][0]['resolution']}x{res['rows'][0]['width']}, "
          f"{res['steps']} {res['scheduler']} steps, mode {res['mode']}, w={res['warmup_steps']}"
          f"{', CFG split' if res['cfg_split'] else ''}; {res['device_note']}")
    head = (f"{'n':>2} {'MFLOP/dev':>10} {'x 1-dev':>8} {'recv k el':>10} {'HLO k el':>9} "
            f"{'formula':>8} {'recv KB':>8} {'stale KB':>9} {'peak MB':>8} {'compile s':>9} "
            f"{'step ms':>8} {'e2e s':>7} {'speedup':>7}")
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        peak = f"{r['peak_bytes'] / 1e6:.1f}" if r["peak_bytes"] is not None else "-"
        print(f"{r['n']:>2} {r['flops_per_device'] / 1e6:>10.1f} {r['flops_ratio_vs_1']:>8.4f} "
              f"{r['exchanged_elements'] / 1e3:>10.1f} "
              f"{r['compiled_exchange']['elements'] / 1e3:>9.1f} "
              f"{sum(r['analytic_elements'].values()) / 1e3:>8.1f} "
              f"{r['exchanged_bytes'] / 1e3:>8.1f} {r['state_bytes'] / 1e3:>9.1f} {peak:>8} "
              f"{r['compile_and_first_steps_seconds']:>9.1f} "
              f"{r['median_step_seconds'] * 1e3:>8.1f} {r['end_to_end_seconds']:>7.2f} "
              f"{r['speedup_vs_1']:>6.2f}x")
    print("recv: counted from the step's jaxpr; HLO: from the compiled step's collectives; "
          "formula: layer shapes x the algorithm (patch axis only; a CFG split adds one "
          "all-gather of the output). Per device per step, received by an interior band.")


# ---- plots ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sdxl(rows: list[dict], path: Path) -> None:
    """FLOPs per device vs n (with 1/n) and projected vs measured speedup, per resolution."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for res in sorted({r["resolution"] for r in rows}):
        rs = [r for r in rows if r["resolution"] == res]
        ns = [r["n"] for r in rs]
        ax1.plot(ns, [r["flops_ratio_vs_1"] for r in rs], "o-", label=f"{res}^2")
        proj = [r.get("projected_speedup_displaced") for r in rs]
        line = ax2.plot(ns, proj, "o-", label=f"{res}^2 projected (upper bound)")[0]
        paper = [(r["n"], r["paper_speedup"]) for r in rs if r.get("paper_speedup")]
        if paper:
            ax2.plot([1] + [p[0] for p in paper], [1] + [p[1] for p in paper], "s--",
                     color=line.get_color(), label=f"{res}^2 paper (measured)")
    ns = sorted({r["n"] for r in rows})
    ax1.plot(ns, [1 / n for n in ns], "k:", label="ideal 1/n")
    ax1.set(xscale="log", yscale="log", xlabel="devices n", ylabel="FLOPs per device / 1 device",
            title="SDXL step FLOPs per device (XLA cost analysis)")
    ax2.plot(ns, ns, "k:", label="linear")
    ax2.set(xlabel="devices n", ylabel="speedup vs 1 A100",
            title="SDXL on A100s: projection vs paper")
    for ax in (ax1, ax2):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_model(res: dict, path: Path) -> None:
    """Step latency and speedup vs n (model mode)."""
    plt = _pyplot()
    rows = res["rows"]
    ns = [r["n"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(ns, [r["median_step_seconds"] * 1e3 for r in rows], "o-", label="median step")
    ax1.set(xlabel="devices n", ylabel="ms per step", title="step latency")
    ax2.plot(ns, [r["speedup_vs_1"] for r in rows], "o-", label="measured")
    ax2.plot(ns, [1 / r["flops_ratio_vs_1"] for r in rows], "s--", label="1 / FLOPs ratio")
    ax2.set(xlabel="devices n", ylabel="speedup vs n = 1", title="speedup")
    for ax in (ax1, ax2):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(res['model']).name}: {res['device_note']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(res: dict, path: Path) -> None:
    """Median displaced step per run and speedup vs 1 process (scaling mode)."""
    plt = _pyplot()
    runs = res["runs"]
    names = [r["name"].replace("2 processes, n=2, ", "2 proc: ") for r in runs]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.bar(range(len(runs)), [r["median_step_s"] for r in runs], color="tab:blue")
    for b, r in zip(bars, runs):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{r['speedup_vs_1']:.2f}x",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="median step (s)", title=f"1 vs 2 processes on this CPU, {res['height']}x"
           f"{res['width']}, one core each (label: speedup vs 1 process)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- --scaling: 1 process vs 2 processes -------------------------------------------------

SCALING_PROMPT = "a photo of a sneaker"
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def scaling_worker(spec: dict) -> int:
    """One process of a scaling run: generate, print this process's step times as JSON."""
    t0 = time.perf_counter()
    import jax

    if spec["processes"] > 1:
        from distrifusion_jax.parallel.mesh import initialize_distributed

        initialize_distributed(spec["coordinator"], spec["processes"], spec["process_id"])
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    pc = ParallelConfig(**mode_fields(spec["mode"]), patches=spec["n"],
                        naive_split=spec["naive_split"] or "row",
                        warmup_steps=spec["warmup_steps"])
    pipe = DistriSDXLPipeline.from_pretrained(spec["model"], parallel=pc)
    load = time.perf_counter() - t0
    pipe.generate_latents(SCALING_PROMPT, height=spec["height"], width=spec["width"],
                          num_inference_steps=spec["steps"], guidance_scale=5.0,
                          scheduler=spec["scheduler"], progress=iter)
    out = {"process_id": jax.process_index(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count(), "load_seconds": load,
           "step_times": pipe.timings.step_times}
    print("SCALING_RESULT " + json.dumps(out), flush=True)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_scaling(args, name: str, processes: int, mode: str, naive_split, h: int, w: int) -> dict:
    """One run (1 or 2 processes); returns its steady displaced/sync step times."""
    import subprocess

    import numpy as np

    n = processes
    spec = {"model": args.model, "n": n, "mode": mode, "naive_split": naive_split,
            "warmup_steps": args.warmup_steps, "height": h, "width": w,
            "steps": args.warmup_steps + 2 + args.repeats, "scheduler": args.scheduler,
            "processes": processes, "coordinator": f"127.0.0.1:{_free_port()}"}
    env = {**os.environ, "XLA_FLAGS": f"{ONE_THREAD} --xla_force_host_platform_device_count=1"}
    env.pop("JAX_PLATFORMS", None)
    pin = shutil.which("taskset")
    procs = []
    for i in range(processes):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--scaling-worker",
               json.dumps({**spec, "process_id": i})]
        if pin:
            cmd = [pin, "-c", str(args.cores[i]), *cmd]
        procs.append(subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    t0 = time.perf_counter()
    logs = [p.communicate(timeout=args.scaling_timeout)[0] for p in procs]
    wall = time.perf_counter() - t0
    results = []
    for p, log in zip(procs, logs):
        lines = [ln for ln in log.splitlines() if ln.startswith("SCALING_RESULT ")]
        if p.returncode != 0 or not lines:
            tails = "\n".join(f"--- process {i} (rc {q.returncode}):\n{lg[-2500:]}"
                              for i, (q, lg) in enumerate(zip(procs, logs)))
            raise RuntimeError(f"scaling run {name} failed:\n{tails}")
        results.append(json.loads(lines[-1].split(" ", 1)[1]))
    wu = args.warmup_steps
    times = [r["step_times"] for r in results]
    # Slowest process per step (they run in lockstep; the difference is the wait at the end).
    per_step = np.max(np.array(times), axis=0)
    return {
        "displaced": [float(t) for i, t in enumerate(per_step) if i > wu + 1],
        "sync": [float(t) for i, t in enumerate(per_step) if 1 < i <= wu],
        "compile_and_first_steps_s": float(sum(per_step[i] for i in (0, 1, wu + 1))),
        "load_seconds": max(r["load_seconds"] for r in results),
        "wall_seconds": wall, "step_times": times, "load_average": list(os.getloadavg()),
    }


def scaling_cost(args, h: int, w: int) -> dict:
    """Per-device FLOPs and exchange of one step, per mode (abstract shapes, nothing runs)."""
    import jax
    import numpy as np

    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.parallel.cost import step_cost
    from distrifusion_jax.pipeline import DistriSDXLPipeline
    from distrifusion_jax.prompt import encode_prompts

    pipe = DistriSDXLPipeline.from_pretrained(args.model, parallel=ParallelConfig(patches=1))

    def shape(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype)

    params = jax.tree.map(shape, pipe.unet_params)
    lat = jax.ShapeDtypeStruct((1, h, w, pipe.unet.config.in_channels), np.float32)
    cond = encode_prompts(pipe.encoders, [SCALING_PROMPT], None, True, pipe.is_sdxl,
                          [h, w, 0, 0, h, w] if pipe.is_sdxl else None)
    cond = jax.tree.map(shape, cond)
    out = {}
    for n, mode in [(1, "corrected_async_gn")] + [(2, m) for m in args.scaling_modes]:
        pc = ParallelConfig(patches=n, **mode_fields(mode))
        c = step_cost(pipe.unet, params, pc, lat, cond)
        out[f"n{n}/{mode}"] = {
            "flops_per_device": c.flops, "exchanged_bytes": c.exchanged_bytes,
            "collective_calls": int(sum(k.get("calls", 0) for k in c.by_kind.values())),
            "by_kind": c.by_kind,
        }
    return out


def scaling(args) -> dict:
    import numpy as np

    h = args.height or 128
    w = args.width or h
    print("  cost analysis (abstract shapes) ...", file=sys.stderr, flush=True)
    cost = scaling_cost(args, h, w)
    load = list(os.getloadavg())
    runs = [("1 process, 1 device", 1, "corrected_async_gn", None)]
    for mode in args.scaling_modes:
        split = "row" if mode == "naive_patch" else None
        label = f"2 processes, n=2, {mode}" + (f" ({split})" if split else "")
        runs.append((label, 2, mode, split))
    rounds = {name: [] for name, *_ in runs}
    for k in range(args.rounds):  # interleaved, so slow phases of a shared machine hit all runs
        for name, procs, mode, split in runs:
            print(f"  round {k + 1}/{args.rounds}: {name} at {h}x{w} ...", file=sys.stderr,
                  flush=True)
            r = _run_scaling(args, name, procs, mode, split, h, w)
            rounds[name].append(r)
            print(f"    median step {np.median(r['displaced']):.3f} s, compile+first steps "
                  f"{r['compile_and_first_steps_s']:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for name, procs, mode, split in runs:
        rs = rounds[name]
        sync = [t for r in rs for t in r["sync"]]
        rows.append({
            "name": name, "processes": procs, "n": procs, "mode": mode, "naive_split": split,
            "median_step_s": float(np.median([t for r in rs for t in r["displaced"]])),
            "round_medians_s": [float(np.median(r["displaced"])) for r in rs],
            "median_sync_step_s": float(np.median(sync)) if sync else None,
            "compile_and_first_steps_s": float(np.median([r["compile_and_first_steps_s"]
                                                          for r in rs])),
            "pinned_cores": args.cores[:procs] if shutil.which("taskset") else None,
            "rounds": rs,
        })
    base = rows[0]
    for r in rows:
        r["speedup_vs_1"] = base["median_step_s"] / r["median_step_s"]
        r["round_speedups"] = [b / x for b, x in zip(base["round_medians_s"],
                                                     r["round_medians_s"])]
    run_of = {r["mode"]: r for r in rows[1:]}
    return {
        "kind": "scaling", "model": args.model, "height": h, "width": w, "batch": 2,
        "prompt": SCALING_PROMPT, "scheduler": args.scheduler, "warmup_steps": args.warmup_steps,
        "steps": args.warmup_steps + 2 + args.repeats, "repeats": args.repeats,
        "rounds": args.rounds, "cores": args.cores,
        "cpu_count": os.cpu_count(), "load_average_before": load,
        "load_average_after": list(os.getloadavg()), "xla_flags": ONE_THREAD, "runs": rows,
        "speedup": run_of.get("corrected_async_gn", {}).get("speedup_vs_1"),
        "speedup_fused": run_of.get("corrected_async_gn+fused", {}).get("speedup_vs_1"),
        "cost": cost,
        "breakdown": breakdown(rows, cost),
    }


def breakdown(rows: list[dict], cost: dict) -> dict | None:
    """Where a 2-process DistriFusion step's time goes, by ablation of the measured runs.

    ideal = t(1 process) / 2; split = t(no_sync) - ideal: the same displaced computation with
    no exchange, so replicated work (FLOPs above 1/2, from the cost analysis), lockstep waits
    and smaller kernels; exchange = t(full_sync) - t(no_sync): CPU collectives block (nothing
    overlaps them on one thread); displaced = t(corrected_async_gn) - t(full_sync): the stale
    buffers' bookkeeping, which on an accelerator would buy overlap and here only costs;
    fused exchange = t(corrected_async_gn+fused) - t(no_sync), when that run is present.
    Seconds per step; None unless all four runs are present.
    """
    by_mode = {r["mode"]: r["median_step_s"] for r in rows if r["processes"] == 2}
    one = next((r["median_step_s"] for r in rows if r["processes"] == 1), None)
    if one is None or not {"no_sync", "full_sync", "corrected_async_gn"} <= set(by_mode):
        return None
    out = {
        "one_process_s": one,
        "ideal_s": one / 2,
        "split_overhead_s": by_mode["no_sync"] - one / 2,
        "exchange_s": by_mode["full_sync"] - by_mode["no_sync"],
        "displaced_bookkeeping_s": by_mode["corrected_async_gn"] - by_mode["full_sync"],
        "distrifusion_s": by_mode["corrected_async_gn"],
    }
    c1, c2 = cost.get("n1/corrected_async_gn"), cost.get("n2/no_sync")
    if c1 and c2:
        out["replicated_flops_s"] = one * (c2["flops_per_device"] / c1["flops_per_device"] - 0.5)
    if "corrected_async_gn+fused" in by_mode:
        out["fused_exchange_s"] = by_mode["corrected_async_gn+fused"] - by_mode["no_sync"]
        out["distrifusion_fused_s"] = by_mode["corrected_async_gn+fused"]
    return out


def print_scaling(res: dict) -> None:
    head = (f"{'run':<40} {'step s':>7} {'speedup':>7} {'per round':>17} {'sync step s':>11} "
            f"{'compile s':>9}")
    print(f"scaling at {res['height']}x{res['width']} (batch 2 = CFG pair), {res['scheduler']}, "
          f"w={res['warmup_steps']}, one thread per process, cores {res['cores']}, "
          f"{res['rounds']} rounds x {res['repeats']} steady displaced steps")
    print(head)
    print("-" * len(head))
    for r in res["runs"]:
        sync = f"{r['median_sync_step_s']:.3f}" if r["median_sync_step_s"] is not None else "-"
        per = " ".join(f"{x:.2f}" for x in r["round_speedups"])
        print(f"{r['name']:<40} {r['median_step_s']:>7.3f} {r['speedup_vs_1']:>6.2f}x "
              f"{per:>17} {sync:>11} {r['compile_and_first_steps_s']:>9.1f}")
    cost = res.get("cost", {})
    one = cost.get("n1/corrected_async_gn")
    for key, c in cost.items():
        ratio = f", {c['flops_per_device'] / one['flops_per_device']:.3f} of 1 device" if one else ""
        print(f"  {key}: {c['flops_per_device'] / 1e9:.2f} GFLOP/device/step{ratio}, "
              f"{c['exchanged_bytes'] / 1e6:.2f} MB received in {c['collective_calls']} "
              f"collectives/step")
    b = res.get("breakdown")
    if b:
        print(f"where the 2-process step goes (s): ideal {b['ideal_s']:.3f} + split overhead "
              f"{b['split_overhead_s']:.3f} (replicated FLOPs "
              f"{b.get('replicated_flops_s', float('nan')):.3f}) + exchange "
              f"{b['exchange_s']:.3f} + displaced bookkeeping "
              f"{b['displaced_bookkeeping_s']:.3f} = {b['distrifusion_s']:.3f}")
        if "fused_exchange_s" in b:
            print(f"  with fused exchange: ideal {b['ideal_s']:.3f} + split overhead "
                  f"{b['split_overhead_s']:.3f} + exchange {b['fused_exchange_s']:.3f} = "
                  f"{b['distrifusion_fused_s']:.3f}")
    if res["speedup"] is not None:
        print(f"DistriFusion speedup, 2 processes vs 1: {res['speedup']:.2f}x "
              f"(median displaced step; 'per round' = speedup within each interleaved round)")
    if res.get("speedup_fused") is not None:
        print(f"DistriFusion with fused exchange, 2 processes vs 1: {res['speedup_fused']:.2f}x")


def _write_json(path: str, res: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scaling_worker:
        return scaling_worker(json.loads(args.scaling_worker))
    t0 = time.perf_counter()
    # This process's fake CPU devices (cost analysis, model mode); scaling workers set their own.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
    )
    if args.scaling:
        res = scaling(args)
        res["seconds_total"] = time.perf_counter() - t0
        out = _write_json(args.json, res)
        if not args.no_plots:
            plot_scaling(res, out.with_suffix(".png"))
        print_scaling(res)
        return 0
    if args.sdxl_shapes:
        rows = sdxl_rows(args)
        res = {"kind": "sdxl_shapes", "mode": args.mode, "pcpp": args.pcpp,
               "link_gbps": args.link_gbps, "rows": rows, "seconds_total": time.perf_counter() - t0}
        out = _write_json(args.json, res)
        if not args.no_plots:
            plot_sdxl(rows, out.with_suffix(".png"))
        print_sdxl_table(rows, args.link_gbps)
        return 0
    rows = model_rows(args)
    res = {"kind": "model", "model": args.model, "mode": args.mode, "pcpp": args.pcpp,
           "cfg_split": args.cfg_split, "steps": args.steps, "scheduler": args.scheduler, "warmup_steps": args.warmup_steps,
           "cpu_devices": args.cpu_devices, "cpu_count": os.cpu_count(),
           "device_note": f"{args.cpu_devices} fake CPU devices on {os.cpu_count()} cores: "
                          "latency shows overhead, not speedup",
           "rows": rows, "seconds_total": time.perf_counter() - t0}
    out = _write_json(args.json, res)
    if not args.no_plots:
        plot_model(res, out.with_suffix(".png"))
    print_model_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
