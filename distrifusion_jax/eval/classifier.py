"""The Fashion-MNIST classifier shipped with the tiny model (`classifier.npz`): train, classify.

It checks that generated images follow their prompts: the fraction of images of prompt k that
it puts in class k (chance: 10%).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.io.keys import flatten, unflatten

NUM_CLASSES = 10
CLASSIFIER_FILE = "classifier.npz"  # in the model folder


class Classifier(nn.Module):
    """Three conv/pool stages and a linear head: gray `[B, 32, 32, 1]` in [-1, 1] -> logits."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for c in (16, 32, 64):
            x = nn.relu(nn.Conv(c, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))  # 32 -> 16 -> 8 -> 4
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))  # [B, num_classes]


def to_gray(images: np.ndarray) -> np.ndarray:
    """uint8 `[..., H, W, 3]` or float RGB in [-1, 1] -> float `[..., H, W, 1]` in [-1, 1]."""
    x = np.asarray(images, np.float32)
    if np.asarray(images).dtype == np.uint8:
        x = x / 127.5 - 1.0
    return x.mean(-1, keepdims=True)


def train_classifier(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    epochs: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> tuple[dict, dict]:
    """Adam 2e-3 on real images with random 2-pixel shifts, batch 128.

    Args:
      x, x_test: gray images `[N, 32, 32, 1]` in [-1, 1]; y, y_test: class ids `[N]`.
      epochs: passes over `x`; seed: init and shuffling.
      log: where progress lines go.
    Returns:
      (params, stats: epochs, final_loss, test_accuracy, seconds)
    """
    import optax  # training only (the `test` extra); classifying needs no optax

    model, rng = Classifier(), np.random.default_rng(seed)
    params = model.init(jax.random.key(seed), x[:1])["params"]
    opt = optax.adam(2e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, state = opt.update(g, state)
        return optax.apply_updates(params, u), state, loss

    t0, batch, losses = time.time(), 128, []
    for epoch in range(epochs):
        perm = rng.permutation(len(x))
        for i in range(len(x) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            dy, dx = rng.integers(-2, 3, 2)
            xb = np.roll(x[idx], (dy, dx), axis=(1, 2))
            params, state, loss = step(params, state, xb, y[idx])
            losses.append(float(loss))
        log(f"classifier epoch {epoch}: loss {np.mean(losses[-200:]):.4f}")
    acc = float((classify(params, x_test) == y_test).mean())
    stats = {
        "epochs": epochs,
        "final_loss": float(np.mean(losses[-100:])),
        "test_accuracy": acc,
        "seconds": time.time() - t0,
    }
    log(f"classifier: test accuracy {acc:.4f} ({stats['seconds']:.0f} s)")
    return params, stats


def pool_to_32(gray: np.ndarray) -> np.ndarray:
    """`[N, 32k, 32k, C]` -> `[N, 32, 32, C]` by k x k average pooling (k = 1: unchanged).

    The shipped model draws 64x64 images whose 2x2 blocks are Fashion-MNIST pixels
    (`tiny.fashion_mnist.upscale`), so pooling gives the classifier its 32x32 input.
    """
    n, h, w, c = gray.shape
    if h != w or h % 32:
        raise ValueError(f"the classifier takes square images of 32k pixels; got {h}x{w}")
    k = h // 32
    return gray.reshape(n, 32, k, 32, k, c).mean((2, 4))


def classify(params: dict, gray: np.ndarray) -> np.ndarray:
    """Predicted class ids `[N]` for gray images `[N, 32k, 32k, 1]` in [-1, 1] (pooled to 32)."""
    gray = pool_to_32(np.asarray(gray, np.float32))
    apply = jax.jit(lambda p, x: Classifier().apply({"params": p}, x).argmax(-1))
    return np.concatenate(
        [np.asarray(apply(params, gray[i : i + 500])) for i in range(0, len(gray), 500)]
    )


def save_classifier(path: str | os.PathLike, params: dict) -> None:
    """Params as one `.npz` whose keys are the '/'-joined parameter paths."""
    np.savez(path, **{"/".join(k): np.asarray(v) for k, v in flatten(params).items()})


def load_classifier(path: str | os.PathLike) -> dict:
    """Params written by `save_classifier`."""
    with np.load(path) as f:
        return unflatten({tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files})


def classify_images(params: dict, images: np.ndarray) -> np.ndarray | None:
    """Class ids `[N]` of uint8 RGB images `[N, 32k, 32k, 3]`; None for any other size."""
    h, w = images.shape[1:3]
    if h != w or h % 32:
        return None
    return classify(params, to_gray(images))


def load_model_classifier(model_dir: str | os.PathLike) -> dict | None:
    """The classifier shipped in a model folder, or None if it has none."""
    path = Path(model_dir) / CLASSIFIER_FILE
    return load_classifier(path) if path.is_file() else None


def conditioning_accuracy(images: np.ndarray, classifier_path: str | os.PathLike) -> np.ndarray:
    """Per prompted class k, the fraction of `images[k]` classified as k.

    Args:
      images: uint8 `[P, S, H, W, 3]`, prompt k = class k, S seeds each.
      classifier_path: a `classifier.npz`.
    Returns:
      `[P]` float accuracies.
    """
    params = load_classifier(classifier_path)
    p, s = images.shape[:2]
    pred = classify(params, to_gray(images.reshape(p * s, *images.shape[2:]))).reshape(p, s)
    return (pred == np.arange(p)[:, None]).mean(1)
