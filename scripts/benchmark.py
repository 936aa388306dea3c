"""Benchmark DistriFusion steps: FLOPs, exchange, stale memory, latency; prints a table, writes JSON.

    python scripts/benchmark.py --sdxl-shapes                 # full SDXL, abstract shapes only
    python scripts/benchmark.py --model distrifusion_jax/assets/tiny-sdxl --patches 1 2 4 8
    python scripts/benchmark.py --scaling --height 256 --repeats 8   # 1 vs 2 processes, pinned

`--sdxl-shapes`: the full SDXL base UNet at 1024^2, 2048^2, 3840^2, n = 2, 4, 8, batch 2 (CFG
pair on every device, no CFG split), traced from `jax.eval_shape` params (no weights, nothing
executed): per-device FLOPs of the displaced step (XLA cost analysis of the lowered program)
vs the single-device step, elements received per device per step (counted from the step's
collectives), stale-state bytes per device (bf16 activations, fp32 GroupNorm moments).
Otherwise: the same figures for a real model plus compile time and the median step latency
(on fake CPU devices the latency shows overhead, not speedup: they share the CPU cores).

JSON schema (`--json`, default results/benchmark.json): {"kind": "sdxl_shapes" | "model",
"rows": [{"resolution": int, "n": int, "batch": int, "flops_per_device": float,
"flops_ratio_vs_1": float, "exchanged_elements": float, "exchanged_bytes": float,
"state_bytes": int, "original_elements": float | null, ...}]}.

`--scaling`: real multi-process scaling on this CPU. The same generation (one prompt, CFG pair,
`--height` x `--width`, DDIM) runs as 1 process with 1 CPU device, then as 2 processes
(`jax.distributed`, coordinator on 127.0.0.1) with 1 device each and n = 2 row bands, in the
modes `--scaling-modes` (default: corrected_async_gn = DistriFusion, full_sync = synchronous
patch parallelism, naive_patch = no exchange, the no-communication bound). Every process gets
one compute thread (`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`) and
is pinned to its own core with `taskset -c` (`--cores`, the 1-process run uses the first).
Steps 0..w are synchronous, w+1.. displaced; the first call of each of the three jitted step
functions (steps 0, 1, w+1) compiles and is reported apart; the step time is the median of the
other displaced steps (`--repeats` of them) and, separately, of the steady synchronous steps.
JSON (`--json`, default results/scaling.json): {"kind": "scaling", "model": str,
"height": int, "width": int, "batch": 2, "scheduler": str, "warmup_steps": int,
"steps": int, "cores": [int], "cpu_count": int, "load_average_before": [float],
"runs": [{"name": str, "processes": int, "n": int, "mode": str, "naive_split": str | null,
"median_step_s": float (steady displaced steps, slowest process), "median_sync_step_s":
float | null, "compile_and_first_steps_s": float, "load_seconds": float,
"step_times": [[float] per process], "speedup_vs_1": float}],
"speedup": float (1-process / 2-process corrected_async_gn median step)}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
    p.add_argument("--mode", default="corrected_async_gn")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=2, help="images per device (2 = CFG pair)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--json", default=None,
                   help="default results/benchmark.json (results/scaling.json with --scaling)")
    p.add_argument("--scaling", action="store_true", help="1 process vs 2 processes (see above)")
    p.add_argument("--scaling-modes", nargs="+",
                   default=["corrected_async_gn", "full_sync", "naive_patch"])
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], help="CPU cores to pin to")
    p.add_argument("--scheduler", default="ddim", help="(--scaling) sampler")
    p.add_argument("--warmup-steps", type=int, default=4, help="(--scaling) w")
    p.add_argument("--scaling-timeout", type=int, default=1200, help="seconds per run")
    p.add_argument("--scaling-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.json is None:
        args.json = str(REPO / "results" / ("scaling.json" if args.scaling else "benchmark.json"))
    return args


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
            c = step_cost(model, params, ParallelConfig(patches=n, mode=args.mode), lat, cond)
            base = c.flops if n == 1 else base
            orig = ORIGINAL.get((res, n), (None, None))
            rows.append({
                "resolution": res, "n": n, "batch": 2, "flops_per_device": c.flops,
                "flops_ratio_vs_1": c.flops / base, "ideal_ratio": 1 / n,
                "exchanged_elements": c.exchanged_elements, "exchanged_bytes": c.exchanged_bytes,
                "state_bytes": c.state_bytes, "original_elements": orig[0],
                "original_state_bytes": orig[1], "by_kind": c.by_kind,
                "trace_seconds": time.perf_counter() - t0,
            })
            print(f"  traced {res}^2 n={n} in {rows[-1]['trace_seconds']:.1f} s", file=sys.stderr)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'res':>5} {'n':>2} {'TFLOP/dev':>10} {'x 1-dev':>8} {'ideal':>6} "
            f"{'recv G el':>9} {'orig G el':>9} {'stale GB':>8} {'orig GB':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        oe = f"{r['original_elements'] / 1e9:.3f}" if r.get("original_elements") else "-"
        ob = f"{r['original_state_bytes'] / 1e9:.2f}" if r.get("original_state_bytes") else "-"
        print(f"{r['resolution']:>5} {r['n']:>2} {r['flops_per_device'] / 1e12:>10.2f} "
              f"{r['flops_ratio_vs_1']:>8.4f} {1 / r['n']:>6.3f} "
              f"{r['exchanged_elements'] / 1e9:>9.3f} {oe:>9} "
              f"{r['state_bytes'] / 1e9:>8.2f} {ob:>7}")


def model_rows(args) -> list[dict]:
    import jax
    import numpy as np

    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.parallel.cost import step_cost
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    rows, base = [], None
    for n in args.patches:
        pc = ParallelConfig(patches=n, mode=args.mode if n > 1 else "corrected_async_gn")
        pipe = DistriSDXLPipeline.from_pretrained(args.model, parallel=pc)
        h = args.height or pipe.default_size
        w = args.width or pipe.default_size
        f = pipe.vae_scale_factor
        lat = jax.ShapeDtypeStruct((1, h // f, w // f, pipe.unet.config.in_channels), np.float32)
        from distrifusion_jax.prompt import encode_prompts

        cond = encode_prompts(pipe.encoders, ["x"], None, True, pipe.is_sdxl,
                              [h, w, 0, 0, h, w] if pipe.is_sdxl else None)
        cond_s = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cond)
        c = step_cost(pipe.unet, pipe.unet_params, pc, lat, cond_s)
        base = c.flops if base is None else base
        t0 = time.perf_counter()
        pipe.generate_latents("x", height=h, width=w, num_inference_steps=args.repeats + 8,
                              progress=iter)
        total = time.perf_counter() - t0
        compile_steps = {0, 1, pc.warmup_steps + 1}
        steady = [s for i, s in enumerate(pipe.timings.step_times) if i not in compile_steps]
        rows.append({
            "resolution": h, "n": n, "batch": 2, "flops_per_device": c.flops,
            "flops_ratio_vs_1": c.flops / base, "exchanged_elements": c.exchanged_elements,
            "exchanged_bytes": c.exchanged_bytes, "state_bytes": c.state_bytes,
            "median_step_seconds": float(np.median(steady)),
            "compile_and_first_steps_seconds": sum(pipe.timings.step_times[i] for i in compile_steps),
            "end_to_end_seconds": total,
        })
        print(f"  n={n}: median step {rows[-1]['median_step_seconds'] * 1e3:.1f} ms", file=sys.stderr)
    return rows


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
    from distrifusion_jax import checkpoint
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    if spec["processes"] > 1:
        # Work-around: restore_params' default target is jax.devices()[0], a device that only
        # process 0 can address, so process 1 fails to read a converted (orbax) model. Restore
        # onto this process's first local device instead (what the default should be).
        restore = checkpoint.restore_params

        def restore_local(directory, target=None, dtype=None, sharding=None, **kw):
            sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return restore(directory, target=target, dtype=dtype, sharding=sharding, **kw)

        checkpoint.restore_params = restore_local
    pc = ParallelConfig(patches=spec["n"], mode=spec["mode"],
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
    import shutil
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
    compile_steps = {0, 1, wu + 1}
    times = [r["step_times"] for r in results]
    # Slowest process per step (they run in lockstep; the difference is the wait at the end).
    per_step = np.max(np.array(times), axis=0)
    displaced = [t for i, t in enumerate(per_step) if i > wu + 1]
    sync = [t for i, t in enumerate(per_step) if 1 < i <= wu]
    return {
        "name": name, "processes": processes, "n": n, "mode": mode, "naive_split": naive_split,
        "median_step_s": float(np.median(displaced)),
        "median_sync_step_s": float(np.median(sync)) if sync else None,
        "compile_and_first_steps_s": float(sum(per_step[i] for i in compile_steps)),
        "load_seconds": max(r["load_seconds"] for r in results),
        "wall_seconds": wall, "step_times": times,
        "pinned_cores": args.cores[:processes] if pin else None,
    }


def scaling(args) -> dict:
    h = args.height or 256
    w = args.width or h
    load = list(os.getloadavg())
    runs = [("1 process, 1 device", 1, "corrected_async_gn", None)]
    for mode in args.scaling_modes:
        split = "row" if mode == "naive_patch" else None
        label = f"2 processes, n=2, {mode}" + (f" ({split})" if split else "")
        runs.append((label, 2, mode, split))
    rows = []
    for name, procs, mode, split in runs:
        print(f"  running {name} at {h}x{w} ...", file=sys.stderr, flush=True)
        rows.append(_run_scaling(args, name, procs, mode, split, h, w))
        r = rows[-1]
        print(f"  {name}: median step {r['median_step_s']:.3f} s, compile+first steps "
              f"{r['compile_and_first_steps_s']:.1f} s", file=sys.stderr, flush=True)
    base = rows[0]["median_step_s"]
    for r in rows:
        r["speedup_vs_1"] = base / r["median_step_s"]
    main_run = next((r for r in rows[1:] if r["mode"] == "corrected_async_gn"), None)
    return {
        "kind": "scaling", "model": args.model, "height": h, "width": w, "batch": 2,
        "prompt": SCALING_PROMPT, "scheduler": args.scheduler, "warmup_steps": args.warmup_steps,
        "steps": args.warmup_steps + 2 + args.repeats, "cores": args.cores,
        "cpu_count": os.cpu_count(), "load_average_before": load,
        "load_average_after": list(os.getloadavg()), "xla_flags": ONE_THREAD, "runs": rows,
        "speedup": main_run["speedup_vs_1"] if main_run else None,
    }


def print_scaling(res: dict) -> None:
    head = (f"{'run':<44} {'step s':>7} {'speedup':>7} {'sync step s':>11} {'compile s':>9}")
    print(f"scaling at {res['height']}x{res['width']} (batch 2 = CFG pair), {res['scheduler']}, "
          f"w={res['warmup_steps']}, one thread per process, cores {res['cores']}")
    print(head)
    print("-" * len(head))
    for r in res["runs"]:
        sync = f"{r['median_sync_step_s']:.3f}" if r["median_sync_step_s"] is not None else "-"
        print(f"{r['name']:<44} {r['median_step_s']:>7.3f} {r['speedup_vs_1']:>6.2f}x "
              f"{sync:>11} {r['compile_and_first_steps_s']:>9.1f}")
    if res["speedup"] is not None:
        print(f"DistriFusion speedup, 2 processes vs 1: {res['speedup']:.2f}x "
              f"(median displaced step)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scaling_worker:
        return scaling_worker(json.loads(args.scaling_worker))
    if args.scaling:
        t0 = time.perf_counter()
        res = scaling(args)
        res["seconds_total"] = time.perf_counter() - t0
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print_scaling(res)
        return 0
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
    )
    rows = sdxl_rows(args) if args.sdxl_shapes else model_rows(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = "sdxl_shapes" if args.sdxl_shapes else "model"
    out.write_text(json.dumps({"kind": kind, "mode": args.mode, "rows": rows}, indent=1))
    print_table(rows)
    if not args.sdxl_shapes:
        for r in rows:
            print(f"n={r['n']}: median step {r['median_step_seconds'] * 1e3:.1f} ms, "
                  f"compile+first steps {r['compile_and_first_steps_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
