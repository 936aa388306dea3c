"""JAX-free checks of an SDXL refiner folder and of the hand-off fraction (the CLI runs them
before JAX starts; `distrifusion_jax/refiner.py` runs the refiner)."""

from __future__ import annotations

import json
from pathlib import Path

HIGH_NOISE_FRAC = 0.8  # diffusers' docs: the base denoises the first 80% of the noise levels


def model_index(root: str | Path) -> dict:
    """`root/model_index.json` as a dict (empty when there is none)."""
    path = Path(root) / "model_index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_refiner_folder(root: str | Path) -> bool:
    """A refiner: its model_index says `requires_aesthetics_score`, or it has a second text
    encoder and no first one (diffusers' refiner: `text_encoder=None, tokenizer=None`)."""
    root = Path(root)
    if model_index(root).get("requires_aesthetics_score"):
        return True
    return (root / "text_encoder_2").is_dir() and not (root / "text_encoder").is_dir()


def check_fraction(name: str, value: float) -> float:
    """`denoising_end`/`denoising_start`/`--high-noise-frac` must lie strictly in (0, 1)."""
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{name} must be in (0, 1) (the share of the noise levels the base denoises, "
            f"e.g. 0.8); got {value}"
        )
    return float(value)
