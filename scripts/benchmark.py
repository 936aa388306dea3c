"""Benchmark DistriFusion steps: FLOPs, exchange, stale memory, latency; prints a table, writes JSON.

    python scripts/benchmark.py --sdxl-shapes                 # full SDXL, abstract shapes only
    python scripts/benchmark.py --model distrifusion_jax/assets/tiny-sdxl --patches 1 2 4 8

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
    p.add_argument("--json", default=str(REPO / "results" / "benchmark.json"))
    return p.parse_args(argv)


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


def main(argv=None) -> int:
    args = parse_args(argv)
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
