"""Full SDXL base UNet on abstract shapes: per-device FLOPs, exchange, stale memory, projection.

Nothing is executed: params come from `jax.eval_shape`, costs from XLA's analysis of the
lowered step (`parallel.cost.step_cost`). Rows are beside the original's Table 2 and Fig. 6.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import jax
import jax.numpy as jnp

from distrifusion_jax.eval.benchmark_controlnet import cond_shapes
from distrifusion_jax.eval.mode_labels import mode_fields
from distrifusion_jax.io.components import COMPONENTS
from distrifusion_jax.models import UNet2DConditionModel, sdxl_base
from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.cost import step_cost

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
# distrifuser Fig. 6: measured speedup on A100s, 50-step DDIM, no CFG split; 1-GPU seconds.
PAPER_SPEEDUP = {
    (1024, 2): 1.5,
    (1024, 4): 2.2,
    (1024, 8): 2.8,
    (2048, 2): 1.8,
    (2048, 4): 3.1,
    (2048, 8): 4.9,
    (3840, 2): 1.8,
    (3840, 4): 3.4,
    (3840, 8): 6.1,
}
PAPER_ONE_GPU_STEP_S = {1024: 5.02 / 50, 2048: 23.7 / 50, 3840: 140 / 50}
# Table 2, "No Comm." on 8 A100s: the compute-only step, GPU efficiency on 1/8 patches included.
PAPER_NO_COMM_STEP_S = {(1024, 8): 1.48 / 50, (2048, 8): 4.14 / 50, (3840, 8): 21.3 / 50}


def sdxl_rows(
    resolutions: list[int],
    patches: list[int],
    mode: str = "corrected_async_gn",
    pcpp: float | None = None,
    link_gbps: float = 200.0,
    codecs: tuple[str, ...] = (),
) -> list[dict]:
    """One row per (resolution, n), n = 1 first; batch 2 (the CFG pair), bf16 activations.

    Args:
      resolutions: pixels per side (the latent is 1/8).
      patches: n values (1 is always added as the baseline).
      mode: a `mode_labels` label; pcpp: PCPP portion or None.
      link_gbps: the projection's link bandwidth (GB/s).
      codecs: `compress` codecs whose step is traced too for n > 1: the row's
        "codec_bytes" {codec: {collective kind: bytes received per device per step}}.
    """
    model = UNet2DConditionModel(sdxl_base(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    f32 = jnp.float32
    params = COMPONENTS["unet"].target(model)  # shapes only
    link = link_gbps * 1e9
    rows = []
    for res in resolutions:
        lat = jax.ShapeDtypeStruct((1, res // 8, res // 8, 4), f32)
        cond = cond_shapes(model.config)  # the CFG pair [2, 1, ...]
        base = None
        for n in [1] + [k for k in patches if k > 1]:
            t0 = time.perf_counter()
            pc = ParallelConfig(patches=n, pcpp=pcpp, **mode_fields(mode))
            c = step_cost(model, params, pc, lat, cond)
            base = c.flops if n == 1 else base
            orig = ORIGINAL.get((res, n), (None, None))
            row = {
                "resolution": res,
                "n": n,
                "batch": 2,
                "flops_per_device": c.flops,
                "flops_ratio_vs_1": c.flops / base,
                "ideal_ratio": 1 / n,
                "exchanged_elements": c.exchanged_elements,
                "exchanged_bytes": c.exchanged_bytes,
                "analytic_elements": c.analytic_elements,
                "state_bytes": c.state_bytes,
                "original_elements": orig[0],
                "original_state_bytes": orig[1],
                "by_kind": c.by_kind,
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
            if n > 1 and codecs:
                row["codec_bytes"] = {"none": {k: v["bytes"] for k, v in c.by_kind.items()}}
                for codec in codecs:
                    coded = step_cost(model, params, replace(pc, compress=codec), lat, cond)
                    row["codec_bytes"][codec] = {k: v["bytes"] for k, v in coded.by_kind.items()}
            rows.append(row)
            print(f"  traced {res}^2 n={n} in {row['trace_seconds']:.1f} s", file=sys.stderr)
    return rows


def print_sdxl_table(rows: list[dict], link_gbps: float) -> None:
    """The `--sdxl-shapes` table and the projection's assumptions."""
    head = (
        f"{'res':>5} {'n':>2} {'TFLOP/dev':>10} {'x 1-dev':>8} {'ideal':>6} "
        f"{'recv G el':>9} {'formula':>8} {'orig G el':>9} {'stale GB':>8} {'orig GB':>7} "
        f"{'proj x':>7} {'sync x':>7} {'paper x':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        oe = f"{r['original_elements'] / 1e9:.3f}" if r.get("original_elements") else "-"
        ob = f"{r['original_state_bytes'] / 1e9:.2f}" if r.get("original_state_bytes") else "-"
        pd = f"{r['projected_speedup_displaced']:.2f}" if "projected_speedup_sync" in r else "-"
        ps = f"{r['projected_speedup_sync']:.2f}" if "projected_speedup_sync" in r else "-"
        pp = f"{r['paper_speedup']:.1f}" if r.get("paper_speedup") else "-"
        print(
            f"{r['resolution']:>5} {r['n']:>2} {r['flops_per_device'] / 1e12:>10.2f} "
            f"{r['flops_ratio_vs_1']:>8.4f} {1 / r['n']:>6.3f} "
            f"{r['exchanged_elements'] / 1e9:>9.3f} "
            f"{sum(r['analytic_elements'].values()) / 1e9:>8.3f} {oe:>9} "
            f"{r['state_bytes'] / 1e9:>8.2f} {ob:>7} {pd:>7} {ps:>7} {pp:>7}"
        )
    print(
        f"proj x: projected speedup of the displaced step on A100s = t1 / max(t1 * FLOPs ratio, "
        f"bytes / {link_gbps:.0f} GB/s), t1 = the paper's 1-GPU step; sync x: t1 / (compute + "
        f"comm), synchronous patch parallelism; paper x: measured (Fig. 6). The projection "
        f"assumes no GPU efficiency is lost on 1/n-size patches, which the paper's numbers "
        f"show is false at 1024^2 (an upper bound)."
    )
    for r in rows:
        if "projected_speedup_displaced_no_comm_calibrated" in r:
            print(
                f"  {r['resolution']}^2 n={r['n']} with the paper's measured No-Comm step as the "
                f"compute time: displaced "
                f"{r['projected_speedup_displaced_no_comm_calibrated']:.2f}x, sync "
                f"{r['projected_speedup_sync_no_comm_calibrated']:.2f}x (paper: "
                f"{r['paper_speedup']:.1f}x DistriFusion; exchange "
                f"{r['projected_comm_ms']:.1f} ms/step at {link_gbps:.0f} GB/s)"
            )


def two_node_projection(
    rows: list[dict], per_node: int = 8, intra_gbps: float = 200.0, inter_gbps: float = 25.0
) -> list[dict]:
    """When does each codec make the displaced step compute-bound again on 2 nodes?

    For each row with n = 2 * `per_node` row bands and "codec_bytes": bands 0..7 on node 0,
    8..15 on node 1. The worst device (at the node boundary) receives over the inter-node link
    `per_node / (n - 1)` of its all-gathered K,V and one of its two halos; the rest over NVLink.
    Both links run at once and beside the compute (displaced: overlapped), so the step takes
    max(compute, intra bytes / `intra_gbps`, inter bytes / `inter_gbps`); compute is the
    paper's 1-GPU step (`PAPER_ONE_GPU_STEP_S`) times the row's FLOPs ratio.

    Returns:
      one dict per (resolution, codec): bytes, milliseconds, "compute_bound", "speedup_vs_1".
    """
    out = []
    for r in rows:
        n, res = r["n"], r["resolution"]
        if n != 2 * per_node or "codec_bytes" not in r or res not in PAPER_ONE_GPU_STEP_S:
            continue
        t1 = PAPER_ONE_GPU_STEP_S[res]
        compute = t1 * r["flops_ratio_vs_1"]
        for codec, kinds in r["codec_bytes"].items():
            gather = sum(b for k, b in kinds.items() if k.startswith("all_gather"))
            halo = sum(b for k, b in kinds.items() if k.startswith("ppermute"))
            inter = gather * per_node / (n - 1) + halo / 2
            intra = gather + halo - inter
            comm = max(intra / (intra_gbps * 1e9), inter / (inter_gbps * 1e9))
            out.append({
                "resolution": res, "n": n, "codec": codec, "inter_node_bytes": inter,
                "intra_node_bytes": intra, "compute_ms": compute * 1e3, "comm_ms": comm * 1e3,
                "compute_bound": compute >= comm, "speedup_vs_1": t1 / max(compute, comm),
                "intra_gbps": intra_gbps, "inter_gbps": inter_gbps,
            })  # fmt: skip
    return out


def print_codec_tables(rows: list[dict], projection: list[dict]) -> None:
    """Bytes per device per step by codec (rows with "codec_bytes"), and the 2-node projection."""
    coded = [r for r in rows if "codec_bytes" in r]
    if coded:
        codecs = list(coded[0]["codec_bytes"])
        head = f"{'res':>5} {'n':>2} " + " ".join(f"{c:>14}" for c in codecs)
        print("MB received per device per displaced step, by codec ('none': bf16 activations)")
        print(head)
        print("-" * len(head))
        for r in coded:
            mb = [sum(r["codec_bytes"][c].values()) / 1e6 for c in codecs]
            print(f"{r['resolution']:>5} {r['n']:>2} " + " ".join(f"{v:>14.1f}" for v in mb))
    if projection:
        p0 = projection[0]
        print(
            f"2 nodes x {p0['n'] // 2} GPUs (n = {p0['n']} bands): NVLink {p0['intra_gbps']:.0f} "
            f"GB/s inside a node, {p0['inter_gbps']:.0f} GB/s per GPU between nodes; step = "
            "max(compute, intra, inter), compute = the paper's 1-GPU step x FLOPs ratio"
        )
        head = (
            f"{'res':>5} {'codec':>14} {'inter MB':>9} {'comm ms':>8} {'compute ms':>10} "
            f"{'bound':>8} {'proj x':>7}"
        )
        print(head)
        print("-" * len(head))
        for p in projection:
            bound = "compute" if p["compute_bound"] else "link"
            print(
                f"{p['resolution']:>5} {p['codec']:>14} {p['inter_node_bytes'] / 1e6:>9.1f} "
                f"{p['comm_ms']:>8.1f} {p['compute_ms']:>10.1f} {bound:>8} "
                f"{p['speedup_vs_1']:>7.2f}"
            )
