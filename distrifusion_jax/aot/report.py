"""Rows, table and timeline picture of accelerator-compiled steps (`benchmark.py --target`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distrifusion_jax.aot import hlo
from distrifusion_jax.aot.compile import (
    abstract_unet,
    compile_sampler,
    compile_step,
    target_devices,
)
from distrifusion_jax.aot.overlap import TARGETS, Overlap, analyze, busiest
from distrifusion_jax.models.controlnet_config import ControlNetConfig
from distrifusion_jax.models.unet_config import UNetConfig
from distrifusion_jax.parallel import ParallelConfig

GiB = 1024**3


def analyze_compiled(compiled, target) -> Overlap:
    comps = hlo.parse_module(compiled.as_text())
    return analyze(busiest(comps), comps, TARGETS[target] if isinstance(target, str) else target)


def aot_rows(
    targets: list[str],
    resolutions: list[int],
    config: UNetConfig,
    parallel: ParallelConfig,
    programs: tuple[str, ...] = ("step",),
    scheduler_config: dict | None = None,
    steps: int = 50,
    log=print,
    controlnets: tuple[ControlNetConfig, ...] = (),
) -> tuple[list[dict], dict]:
    """Compile each program for each target and resolution; one row each. With `controlnets`
    the step is a `ControlledUNet`'s (the ControlNets run on the same bands; "step" only).

    Returns the rows and `{(target, resolution, program): Overlap}` for pictures.
    """
    if controlnets and programs != ("step",):
        raise ValueError("ControlNets are compiled in the step program only; drop 'sampler'.")
    model, params = abstract_unet(config, controlnets=controlnets)
    rows, overlaps = [], {}
    for name in targets:
        target = TARGETS[name]
        pc = dataclasses.replace(parallel, patches=target.devices // parallel.cfg)
        devices = target_devices(target)
        for res in resolutions:
            for program in programs:
                log(f"[aot] compiling the {program} for {name} at {res}^2 ...")
                if program == "step":
                    c = compile_step(model, params, pc, devices, res, target=target)
                else:
                    c = compile_sampler(
                        model, params, pc, devices, res, scheduler_config, steps, target=target
                    )
                ov = analyze_compiled(c.compiled, target)
                overlaps[(name, res, program)] = ov
                rows.append(
                    {
                        "target": name,
                        "resolution": res,
                        "program": program,
                        "n": pc.patches,
                        "mode": pc.mode,
                        "pcpp": pc.pcpp,
                        "controlnets": len(controlnets),
                        "compile_s": c.compile_s,
                        **c.memory(),
                        **ov.summary(),
                    }
                )
                log(f"[aot]   done in {c.compile_s:.0f} s")
    return rows, overlaps


def print_aot_table(rows: list[dict]) -> None:
    head = (
        f"{'target':<8} {'res':>5} {'program':<8} {'peak GiB':>9} {'temp GiB':>9} "
        f"{'exch MB':>8} {'xfer ms':>8} {'comp ms':>8} {'ag':>4} {'cp':>4} "
        f"{'hidden(win)':>11} {'hidden(sim)':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        kinds = r["collectives"]
        print(
            f"{r['target']:<8} {r['resolution']:>5} {r['program']:<8} "
            f"{r['peak_bytes'] / GiB:>9.2f} {r['temp_bytes'] / GiB:>9.2f} "
            f"{r['exchanged_mb']:>8.1f} {r['transfer_ms']:>8.3f} {r['compute_ms']:>8.3f} "
            f"{kinds.get('all-gather', 0):>4} {kinds.get('collective-permute', 0):>4} "
            f"{r['hidden_fraction_window']:>11.3f} {r['hidden_fraction_simulated']:>11.3f}"
        )


def plot_timeline(ov: Overlap, title: str, path: Path) -> None:
    """One step on the roofline clock: compute ops on top, each collective's transfer below,
    from its start to its done (stalls in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    t = 0.0
    for dt in ov.op_times:
        if dt > 0:
            ax.barh(0, dt * 1e3, left=t * 1e3, height=0.8, color="tab:blue", linewidth=0)
        t += dt
    for k, c in enumerate(sorted(ov.collectives, key=lambda c: c.start)):
        y = 1.2 + 0.9 * k / max(1, len(ov.collectives))
        ax.plot([c.start_time_s * 1e3, c.done_time_s * 1e3], [y, y], color="0.6", lw=0.6)
        ax.plot(
            [c.start_time_s * 1e3, c.start_time_s * 1e3 + c.transfer_s * 1e3], [y, y],
            color="tab:orange", lw=1.5,
        )
        if c.stall_s > 0:
            ax.plot(c.done_time_s * 1e3, y, "|", color="tab:red", ms=6)
    ax.set_yticks([0, 1.65])
    ax.set_yticklabels(["compute", "collectives"])
    ax.set_xlabel("ms (roofline estimate)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
