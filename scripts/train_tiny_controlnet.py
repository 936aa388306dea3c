"""Train the shipped tiny model's Canny ControlNet (distrifusion_jax/assets/tiny-sdxl-controlnet-canny).

    apt-get install -y dataset-fashion-mnist          # once (root)
    pip install -e ".[test,bench]"                     # optax, scikit-image
    python scripts/train_tiny_controlnet.py            # the shipped ControlNet
    python scripts/generate.py --controlnet distrifusion_jax/assets/tiny-sdxl-controlnet-canny \
        --control-image distrifusion_jax/assets/tiny-sdxl-controlnet-canny/example_edges.png \
        --prompt "a photo of a sneaker"

The ControlNet starts as a copy of the shipped UNet's encoder with zero convs
(`tiny/controlnet.py`); the UNet, VAE and text encoders stay frozen. Data: Canny edges of the
Fashion-MNIST training images (`eval/edges.py`). How well it controls is measured by
`scripts/quality.py --controlnet-edges` (edge F1 with vs without it, and at n = 8).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from distrifusion_jax.tiny import CONTROLNET_DIR, MODEL_DIR
from distrifusion_jax.tiny.controlnet import ControlNetTrainOptions, train_and_save
from distrifusion_jax.tiny.recipe import log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL_DIR), help="the base model (frozen)")
    p.add_argument("--out", default=str(CONTROLNET_DIR))
    for f in dataclasses.fields(ControlNetTrainOptions):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    opts = ControlNetTrainOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ControlNetTrainOptions)}
    )
    train_and_save(Path(args.model), Path(args.out), opts, log)


if __name__ == "__main__":
    main()
