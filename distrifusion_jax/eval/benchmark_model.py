"""A model's DistriFusion step per n: FLOPs, exchange (three counts), memory, latency; and the
exchange of the band-parallel VAE encode (img2img, inpainting) and decode (three counts too).

On fake CPU devices (sharing this machine's cores) the latency shows overhead, not speedup.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from distrifusion_jax.eval.mode_labels import mode_fields
from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.cost import step_cost, vae_cost
from distrifusion_jax.pipeline import DistriSDXLPipeline
from distrifusion_jax.prompt import encode_prompts

PROMPT = "a photo of a sneaker"  # one prompt, the CFG pair: batch 2


def cond_shapes(pipe: DistriSDXLPipeline, h: int, w: int, prompt: str = PROMPT) -> dict:
    """Abstract conditioning `[G, B, ...]` (G = 2: CFG, B = 1) of one prompt at h x w pixels."""
    cond = encode_prompts(
        pipe.encoders,
        [prompt],
        None,
        True,
        pipe.is_sdxl,
        [h, w, 0, 0, h, w] if pipe.is_sdxl else None,
    )
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cond)


def step_shapes(pipe: DistriSDXLPipeline, h: int, w: int) -> tuple[jax.ShapeDtypeStruct, dict]:
    """Abstract UNet inputs of one prompt at h x w pixels: the latent `[1, h/f, w/f, C]` (fp32)
    and `cond_shapes`, for `parallel.cost.step_cost`."""
    f = pipe.vae_scale_factor
    lat = jax.ShapeDtypeStruct((1, h // f, w // f, pipe.unet.config.in_channels), np.float32)
    return lat, cond_shapes(pipe, h, w)


def vae_rows(pipe: DistriSDXLPipeline, h: int, w: int) -> dict[str, dict]:
    """{"encode": .., "decode": ..}: `parallel.cost.vae_cost` of one image at h x w pixels on
    the pipeline's row bands (the encode reads `[1, h, w, 3]` pixels, the decode writes them)."""
    f, dtype = pipe.vae_scale_factor, pipe.vae.dtype
    shapes = {
        "encode": jax.ShapeDtypeStruct((1, h, w, 3), dtype),
        "decode": jax.ShapeDtypeStruct((1, h // f, w // f, pipe.vae.config.latent_channels), dtype),
    }
    return {k: vae_cost(pipe.vae, pipe.vae_params, pipe.parallel, x, k) for k, x in shapes.items()}


def model_rows(
    model: str,
    patches: list[int],
    *,
    mode: str = "corrected_async_gn",
    pcpp: float | None = None,
    cfg_split: bool = False,
    warmup_steps: int = 4,
    steps: int = 20,
    scheduler: str | None = "ddim",
    height: int | None = None,
    width: int | None = None,
) -> list[dict]:
    """One row per n in `patches` (n = 1 runs corrected_async_gn without PCPP: the baseline).

    Each n: the step's cost (`step_cost`, compiled), a first call of the pipeline (its
    compiling steps are timed apart), then a warm call (end-to-end latency, steady step).
    """
    rows, base, base_step = [], None, None
    for n in patches:
        fields = mode_fields(mode if n > 1 else "corrected_async_gn")
        pc = ParallelConfig(
            patches=n,
            cfg_split=cfg_split,
            warmup_steps=warmup_steps,
            pcpp=pcpp if n > 1 else None,
            **fields,
        )
        pipe = DistriSDXLPipeline.from_pretrained(model, parallel=pc)
        h = height or pipe.default_size
        w = width or pipe.default_size
        c = step_cost(pipe.unet, pipe.unet_params, pc, *step_shapes(pipe, h, w), compile=True)
        base = c.flops if base is None else base
        kw = {
            "height": h,
            "width": w,
            "num_inference_steps": steps,
            "scheduler": scheduler,
            "progress": iter,
        }
        pipe(PROMPT, **kw)  # first call: compiles
        first = pipe.timings.step_times
        t0 = time.perf_counter()
        pipe(PROMPT, **kw)  # warm call: end-to-end latency, steady steps
        total = time.perf_counter() - t0
        row = {
            "resolution": h,
            "width": w,
            "n": n,
            "mode": pc.mode,
            "fused_exchange": pc.fused_exchange,
            "compress": pc.compress,
            "cfg_split": cfg_split,
            "devices": pc.num_devices,
            "batch": 2,
            "flops_per_device": c.flops,
            "flops_ratio_vs_1": c.flops / base,
            "exchanged_elements": c.exchanged_elements,
            "exchanged_bytes": c.exchanged_bytes,
            "analytic_elements": c.analytic_elements,
            "by_kind": c.by_kind,
            "compiled_exchange": {k: v for k, v in c.compiled.items() if k != "peak_bytes"},
            "peak_bytes": c.compiled["peak_bytes"],
            "state_bytes": c.state_bytes,
            "compile_and_first_steps_seconds": sum(t.seconds for t in first if t.compiled),
            "median_step_seconds": pipe.timings.steady_step(),
            "end_to_end_seconds": total,
            "vae": vae_rows(pipe, h, w),
        }
        base_step = row["median_step_seconds"] if base_step is None else base_step
        row["speedup_vs_1"] = base_step / row["median_step_seconds"]
        rows.append(row)
        print(f"  n={n}: median step {row['median_step_seconds'] * 1e3:.1f} ms", file=sys.stderr)
    return rows


def print_model_table(res: dict) -> None:
    """The model-mode table of a benchmark.json `res`."""
    print(
        f"{res['model']} at {res['rows'][0]['resolution']}x{res['rows'][0]['width']}, "
        f"{res['steps']} {res['scheduler']} steps, mode {res['mode']}, w={res['warmup_steps']}"
        f"{', CFG split' if res['cfg_split'] else ''}; {res['device_note']}"
    )
    head = (
        f"{'n':>2} {'MFLOP/dev':>10} {'x 1-dev':>8} {'recv k el':>10} {'HLO k el':>9} "
        f"{'formula':>8} {'recv KB':>8} {'stale KB':>9} {'peak MB':>8} {'compile s':>9} "
        f"{'step ms':>8} {'e2e s':>7} {'speedup':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        peak = f"{r['peak_bytes'] / 1e6:.1f}" if r["peak_bytes"] is not None else "-"
        print(
            f"{r['n']:>2} {r['flops_per_device'] / 1e6:>10.1f} {r['flops_ratio_vs_1']:>8.4f} "
            f"{r['exchanged_elements'] / 1e3:>10.1f} "
            f"{r['compiled_exchange']['elements'] / 1e3:>9.1f} "
            f"{sum(r['analytic_elements'].values()) / 1e3:>8.1f} "
            f"{r['exchanged_bytes'] / 1e3:>8.1f} {r['state_bytes'] / 1e3:>9.1f} {peak:>8} "
            f"{r['compile_and_first_steps_seconds']:>9.1f} "
            f"{r['median_step_seconds'] * 1e3:>8.1f} {r['end_to_end_seconds']:>7.2f} "
            f"{r['speedup_vs_1']:>6.2f}x"
        )
    print(
        "recv: counted from the step's jaxpr; HLO: from the compiled step's collectives; "
        "formula: layer shapes x the algorithm (patch axis only; a CFG split adds one "
        "all-gather of the output). Per device per step, received by an interior band."
    )
    if "vae" in res["rows"][0]:
        print_vae_table(res["rows"])


def print_vae_table(rows: list[dict]) -> None:
    """The VAE rows: encode (img2img, inpainting) and decode on row bands, exact, per image."""
    print("\nVAE on row bands (exact, once per image; per device, received by an interior band)")
    head = f"{'n':>2} {'pass':>6} {'recv k el':>10} {'HLO k el':>9} {'formula':>8} {'recv KB':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        for name, v in r["vae"].items():
            print(
                f"{r['n']:>2} {name:>6} {v['exchanged_elements'] / 1e3:>10.1f} "
                f"{v['compiled_exchange']['elements'] / 1e3:>9.1f} "
                f"{sum(v['analytic_elements'].values()) / 1e3:>8.1f} "
                f"{v['exchanged_bytes'] / 1e3:>8.1f}"
            )
