"""Are the shipped tiny model's images clean? Colour, border, corner and class checks (issue 19).

Fashion-MNIST is gray on a black border, so a clean sample has R = G = B everywhere, a black
frame where the 28x28 images were padded (2 of every 32 pixels on each side), no lone bright
corner pixel, and the prompted class. Measured on uint8 RGB images `[N, H, W, 3]`:

- `gray_dev`: per image, mean |RGB - gray| over pixels and channels (gray = channel mean);
- `spread`: per image, the largest max(R, G, B) - min(R, G, B) of any pixel;
- `border`: per image, the mean gray value of the padding frame (width H / 16);
- `corner_excess`: per image, the most that a corner pixel's channel exceeds the mean of its
  three neighbours;
- `accuracy`: the fraction of prompt k's images that the shipped real-image classifier puts in
  class k (`eval/classifier.py`).

`scripts/check_tiny.py` draws the training report's sample set (10 class prompts x 8 seeds,
training.json "samples") and writes these as JSON; every image must be within `LIMITS`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

# A limit per image (max over images); accuracy is the mean over all images.
LIMITS = {"gray_dev": 1.0, "border": 3.0, "spread": 20.0, "corner_excess": 30.0}
MIN_ACCURACY = 0.85


def image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image cleanliness numbers (see the module docstring), each `[N]` in 0..255 units.

    Args:
      images: uint8 `[N, H, W, 3]`, H = W a multiple of 16.
    """
    x = np.asarray(images, np.float32)
    _, h, w, _ = x.shape
    gray = x.mean(-1, keepdims=True)  # [N, H, W, 1]
    b = h // 16  # 28x28 padded to 32x32: a 2-pixel frame at 32 px, 4 at 64 px
    frame = np.ones((h, w), bool)
    frame[b : h - b, b : w - b] = False
    excess = []
    for r, c in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        dr, dc = (1 if r == 0 else -1), (1 if c == 0 else -1)
        nb = (x[:, r + dr, c] + x[:, r, c + dc] + x[:, r + dr, c + dc]) / 3  # [N, 3]
        excess.append((x[:, r, c] - nb).max(-1))  # [N]
    return {
        "gray_dev": np.abs(x - gray).mean((1, 2, 3)),
        "spread": (x.max(-1) - x.min(-1)).max((1, 2)),
        "border": gray[:, frame, 0].mean(1),
        "corner_excess": np.max(excess, axis=0),
    }


def summarize(images: np.ndarray, accuracy: np.ndarray | None = None) -> dict[str, Any]:
    """Per-metric mean and worst image, the limits and whether every image is within them.

    Args:
      images: uint8 `[P, S, H, W, 3]` (prompt k = class k, S seeds) or `[N, H, W, 3]`.
      accuracy: `[P]` per-class classifier accuracies, or None.
    Returns:
      {"images": N, "<metric>": {"mean", "max", "limit", "images_over"}, ...,
       "accuracy": {...} (if given), "pass": bool}
    """
    flat = images.reshape(-1, *images.shape[-3:])
    out: dict[str, Any] = {"images": len(flat)}
    ok = True
    for name, v in image_stats(flat).items():
        over = int((v > LIMITS[name]).sum())
        ok &= over == 0
        out[name] = {
            "mean": round(float(v.mean()), 3),
            "max": round(float(v.max()), 3),
            "limit": LIMITS[name],
            "images_over": over,
        }
    if accuracy is not None:
        acc = float(np.mean(accuracy))
        ok &= acc >= MIN_ACCURACY
        out["accuracy"] = {
            "mean": round(acc, 4),
            "per_class": [round(float(a), 3) for a in accuracy],
            "min": MIN_ACCURACY,
        }
    out["pass"] = bool(ok)
    return out


def check_model(
    model_dir: str | os.PathLike,
    steps: int | None = None,
    guidance: float | None = None,
    seeds: list[int] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Draw the 10 class prompts x `seeds` and summarize them.

    Defaults (None) are the model's training.json "samples" settings: its sampler steps, CFG
    scale and seeds (the grid that training reported).

    Returns:
      (the JSON report, uint8 images `[10, S, H, W, 3]`)
    """
    from distrifusion_jax.eval.classifier import CLASSIFIER_FILE, conditioning_accuracy
    from distrifusion_jax.tiny.fashion_mnist import CLASSES, PROMPTS
    from distrifusion_jax.tiny.samples import generate_images

    model_dir = Path(model_dir)
    card = json.loads((model_dir / "training.json").read_text()).get("samples", {})
    steps = steps or card.get("steps", 25)
    guidance = guidance or card.get("guidance_scale", 5.0)
    seeds = seeds or card.get("seeds", list(range(1000, 1008)))
    images = generate_images(model_dir, list(PROMPTS), seeds, steps, guidance)
    acc = conditioning_accuracy(images, model_dir / CLASSIFIER_FILE)
    report = {
        "model": str(model_dir),
        "sampler": {"steps": steps, "guidance_scale": guidance, "seeds": list(seeds)},
        "image_size": list(images.shape[2:4]),
        "classes": list(CLASSES),
        **summarize(images, acc),
    }
    return report, images
