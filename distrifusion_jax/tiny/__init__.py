"""The shipped tiny SDXL-architecture model: its configs, data and training recipe."""

from pathlib import Path

# The shipped model is package data, so an installed wheel finds it too.
MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-sdxl"
# Its Canny ControlNet (scripts/train_tiny_controlnet.py), beside it.
CONTROLNET_DIR = MODEL_DIR.parent / "tiny-sdxl-controlnet-canny"
