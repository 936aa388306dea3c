"""Sampling the tiny model through the library pipeline: an image grid and its accuracy."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from distrifusion_jax.eval.classifier import CLASSIFIER_FILE, conditioning_accuracy
from distrifusion_jax.pipeline import DistriSDXLPipeline
from distrifusion_jax.tiny.check import summarize
from distrifusion_jax.tiny.fashion_mnist import CLASSES, PROMPTS

SAMPLER = "Euler (EulerDiscreteScheduler config), CFG against the empty prompt"


def generate_images(
    model_dir: str | os.PathLike,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 5.0,
) -> np.ndarray:
    """Text -> images with `DistriSDXLPipeline` on one device and the model's own scheduler.

    The negative prompt is the empty prompt "" (as in training's condition dropout) at the
    model's default resolution.

    Returns:
      uint8 `[len(prompts), len(seeds), H, W, 3]`; image (p, s) starts from the unit noise
      `jax.random.normal(jax.random.key(s), (h, w, C))` of latent size h x w.
    """
    pipe = DistriSDXLPipeline.from_pretrained(model_dir)
    f = pipe.vae_scale_factor
    h = w = pipe.default_size
    shape = (h // f, w // f, pipe.unet.config.in_channels)
    noise = np.stack([np.asarray(jax.random.normal(jax.random.key(s), shape)) for s in seeds])
    n_p, n_s = len(prompts), len(seeds)
    images = pipe(
        [p for p in prompts for _ in seeds],  # prompt-major
        negative_prompt=[""] * (n_p * n_s),
        height=h,
        width=w,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        noise=np.tile(noise, (n_p, 1, 1, 1)),  # [P*S, h, w, C]
    )
    return np.stack([np.asarray(im) for im in images]).reshape(n_p, n_s, h, w, 3)


def save_grid(
    images: np.ndarray, path: Path, labels: Sequence[str] = CLASSES, scale: int | None = None
) -> None:
    """`[P, S, H, W, 3]` uint8 -> one row per prompt, nearest-upscaled (default: to ~100 px),
    its label on the left."""
    from PIL import Image, ImageDraw

    p, s, h, w, _ = images.shape
    scale = scale or max(1, round(100 / w))
    label_w, pad = 90, 2
    grid = Image.new("RGB", (label_w + s * (w * scale + pad), p * (h * scale + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(p):
        y = i * (h * scale + pad)
        draw.text((4, y + h * scale // 2 - 6), labels[i], fill="black")
        for j in range(s):
            tile = Image.fromarray(images[i, j]).resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(tile, (label_w + j * (w * scale + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def save_examples(
    model_dir: str | os.PathLike,
    path: Path,
    classes: Sequence[str] = ("sneaker", "trouser", "bag", "ankle boot", "t-shirt", "dress"),
    scale: int = 2,
    gap: int = 4,
) -> None:
    """The README's strip: what `python scripts/generate.py --prompt "a photo of a <class>"`
    draws (its defaults: seed 0, 30 steps, CFG 5, no negative prompt) for each class, side by
    side, nearest-upscaled `scale` times with `gap` white pixels between."""
    from PIL import Image

    pipe = DistriSDXLPipeline.from_pretrained(model_dir)
    tiles = [
        pipe(PROMPTS[CLASSES.index(c)], num_inference_steps=30, guidance_scale=5.0, seed=0)[0]
        for c in classes
    ]
    w, h = tiles[0].width * scale, tiles[0].height * scale
    strip = Image.new("RGB", (len(tiles) * (w + gap) - gap, h), "white")
    for i, tile in enumerate(tiles):
        strip.paste(tile.resize((w, h), Image.NEAREST), (i * (w + gap), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)


def sample_and_report(
    out: Path,
    report: dict[str, Any],
    *,
    grid: Path,
    grid_name: str,
    steps: int,
    guidance: float,
    grid_seeds: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Sample the class-prompt grid from the saved model, classify it, write training.json.

    Args:
      out: the model folder (with `classifier.npz`).
      report: training.json so far; gets "samples" and "model_dir_bytes".
      grid: the PNG to write; grid_name: how training.json names it.
      steps, guidance, grid_seeds: sampler steps, CFG scale, seeds 1000.. per prompt.
    Returns:
      the updated report (also written to `out/training.json`).
    """
    t0 = time.time()
    seeds = list(range(1000, 1000 + grid_seeds))
    images = generate_images(out, list(PROMPTS), seeds, steps, guidance)
    save_grid(images, grid)
    acc = conditioning_accuracy(images, out / CLASSIFIER_FILE)
    checks = summarize(images)  # what scripts/check_tiny.py measures on the same images
    log(
        f"generated {images.shape[:2]} in {time.time() - t0:.0f} s; accuracy per class "
        f"{np.round(acc, 2).tolist()}, mean {acc.mean():.3f}; image checks {checks}"
    )
    report["samples"] = {
        "sampler": SAMPLER,
        "steps": steps,
        "guidance_scale": guidance,
        "seeds": seeds,
        "grid": grid_name,
        "classifier_accuracy_per_class": dict(zip(CLASSES, acc.round(3).tolist())),
        "classifier_accuracy_mean": float(acc.mean()),
        "image_checks": checks,
    }
    files = [f for f in out.rglob("*") if f.is_file() and f.name != "training.json"]
    report["model_dir_bytes"] = sum(f.stat().st_size for f in files)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
