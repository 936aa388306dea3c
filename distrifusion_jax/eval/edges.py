"""Canny edge maps of the tiny model's images and the edge F1 that scores a ControlNet.

The shipped ControlNet is conditioned on Canny edges (scikit-image, the `bench`/`test` extras)
of Fashion-MNIST images; whether it controls is measured by comparing the edges of what the
model draws with the edges it was given (`edge_f1`). Everything runs at the data's own 32x32
resolution: a 64x64 image is 2x2 average-pooled first (the training images are nearest
2x-upscaled, so pooling returns them exactly), and edge maps are nearest-upscaled back for the
64x64 conditioning image.
"""

from __future__ import annotations

import numpy as np

SIGMA = 1.0  # Canny's Gaussian at 32x32 px
LOW, HIGH = 0.1, 0.2  # hysteresis thresholds on the gradient of [0, 1] images


def pool_to(gray: np.ndarray, size: int) -> np.ndarray:
    """Average-pool `[N, H, W]` images to `[N, size, size]` (H, W multiples of size)."""
    n, h, w = gray.shape
    return gray.reshape(n, size, h // size, size, w // size).mean(axis=(2, 4))


def canny_edges(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Canny edges of gray or RGB images at `size` x `size` px.

    Args:
      images: `[N, H, W]` or `[N, H, W, C]`, uint8 in [0, 255] or float in [0, 1]; RGB is
        averaged to gray, then pooled to `size` (H, W multiples of it).
      size: the edge map's side.
    Returns:
      bool `[N, size, size]`.
    """
    from skimage.feature import canny

    x = np.asarray(images)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    if x.ndim == 4:
        x = x.mean(-1)
    x = pool_to(x, size)
    return np.stack([canny(im, sigma=SIGMA, low_threshold=LOW, high_threshold=HIGH) for im in x])


def edge_image(edges: np.ndarray, size: int) -> np.ndarray:
    """Edge maps `[N, s, s]` -> conditioning images uint8 `[N, size, size, 3]`: white edges on
    black (as published Canny ControlNets), each edge pixel a (size/s)^2 block."""
    f = size // edges.shape[1]
    img = np.repeat(np.repeat(edges, f, axis=1), f, axis=2).astype(np.uint8) * 255
    return np.repeat(img[..., None], 3, axis=-1)


def _dilate(edges: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of `[N, H, W]` by a (2r+1)^2 square."""
    out = edges.copy()
    h, w = edges.shape[1:]
    p = np.pad(edges, ((0, 0), (r, r), (r, r)))
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[:, dy : dy + h, dx : dx + w]
    return out


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> dict[str, np.ndarray]:
    """Edge precision, recall and F1 per image, matching within `tolerance` pixels.

    precision: fraction of predicted edge pixels within `tolerance` (Chebyshev) of a target edge;
    recall: fraction of target edge pixels within `tolerance` of a predicted one; F1 their
    harmonic mean (0 where both are 0).

    Args:
      pred, target: bool `[N, H, W]`.
    Returns:
      {"precision", "recall", "f1"}: float64 `[N]` each.
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    hit_p = (pred & _dilate(target, tolerance)).sum(axis=(1, 2))
    hit_t = (target & _dilate(pred, tolerance)).sum(axis=(1, 2))
    precision = hit_p / np.maximum(pred.sum(axis=(1, 2)), 1)
    recall = hit_t / np.maximum(target.sum(axis=(1, 2)), 1)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


TOLERANCES = (0, 1)  # pixels at 32x32 (1 px: 1/32 of the image)


def edge_scores(images: np.ndarray, target: np.ndarray) -> dict[str, float | list[float]]:
    """How well generated images follow target edges: edge F1 at each of `TOLERANCES`.

    Args:
      images: uint8 `[N, H, W, 3]` generated images (edges by `canny_edges` at the target's
        size); target: bool `[N, s, s]` the conditioning edges.
    Returns:
      {"f1_tol{t}": mean, "f1_tol{t}_std": std, "precision_tol{t}", "recall_tol{t}": means,
       "per_image_f1_tol{t}": [N floats]} for each tolerance t.
    """
    pred = canny_edges(images, target.shape[1])
    out: dict[str, float | list[float]] = {}
    for t in TOLERANCES:
        s = edge_f1(pred, target, t)
        out[f"f1_tol{t}"] = float(s["f1"].mean())
        out[f"f1_tol{t}_std"] = float(s["f1"].std())
        out[f"precision_tol{t}"] = float(s["precision"].mean())
        out[f"recall_tol{t}"] = float(s["recall"].mean())
        out[f"per_image_f1_tol{t}"] = [float(v) for v in s["f1"]]
    return out
