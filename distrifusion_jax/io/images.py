"""Input images for img2img and inpainting: PIL -> arrays as diffusers' `VaeImageProcessor`.

Images are resized (Lanczos) to the requested size, scaled to [-1, 1] (`image_to_array`);
masks are converted to grayscale, resized (Lanczos), scaled to [0, 1] and binarized at 0.5
(`mask_to_array`; white = repaint). `latent_mask` takes every f-th pixel, as diffusers'
nearest-neighbour `interpolate` to the latent size does for an integer factor f.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ImageInput = str | Path | Image.Image


def load_image(image: ImageInput, what: str = "image") -> Image.Image:
    """A PIL image from a path or a PIL image; a missing file raises FileNotFoundError."""
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    with Image.open(path) as im:
        im.load()
        return im


def default_size(image: Image.Image, factor: int) -> tuple[int, int]:
    """(height, width) of `image` rounded down to multiples of `factor` (diffusers' default)."""
    return image.height - image.height % factor, image.width - image.width % factor


def _resized(image: Image.Image, height: int, width: int) -> Image.Image:
    # diffusers resizes with the processor's `resample` ("lanczos"); same size: a copy
    return image.resize((width, height), resample=Image.LANCZOS)


def image_to_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB image -> `[H, W, 3]` float32 in [-1, 1] at (height, width)."""
    pixels = np.asarray(_resized(image.convert("RGB"), height, width), np.float32) / 255.0
    return 2.0 * pixels - 1.0


def mask_to_array(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """Mask image -> `[H, W, 1]` float32 of 0 (keep) and 1 (repaint) at (height, width)."""
    gray = np.asarray(_resized(mask.convert("L"), height, width), np.float32) / 255.0
    return (gray >= 0.5).astype(np.float32)[..., None]


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Pixel mask `[..., H, W, 1]` -> latent mask `[..., H/f, W/f, 1]` (nearest neighbour)."""
    return mask[..., ::factor, ::factor, :]
