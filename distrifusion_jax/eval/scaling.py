"""Real multi-process scaling on this CPU: the same generation as 1 process and as 2 processes.

Each run starts its processes with `launcher.launch` (`jax.distributed` on 127.0.0.1, one
device and one compute thread each, pinned to a core); each process runs `worker` (this module
as `python -m distrifusion_jax.eval.scaling SPEC`) and reports its step times. Runs are
repeated in interleaved rounds; `scripts/benchmark.py --scaling` documents the JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from distrifusion_jax.eval.launcher import coordinator_address, emit_result, launch
from distrifusion_jax.eval.mode_labels import mode_fields

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
DEFAULT_MODES = (
    "corrected_async_gn",
    "corrected_async_gn+fused",
    "full_sync",
    "no_sync",
    "naive_patch",
)


@dataclasses.dataclass(frozen=True)
class ScalingOptions:
    """`scripts/benchmark.py --scaling` flags of the same names."""

    model: str
    height: int = 128
    width: int = 128
    scheduler: str = "ddim"
    warmup_steps: int = 4  # w: steps 0..w synchronous
    repeats: int = 8  # steady displaced steps per run
    rounds: int = 3  # interleaved repetitions of all runs
    modes: tuple[str, ...] = DEFAULT_MODES  # 2-process runs (`mode_labels`)
    cores: tuple[int, int] = (0, 1)  # pinned with taskset
    timeout: float = 1200.0  # seconds per run
    link_rate: str | None = None  # loopback rate limit for the runs (`throttled_loopback`)

    @property
    def steps(self) -> int:
        return self.warmup_steps + 2 + self.repeats


# The bucket must hold one packet: lo's MTU is 64 KiB, so with `burst 64kb` a full-size
# packet never fits, is dropped forever and TCP (Gloo's collectives) times out.
TC_QDISC = ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "RATE", "burst", "256kb",
            "latency", "50ms"]  # fmt: skip


@contextlib.contextmanager
def throttled_loopback(rate: str | None) -> Iterator[None]:
    """Rate-limit the loopback interface (Linux traffic control, token bucket) to `rate`
    (tc units: "1gbit", "200mbit") while the block runs; the qdisc is removed afterwards, also
    on errors. None: nothing changes.

    Raises:
      RuntimeError: tc is missing, not root, or lo already has a root qdisc (the message says
        how to fix it).
    """
    if rate is None:
        yield
        return
    if shutil.which("tc") is None or os.geteuid() != 0:
        raise RuntimeError(
            "--link-rate needs root and tc (iproute2): run as root, or drop --link-rate"
        )
    cmd = [rate if a == "RATE" else a for a in TC_QDISC]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(cmd)} failed: {done.stderr.strip()}; if lo already has a qdisc, remove "
            "it with `tc qdisc del dev lo root`"
        )
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def worker(spec: dict[str, Any]) -> int:
    """One process of a run: load, generate, emit this process's step times."""
    t0 = time.perf_counter()
    import jax

    if spec["processes"] > 1:
        from distrifusion_jax.parallel.mesh import initialize_distributed

        initialize_distributed(spec["coordinator"], spec["processes"], spec["process_id"])
    from distrifusion_jax.eval.benchmark_model import PROMPT
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    pc = ParallelConfig(
        **mode_fields(spec["mode"]),
        patches=spec["n"],
        naive_split=spec["naive_split"] or "row",
        warmup_steps=spec["warmup_steps"],
    )
    pipe = DistriSDXLPipeline.from_pretrained(spec["model"], parallel=pc)
    load = time.perf_counter() - t0
    pipe.generate_latents(
        PROMPT,
        height=spec["height"],
        width=spec["width"],
        num_inference_steps=spec["steps"],
        guidance_scale=5.0,
        scheduler=spec["scheduler"],
        progress=iter,
    )
    emit_result(
        {
            "process_id": jax.process_index(),
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "load_seconds": load,
            "step_times": [list(t) for t in pipe.timings.step_times],
        }
    )
    return 0


def run_once(
    opts: ScalingOptions, name: str, processes: int, mode: str, naive_split: str | None
) -> dict[str, Any]:
    """One run (1 or 2 processes); its steady displaced/sync step times (slowest process)."""
    spec = {
        "model": opts.model,
        "n": processes,
        "mode": mode,
        "naive_split": naive_split,
        "warmup_steps": opts.warmup_steps,
        "height": opts.height,
        "width": opts.width,
        "steps": opts.steps,
        "scheduler": opts.scheduler,
        "processes": processes,
        "coordinator": coordinator_address(),
    }
    env = {**os.environ, "XLA_FLAGS": f"{ONE_THREAD} --xla_force_host_platform_device_count=1"}
    env.pop("JAX_PLATFORMS", None)
    results, wall = launch(
        lambda i: [sys.executable, "-m", __name__, json.dumps({**spec, "process_id": i})],
        processes,
        env=env,
        cores=opts.cores,
        timeout=opts.timeout,
        name=f"scaling run {name}",
    )
    times = np.array([r["step_times"] for r in results])  # [process, step, (seconds, compiled)]
    # Slowest process per step (they run in lockstep; the difference is the wait at the end).
    per_step, compiled = times[..., 0].max(0), times[..., 1].any(0)
    steady = [(i, float(t)) for i, t in enumerate(per_step) if not compiled[i]]
    wu = opts.warmup_steps
    return {
        "displaced": [t for i, t in steady if i > wu],
        "sync": [t for i, t in steady if 0 < i <= wu],
        "compile_and_first_steps_s": float(per_step[compiled].sum()),
        "load_seconds": max(r["load_seconds"] for r in results),
        "wall_seconds": wall,
        "step_times": times[..., 0].tolist(),
        "load_average": list(os.getloadavg()),
    }


def scaling_cost(opts: ScalingOptions) -> dict[str, dict]:
    """Per-device FLOPs and exchange of one step, per mode (abstract shapes, nothing runs)."""
    import jax

    from distrifusion_jax.eval.benchmark_model import step_shapes
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.parallel.cost import step_cost
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    h, w = opts.height, opts.width
    pipe = DistriSDXLPipeline.from_pretrained(opts.model, parallel=ParallelConfig(patches=1))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pipe.unet_params)
    lat, cond = step_shapes(pipe, h, w)  # h, w are pixels; the UNet sees the latent
    out = {}
    for n, mode in [(1, "corrected_async_gn")] + [(2, m) for m in opts.modes]:
        pc = ParallelConfig(patches=n, **mode_fields(mode))
        c = step_cost(pipe.unet, params, pc, lat, cond)
        out[f"n{n}/{mode}"] = {
            "flops_per_device": c.flops,
            "exchanged_bytes": c.exchanged_bytes,
            "collective_calls": int(sum(k.get("calls", 0) for k in c.by_kind.values())),
            "by_kind": c.by_kind,
        }
    return out


def scaling(opts: ScalingOptions) -> dict[str, Any]:
    """All runs, `opts.rounds` interleaved rounds; the `--scaling` JSON (less seconds_total)."""
    from distrifusion_jax.eval.benchmark_model import PROMPT

    h, w = opts.height, opts.width
    print("  cost analysis (abstract shapes) ...", file=sys.stderr, flush=True)
    cost = scaling_cost(opts)
    load = list(os.getloadavg())
    runs = [("1 process, 1 device", 1, "corrected_async_gn", None)]
    for mode in opts.modes:
        split = "row" if mode == "naive_patch" else None
        label = f"2 processes, n=2, {mode}" + (f" ({split})" if split else "")
        runs.append((label, 2, mode, split))
    rounds = {name: [] for name, *_ in runs}
    with throttled_loopback(opts.link_rate):
        for k in range(opts.rounds):  # interleaved: slow phases of a shared machine hit all runs
            for name, procs, mode, split in runs:
                print(
                    f"  round {k + 1}/{opts.rounds}: {name} at {h}x{w} ...",
                    file=sys.stderr,
                    flush=True,
                )
                r = run_once(opts, name, procs, mode, split)
                rounds[name].append(r)
                print(
                    f"    median step {np.median(r['displaced']):.3f} s, compile+first steps "
                    f"{r['compile_and_first_steps_s']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    for name, procs, mode, split in runs:
        rs = rounds[name]
        sync = [t for r in rs for t in r["sync"]]
        rows.append(
            {
                "name": name,
                "processes": procs,
                "n": procs,
                "mode": mode,
                "naive_split": split,
                "median_step_s": float(np.median([t for r in rs for t in r["displaced"]])),
                "round_medians_s": [float(np.median(r["displaced"])) for r in rs],
                "median_sync_step_s": float(np.median(sync)) if sync else None,
                "compile_and_first_steps_s": float(
                    np.median([r["compile_and_first_steps_s"] for r in rs])
                ),
                "pinned_cores": list(opts.cores[:procs]) if shutil.which("taskset") else None,
                "rounds": rs,
            }
        )
    base = rows[0]
    for r in rows:
        r["speedup_vs_1"] = base["median_step_s"] / r["median_step_s"]
        r["round_speedups"] = [b / x for b, x in zip(base["round_medians_s"], r["round_medians_s"])]
    run_of = {r["mode"]: r for r in rows[1:]}
    coded = [r for r in rows[1:] if mode_fields(r["mode"])["compress"]]
    best = max(coded, key=lambda r: r["speedup_vs_1"], default=None)
    return {
        "kind": "scaling",
        "model": opts.model,
        "height": h,
        "width": w,
        "batch": 2,
        "prompt": PROMPT,
        "scheduler": opts.scheduler,
        "warmup_steps": opts.warmup_steps,
        "steps": opts.steps,
        "repeats": opts.repeats,
        "rounds": opts.rounds,
        "cores": list(opts.cores),
        "cpu_count": os.cpu_count(),
        "load_average_before": load,
        "load_average_after": list(os.getloadavg()),
        "xla_flags": ONE_THREAD,
        "runs": rows,
        "speedup": run_of.get("corrected_async_gn", {}).get("speedup_vs_1"),
        "speedup_fused": run_of.get("corrected_async_gn+fused", {}).get("speedup_vs_1"),
        "best_compressed": None
        if best is None
        else {"mode": best["mode"], "speedup_vs_1": best["speedup_vs_1"]},
        "link_rate": opts.link_rate,
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
    """The `--scaling` table, the cost per mode and the breakdown."""
    head = (
        f"{'run':<40} {'step s':>7} {'speedup':>7} {'per round':>17} {'sync step s':>11} "
        f"{'compile s':>9}"
    )
    print(
        f"scaling at {res['height']}x{res['width']} (batch 2 = CFG pair), {res['scheduler']}, "
        f"w={res['warmup_steps']}, one thread per process, cores {res['cores']}, "
        f"{res['rounds']} rounds x {res['repeats']} steady displaced steps; loopback "
        + (f"rate-limited to {res['link_rate']} (tc tbf)" if res.get("link_rate") else "unlimited")
    )
    print(head)
    print("-" * len(head))
    for r in res["runs"]:
        sync = f"{r['median_sync_step_s']:.3f}" if r["median_sync_step_s"] is not None else "-"
        per = " ".join(f"{x:.2f}" for x in r["round_speedups"])
        print(
            f"{r['name']:<40} {r['median_step_s']:>7.3f} {r['speedup_vs_1']:>6.2f}x "
            f"{per:>17} {sync:>11} {r['compile_and_first_steps_s']:>9.1f}"
        )
    cost = res.get("cost", {})
    one = cost.get("n1/corrected_async_gn")
    for key, c in cost.items():
        ratio = (
            f", {c['flops_per_device'] / one['flops_per_device']:.3f} of 1 device" if one else ""
        )
        print(
            f"  {key}: {c['flops_per_device'] / 1e9:.2f} GFLOP/device/step{ratio}, "
            f"{c['exchanged_bytes'] / 1e6:.2f} MB received in {c['collective_calls']} "
            f"collectives/step"
        )
    b = res.get("breakdown")
    if b:
        print(
            f"where the 2-process step goes (s): ideal {b['ideal_s']:.3f} + split overhead "
            f"{b['split_overhead_s']:.3f} (replicated FLOPs "
            f"{b.get('replicated_flops_s', float('nan')):.3f}) + exchange "
            f"{b['exchange_s']:.3f} + displaced bookkeeping "
            f"{b['displaced_bookkeeping_s']:.3f} = {b['distrifusion_s']:.3f}"
        )
        if "fused_exchange_s" in b:
            print(
                f"  with fused exchange: ideal {b['ideal_s']:.3f} + split overhead "
                f"{b['split_overhead_s']:.3f} + exchange {b['fused_exchange_s']:.3f} = "
                f"{b['distrifusion_fused_s']:.3f}"
            )
    if res["speedup"] is not None:
        print(
            f"DistriFusion speedup, 2 processes vs 1: {res['speedup']:.2f}x "
            f"(median displaced step; 'per round' = speedup within each interleaved round)"
        )
    if res.get("speedup_fused") is not None:
        print(f"DistriFusion with fused exchange, 2 processes vs 1: {res['speedup_fused']:.2f}x")
    if res.get("best_compressed"):
        b = res["best_compressed"]
        print(f"best compressed exchange, {b['mode']}: {b['speedup_vs_1']:.2f}x")


if __name__ == "__main__":
    sys.exit(worker(json.loads(sys.argv[1])))
