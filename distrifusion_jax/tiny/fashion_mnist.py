"""Fashion-MNIST (Debian `dataset-fashion-mnist`): the class names, the prompts, the images."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DATA = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# The shipped model's prompts, class order: "a photo of a t-shirt", ..., "a photo of an ankle boot".
PROMPTS = tuple(f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}" for c in CLASSES)


def load_fashion_mnist(split: str = "train", data: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """Images padded to 32x32 with a black border, and their labels.

    Args:
      split: "train" (60k) or "test" (10k).
      data: the folder with the four idx `.gz` files.
    Returns:
      (images `[N, 32, 32, 1]` float32 in [-1, 1], labels `[N]` int32)
    """
    prefix = "train" if split == "train" else "t10k"
    path = data / f"{prefix}-images-idx3-ubyte.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: apt-get install -y dataset-fashion-mnist")
    raw = np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=16)
    labels = np.frombuffer(
        gzip.decompress((data / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8
    )
    x = raw.reshape(-1, 28, 28).astype(np.float32) / 127.5 - 1.0  # [N, 28, 28]
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)[..., None]  # [N, 32, 32, 1]
    return x, labels.astype(np.int32)


def upscale(x: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of `[N, H, W, C]` images: `[N, H*factor, W*factor, C]`.

    The shipped model's 64x64 images are the padded 32x32 ones at factor 2: each Fashion-MNIST
    pixel a 2x2 block, so 2x2 average pooling gives the 32x32 image back exactly.
    """
    return np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)


def class_test_images(picks: list[tuple[int, int]], size: int) -> np.ndarray:
    """Fashion-MNIST test images by class: uint8 gray RGB `[len(picks), size, size, 3]`.

    Args:
      picks: (class index k, i) per image: the i-th test image of class k.
      size: output pixels, a multiple of 32 (the padded image is nearest-upscaled).
    """
    x, y = load_fashion_mnist("test")  # [N, 32, 32, 1] in [-1, 1]
    img = upscale(x[[np.flatnonzero(y == k)[i] for k, i in picks]], size // x.shape[1])
    return np.repeat(np.round((img + 1) * 127.5).astype(np.uint8), 3, axis=-1)
