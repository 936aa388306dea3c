"""SDXL with and without ControlNets on abstract shapes: per-device FLOPs, exchange, stale memory.

For each (resolution, n) the displaced step is costed twice (`parallel.cost.step_cost`, nothing
executed, params from `jax.eval_shape`): the SDXL base UNet alone, and a `ControlledUNet` with K
ControlNets of controlnet-canny-sdxl-1.0's shapes (`sdxl_controlnet`), each reading its
conditioning image `[1, H, W, 3]` split by rows like the latent. Every ControlNet runs on the
same row band and keeps its own stale state, so its patch-aware layers (the SDXL encoder's
convs, 34 self-attention layers and GroupNorms, and the conditioning embedding's convs at pixel
resolution) add to the exchange as the UNet's do.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from distrifusion_jax.eval.mode_labels import mode_fields
from distrifusion_jax.io.components import COMPONENTS
from distrifusion_jax.models import UNet2DConditionModel, UNetConfig, sdxl_base
from distrifusion_jax.models.controlled_unet import ControlledUNet, controlled_params
from distrifusion_jax.models.controlnet import ControlNetModel
from distrifusion_jax.models.controlnet_config import ControlNetConfig, sdxl_controlnet
from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.cost import StepCost, step_cost


def cond_shapes(config: UNetConfig, batch: int = 1, tokens: int = 77) -> dict:
    """Abstract CFG-pair conditioning `[2, B, ...]` for a UNet config (text-time for SDXL)."""
    f32 = jnp.float32
    cond = {
        "encoder_hidden_states": jax.ShapeDtypeStruct(
            (2, batch, tokens, config.cross_attention_dims[0]), f32
        )
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        cond["text_embeds"] = jax.ShapeDtypeStruct((2, batch, pooled), f32)
        cond["time_ids"] = jax.ShapeDtypeStruct((2, batch, 6), f32)
    return cond


def _fields(c: StepCost, base: float) -> dict[str, Any]:
    out = {
        "flops_per_device": c.flops,
        "flops_ratio_vs_1": c.flops / base,
        "exchanged_elements": c.exchanged_elements,
        "exchanged_bytes": c.exchanged_bytes,
        "analytic_elements": c.analytic_elements,
        "state_bytes": c.state_bytes,
        "by_kind": c.by_kind,
    }
    if c.compiled is not None:
        out["compiled_exchange"] = {k: v for k, v in c.compiled.items() if k != "peak_bytes"}
        out["peak_bytes"] = c.compiled["peak_bytes"]
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def controlnet_rows(
    resolutions: list[int],
    patches: list[int],
    mode: str = "corrected_async_gn",
    pcpp: float | None = None,
    num_controlnets: int = 1,
    unet: UNetConfig | None = None,
    controlnet: ControlNetConfig | None = None,
    vae_factor: int = 8,
    dtype: Any = jnp.bfloat16,
    compile: bool = False,
) -> list[dict]:
    """One row per (resolution, n), n = 1 first; batch 2 (the CFG pair on every device).

    Args:
      resolutions: pixels per side (the latent is 1/`vae_factor`; each conditioning image is
        the latent times the ControlNet's `conditioning_factor`).
      patches: n values (1 is always added as the baseline).
      mode: a `mode_labels` label; pcpp: PCPP portion or None.
      num_controlnets: K, ControlNets of the same config (a MultiControlNet).
      unet, controlnet: configs (default `sdxl_base()` and `sdxl_controlnet()`).
      dtype: params and activations; compile: also count the compiled HLO's collectives.

    Returns:
      rows {"resolution", "n", "batch", "controlnets", "without": {...}, "with": {...},
      "with_over_without": {"flops", "exchanged_bytes", "state_bytes"}}; "without"/"with" hold
      the `step_cost` figures ("flops_ratio_vs_1" against the same model's n = 1 step).
    """
    unet = unet or sdxl_base()
    controlnet = controlnet or sdxl_controlnet()
    plain = UNet2DConditionModel(unet, dtype=dtype, param_dtype=dtype)
    unet_params = COMPONENTS["unet"].target(plain)  # shapes only
    cn_params = COMPONENTS["controlnet"].target(
        ControlNetModel(controlnet, dtype=dtype, param_dtype=dtype)
    )
    controlled = ControlledUNet(
        unet, (controlnet,) * num_controlnets, dtype=dtype, param_dtype=dtype
    )
    params = controlled_params(unet_params, [cn_params] * num_controlnets)
    cond = cond_shapes(unet)
    rows = []
    for res in resolutions:
        h = res // vae_factor
        lat = jax.ShapeDtypeStruct((1, h, h, unet.in_channels), jnp.float32)
        hc = h * controlnet.conditioning_factor
        image = jax.ShapeDtypeStruct((1, hc, hc, controlnet.conditioning_channels), jnp.float32)
        base = {}
        for n in [1] + [k for k in patches if k > 1]:
            t0 = time.perf_counter()
            pc = ParallelConfig(patches=n, pcpp=pcpp, **mode_fields(mode))
            without = step_cost(plain, unet_params, pc, lat, cond, compile=compile)
            with_cn = step_cost(
                controlled, params, pc, lat, cond, compile=compile,
                control=(image,) * num_controlnets,
            )  # fmt: skip
            if n == 1:
                base = {"without": without.flops, "with": with_cn.flops}
            row = {
                "resolution": res,
                "n": n,
                "batch": 2,
                "controlnets": num_controlnets,
                "without": _fields(without, base["without"]),
                "with": _fields(with_cn, base["with"]),
                "with_over_without": {
                    "flops": _ratio(with_cn.flops, without.flops),
                    "exchanged_bytes": _ratio(with_cn.exchanged_bytes, without.exchanged_bytes),
                    "state_bytes": _ratio(with_cn.state_bytes, without.state_bytes),
                },
                "trace_seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(f"  traced {res}^2 n={n} in {row['trace_seconds']:.1f} s", file=sys.stderr)
    return rows


def print_table(rows: list[dict]) -> None:
    """Without | with the ControlNets, side by side, and the with/without ratios."""
    k = rows[0]["controlnets"] if rows else 1
    head = (
        f"{'res':>5} {'n':>2} | {'TFLOP/dev':>15} {'x':>5} | {'x 1-dev':>13} | "
        f"{'recv G el':>13} {'formula':>13} | {'recv MB':>15} {'x':>5} | {'stale GB':>11} {'x':>5}"
    )
    print(f"displaced step per device, without | with {k} ControlNet(s); x: with / without")
    print(head)
    print("-" * len(head))
    ratio = lambda v: f"{v:.2f}" if v else "-"
    for r in rows:
        a, b, x = r["without"], r["with"], r["with_over_without"]
        pair = lambda key, scale, fmt, a=a, b=b: f"{a[key] / scale:{fmt}}|{b[key] / scale:{fmt}}"
        formula = "|".join(f"{sum(v['analytic_elements'].values()) / 1e9:.3f}" for v in (a, b))
        print(
            f"{r['resolution']:>5} {r['n']:>2} | {pair('flops_per_device', 1e12, '7.2f'):>15} "
            f"{ratio(x['flops']):>5} | {pair('flops_ratio_vs_1', 1, '6.4f'):>13} | "
            f"{pair('exchanged_elements', 1e9, '6.3f'):>13} {formula:>13} | "
            f"{pair('exchanged_bytes', 1e6, '7.0f'):>15} {ratio(x['exchanged_bytes']):>5} | "
            f"{pair('state_bytes', 1e9, '5.2f'):>11} {ratio(x['state_bytes']):>5}"
        )
    print(
        "recv: elements (and bf16 MB) one interior device receives per displaced step, counted "
        "from the step's collectives; formula: the layer-shape formulas (analytic_exchange); "
        "stale: bytes carried between steps per device; x 1-dev: FLOPs vs the same model on 1 "
        "device."
    )
