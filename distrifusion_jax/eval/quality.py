"""The quality study: DistriFusion configurations vs the single-device image, on a fixed set.

Every configuration generates the same (prompt, seed) pairs from the same initial noise and is
compared with the single-device images (`metrics.py`) and classified (`classifier.py`).
Imports no JAX at module level: `scripts/quality.py` builds its pairs before it sets XLA flags.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from distrifusion_jax.parallel.config import ParallelConfig

SEEDS = (0, 1)
PCPP = 0.3  # the PCPP paper's portion of each neighbour band
# Codecs of the compressed exchange rows (issue 17): plain casts and quantizers, and the same
# with error feedback (`residual+`), to show what it buys.
CODECS = ("bf16", "fp8", "int8", "int4", "residual+int8", "residual+int4", "residual+int2")
STRENGTH = 0.6  # img2img rows: the share of the steps run from the noised real image
# full_sync must reproduce the single-device image: float reassociation may flip a pixel level.
EXACT_MAX_ABS_DIFF = 1


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """One configuration of the study; `groups` name the plots it appears in."""

    name: str
    mode: str
    n: int
    warmup_steps: int | None = 4  # None: naive_patch (warm-up does not apply)
    naive_split: str | None = None
    groups: tuple[str, ...] = ()  # "n", "warmup", "gn", "naive", "exact", "pcpp", ...
    pcpp: float | None = None
    compress: str | None = None  # codec of the displaced exchange (`parallel/codec.py`)
    # or "img2img" / "controlnet": compared with the single-device images of the same task
    task: str = "txt2img"

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            patches=self.n,
            mode=self.mode,
            naive_split=self.naive_split or "row",
            warmup_steps=4 if self.warmup_steps is None else self.warmup_steps,
            pcpp=self.pcpp,
            compress=self.compress,
        )


def fixed_pairs(prompts: Sequence[str], seeds: Sequence[int] = SEEDS) -> list[tuple[str, int]]:
    """The study's (prompt, seed) set, prompt-major: every prompt with every seed."""
    return [(p, s) for p in prompts for s in seeds]


def default_configs(n_max: int = 8) -> list[QualityConfig]:
    """Every configuration up to `n_max` devices (see `scripts/quality.py`)."""
    C = QualityConfig
    ns = [n for n in (2, 4, 8) if n <= n_max]
    big = ns[-1]
    cfgs = [C(f"full_sync-n{n}", "full_sync", n, groups=("exact",)) for n in ns]
    cfgs += [
        C(
            f"corrected-n{n}",
            "corrected_async_gn",
            n,
            groups=("n",) + (("warmup", "gn", "naive") if n == big else ()),
        )
        for n in ns
    ]
    cfgs += [
        C(f"warmup-w{w}-n{big}", "corrected_async_gn", big, w, groups=("warmup",))
        for w in (0, 1, 2)
    ]
    cfgs += [
        C(f"{m}-n{big}", m, big, groups=("gn",))
        for m in ("sync_gn", "stale_gn", "separate_gn", "no_sync")
    ]
    cfgs += [
        C(
            f"naive_alternate-n{n}",
            "naive_patch",
            n,
            None,
            "alternate",
            groups=("n", "naive") if n == big else ("n",),
        )
        for n in ns
    ]
    cfgs += [C(f"naive_row-n{big}", "naive_patch", big, None, "row", groups=("naive",))]
    cfgs += [C(f"pcpp-n{n}", "corrected_async_gn", n, groups=("n", "pcpp"), pcpp=PCPP) for n in ns]
    cfgs += [
        C(f"{codec}-n{big}", "corrected_async_gn", big, groups=("compress",), compress=codec)
        for codec in CODECS
    ]
    cfgs += [
        C(f"img2img-corrected-n{n}", "corrected_async_gn", n, groups=("img2img",), task="img2img")
        for n in ns
    ]
    cfgs += [
        C(f"controlnet-corrected-n{n}", "corrected_async_gn", n, groups=("controlnet",),
          task="controlnet")
        for n in ns
    ]  # fmt: skip
    return cfgs


def initial_noise(pairs, shape: tuple[int, int, int]) -> np.ndarray:
    """`[len(pairs), h, w, C]`: pair (prompt, seed) gets `pipe(prompt, seed=seed)`'s noise."""
    import jax

    rows = []
    for _, seed in pairs:
        noise_key, _ = jax.random.split(jax.random.PRNGKey(seed))
        rows.append(np.asarray(jax.random.normal(noise_key, (1, *shape), np.float32))[0])
    return np.stack(rows)


def generate(
    model: str,
    parallel: ParallelConfig,
    pairs,
    *,
    steps: int,
    scheduler: str,
    guidance: float,
    height: int | None = None,
    width: int | None = None,
    images: np.ndarray | None = None,
    control: tuple[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, float, tuple[int, int], float]:
    """Images of one configuration.

    Args:
      images: None (text-to-image), or uint8 `[len(pairs), H, W, 3]` input images: img2img at
        `STRENGTH` from each (posterior mean, so every configuration starts from the same
        latents).
      control: None, or (ControlNet folder, uint8 `[len(pairs), H, W, 3]` conditioning images,
        one per pair): text-to-image under that ControlNet (scale 1).
    Returns:
      (uint8 `[len(pairs), H, W, 3]`, seconds for load + compile + generate + decode, (H, W),
       bytes one device receives in one step, the displaced one where the mode has it (jaxpr
       count; 0 on one device))
    """
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    t0 = time.perf_counter()
    pipe = DistriSDXLPipeline.from_pretrained(model, parallel=parallel)
    h = height or pipe.default_size
    w = width or pipe.default_size
    f = pipe.vae_scale_factor
    noise = initial_noise(pairs, (h // f, w // f, pipe.unet.config.in_channels))
    kw = {
        "height": h,
        "width": w,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "scheduler": scheduler,
    }
    if images is None and control is None:
        out = pipe([p for p, _ in pairs], noise=noise, **kw)
    else:  # the pipeline takes one input (or conditioning) image per call
        from PIL import Image

        if control is not None:
            pipe.load_controlnets([control[0]])
        out = []
        for i, (prompt, _) in enumerate(pairs):
            if images is not None:
                extra = {"image": Image.fromarray(images[i]), "strength": STRENGTH}
                extra["posterior"] = "mean"
            else:
                extra = {"control_image": Image.fromarray(control[1][i])}
            out += pipe(prompt, noise=noise[i : i + 1], **extra, **kw)
    seconds = time.perf_counter() - t0
    return np.stack([np.asarray(im) for im in out]), seconds, (h, w), exchanged_bytes(pipe, h, w)


def exchanged_bytes(pipe, h: int, w: int) -> float:
    """Bytes one interior device receives in one displaced step of the pipeline's UNet and its
    ControlNets (one prompt with CFG; `parallel.cost.step_cost`'s jaxpr count, by the dtype
    actually sent)."""
    from distrifusion_jax.eval.benchmark_model import step_shapes
    from distrifusion_jax.parallel.cost import step_cost

    if pipe.parallel.patches == 1 or pipe.parallel.mode == "naive_patch":
        return 0.0  # naive patches exchange nothing
    model, params, control = pipe.unet, pipe.unet_params, None
    if pipe.controlnets:
        import jax

        from distrifusion_jax.control import controlled_model

        model, params = controlled_model(pipe.unet, pipe.unet_params, pipe.controlnets)
        control = tuple(
            jax.ShapeDtypeStruct((1, h, w, net.module.config.conditioning_channels), np.float32)
            for net in pipe.controlnets
        )  # [1, H, W, C_k] pixels
    return step_cost(
        model, params, pipe.parallel, *step_shapes(pipe, h, w), control=control
    ).exchanged_bytes


def agreement(pred: np.ndarray | None, target: np.ndarray | None) -> float | None:
    """Fraction of equal class ids; None without predictions."""
    return None if pred is None or target is None else float((pred == target).mean())


def config_row(
    cfg: QualityConfig,
    per: dict[str, list],
    summary: dict[str, Any],
    cls: np.ndarray | None,
    ref_cls: np.ndarray | None,
    prompt_cls: np.ndarray,
    seconds: float,
    exchanged: float = 0.0,
) -> dict[str, Any]:
    """quality.json's row of one configuration.

    Args:
      per, summary: `metrics.image_metrics` and `metrics.summarize` vs the reference images.
      cls, ref_cls: classifier predictions `[N]` for its and the reference images (or None);
      prompt_cls: the prompted classes `[N]`.
      exchanged: bytes one device receives per displaced step (`generate`).
    """
    return {
        "name": cfg.name,
        "mode": cfg.mode,
        "n": cfg.n,
        "warmup_steps": None if cfg.mode == "naive_patch" else cfg.warmup_steps,
        "naive_split": cfg.naive_split,
        "groups": list(cfg.groups),
        "pcpp": cfg.pcpp,
        "compress": cfg.compress,
        "task": cfg.task,
        "exchanged_bytes_per_step": exchanged,
        **summary,
        "class_agreement": agreement(cls, ref_cls),
        "class_accuracy": agreement(cls, prompt_cls),
        "per_image": per,
        "seconds": seconds,
    }


def print_table(result: dict) -> None:
    """The study's table (one row per configuration of quality.json's `result`), then the
    ControlNet edge-F1 table when there are ControlNet rows."""

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (
        f"{'config':<22} {'mode':<21} {'n':>2} {'w':>2} {'PSNR dB':>8} {'SSIM':>6} "
        f"{'LPIPS':>6} {'ident':>5} {'max|d|':>6} {'cls=ref':>7} {'cls=prm':>7} {'MB/st':>6} "
        f"{'sec':>5}"
    )
    print(head)
    print("-" * len(head))
    ref = result["reference"]
    agree = None if ref["class_accuracy"] is None else 1.0
    print(
        f"{'single':<22} {'(reference)':<21} {1:>2} {'-':>2} {'inf':>8} {1:>6.3f} {0:>6.3f} "
        f"{len(result['pairs']):>5} {0:>6} {f(agree, '.2f'):>7} "
        f"{f(ref['class_accuracy'], '.2f'):>7} {0:>6.2f} {ref['seconds']:>5.0f}"
    )
    for c in result["configs"]:
        psnr = f(c["psnr_mean"], ".2f") if c["n_identical"] < len(result["pairs"]) else "inf"
        mode = c["mode"] + (f"/{c['naive_split']}" if c["naive_split"] else "")
        mode += f"/{c['compress']}" if c["compress"] else ""
        print(
            f"{c['name']:<22} {mode:<21} {c['n']:>2} {f(c['warmup_steps'], 'd'):>2} {psnr:>8} "
            f"{c['ssim_mean']:>6.3f} {c['lpips_mean']:>6.3f} {c['n_identical']:>5} "
            f"{c['max_abs_diff']:>6} {f(c['class_agreement'], '.2f'):>7} "
            f"{f(c['class_accuracy'], '.2f'):>7} {c['exchanged_bytes_per_step'] / 1e6:>6.2f} "
            f"{c['seconds']:>5.0f}"
        )
    print(
        f"PSNR: mean over images that differ (ident = bit-identical images); LPIPS AlexNet at "
        f"{result['lpips']['input_size']} px; cls=ref / cls=prm: classifier agrees with the "
        f"single-device image / with the prompt; MB/st: received per device per step "
        f"(img2img / controlnet rows: vs the single-device img2img / ControlNet images). "
        f"Total {result['seconds_total']:.0f} s."
    )
    ctl = result.get("reference_controlnet")
    if ctl:
        print_edge_table(ctl, [c for c in result["configs"] if "edge_f1" in c])


def control_reference(controlnet: str, refs: dict, edges: np.ndarray, prompt_cls) -> dict:
    """quality.json's "reference_controlnet": the single-device ControlNet images' edge F1
    against their conditioning edges, and the plain text-to-image images' (same prompts and
    noise, no ControlNet) against the same edges.

    Args:
      refs: task -> (uint8 images `[N, H, W, 3]`, classes or None, seconds), with "txt2img" and
        "controlnet"; edges: bool `[N, s, s]` the conditioning edges.
    """
    from distrifusion_jax.eval.edges import edge_scores

    images, classes, seconds = refs["controlnet"]
    return {
        "name": "single-controlnet",
        "controlnet": controlnet,
        "inputs": "Canny edges of Fashion-MNIST test images: pair (class k, seed s) takes class "
        "k's s-th; conditioning scale 1",
        "seconds": seconds,
        "class_accuracy": agreement(classes, prompt_cls),
        "edge_f1": edge_scores(images, edges),
        "edge_f1_without_controlnet": edge_scores(refs["txt2img"][0], edges),
    }


def print_edge_table(ref: dict, rows: list[dict]) -> None:
    """Edge F1 of the ControlNet images vs their conditioning edges (without, n = 1, rows)."""
    from distrifusion_jax.eval.edges import TOLERANCES

    head = f"{'edge F1 vs the control edges':<30}" + "".join(
        f" {f'tol {t} px':>14}" for t in TOLERANCES
    )
    print(head)
    print("-" * len(head))
    lines = [("without ControlNet (n=1)", ref["edge_f1_without_controlnet"])]
    lines += [("with ControlNet (n=1)", ref["edge_f1"])]
    lines += [(f"with ControlNet {c['name']}", c["edge_f1"]) for c in rows]
    for label, e in lines:
        cells = "".join(f" {e[f'f1_tol{t}']:>7.3f} ±{e[f'f1_tol{t}_std']:.3f}" for t in TOLERANCES)
        print(f"{label:<30}{cells}")
    print("Canny edges at 32x32 px; F1 matches edge pixels within the tolerance (Chebyshev).")
