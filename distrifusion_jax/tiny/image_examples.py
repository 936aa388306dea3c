"""The README's image-input picture: the shipped model doing img2img and inpainting (issue 15).

`write_inputs` puts two Fashion-MNIST test images (64x64 RGB PNGs) and a mask in a folder;
`scripts/image_examples.py` runs `scripts/generate.py` there with `COMMANDS` and `compose`
lays inputs and outputs side by side:

    pullover | img2img "a photo of a coat" (strength 0.6) | sandal | mask | inpainted "a bag"
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distrifusion_jax.tiny.fashion_mnist import CLASSES, class_test_images

SIZE = 64  # the shipped model's image size (px)
_COMMON = "--patches 4 --cpu-devices 4 --steps 30 --seed 0"
# (label, arguments of `python scripts/generate.py`, run in the inputs' folder)
COMMANDS = (
    ("img2img", f'--image pullover.png --strength 0.6 --prompt "a photo of a coat" {_COMMON} --output coat.png'),
    ("inpaint", f'--image sandal.png --mask mask.png --prompt "a photo of a bag" {_COMMON} --output bag.png'),
)  # fmt: skip
TILES = (
    ("input", "pullover.png"),
    ("img2img: coat", "coat.png"),
    ("input", "sandal.png"),
    ("mask", "mask.png"),
    ("inpainted: bag", "bag.png"),
)


def center_mask(margin: int = 12) -> np.ndarray:
    """uint8 `[64, 64]`: 255 (repaint) on the middle square, 0 (keep) on a `margin`-px ring."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[margin : SIZE - margin, margin : SIZE - margin] = 255
    return m


def write_inputs(folder: Path) -> None:
    """pullover.png, sandal.png (64x64 RGB) and mask.png (64x64 L) into `folder`."""
    from PIL import Image

    pullover, sandal = class_test_images([(CLASSES.index(c), 0) for c in ("pullover", "sandal")], SIZE)
    Image.fromarray(pullover).save(folder / "pullover.png")
    Image.fromarray(sandal).save(folder / "sandal.png")
    Image.fromarray(center_mask()).save(folder / "mask.png")


def compose(folder: Path, out: Path, scale: int = 2, gap: int = 6) -> None:
    """`TILES` from `folder`, nearest-upscaled `scale` times, captioned, in one row -> `out`."""
    from PIL import Image, ImageDraw

    s, text_h = SIZE * scale, 14
    strip = Image.new("RGB", (len(TILES) * (s + gap) - gap, s + text_h), "white")
    draw = ImageDraw.Draw(strip)
    for i, (caption, name) in enumerate(TILES):
        tile = Image.open(folder / name).convert("RGB").resize((s, s), Image.NEAREST)
        strip.paste(tile, (i * (s + gap), text_h))
        draw.text((i * (s + gap) + 2, 1), caption, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out)
