"""Writing the tiny model in the converted layout (what `distrifusion-convert` writes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.io import checkpoint
from distrifusion_jax.tiny.configs import CLASS_NAMES, DIFFUSERS_VERSION, SCHEDULER_CONFIG

SOURCE = "scripts/train_tiny.py (trained from scratch on Fashion-MNIST)"


def as_f16(params: Any) -> Any:
    """Round to the float16 that is shipped, kept as float32 for compute."""
    return jax.tree.map(lambda a: np.asarray(a, np.float16).astype(np.float32), params)


def count(params: Any) -> int:
    """Number of parameters in a tree."""
    return int(sum(np.size(a) for a in jax.tree.leaves(params)))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_model(out: Path, parts: dict[str, tuple[dict, dict]]) -> None:
    """Write `parts` (name -> (config.json dict, params)) as a converted model folder.

    Params are saved in float16 (orbax, `NAME/params/`); the scheduler config and
    `model_index.json` are written too. tokenizer/ and tokenizer_2/ must already be in `out`.
    """
    for name, (config, params) in parts.items():
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        _write_json(folder / "config.json", config)
        p16 = jax.tree.map(lambda a: np.asarray(a, np.float16), params)
        checkpoint.save_params(folder / checkpoint.PARAMS, p16)
    sched = out / "scheduler"
    sched.mkdir(exist_ok=True)
    _write_json(sched / "scheduler_config.json", SCHEDULER_CONFIG)
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }
    _write_json(
        out / checkpoint.MANIFEST, checkpoint.manifest(jnp.float16, CLASS_NAMES, SOURCE, index)
    )
