"""Single-file checkpoints in the original (SGM/LDM) layout -> diffusers keys, per component.

`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `conditioner.embedders.0.*` and
`conditioner.embedders.1.*` (SDXL's two text encoders) are renamed with diffusers' own functions
from `diffusers.loaders.single_file_utils`, so this file holds no key maps of its own. Configs:
for SDXL base (what diffusers infers from the keys) the published diffusers configs, as
diffusers' `from_single_file` would download them; for anything else pass the original YAML
(`--original-config`), read by diffusers' `create_*_diffusers_config_from_ldm`.

torch and diffusers are imported only here. The file is mmapped by torch, so this path peaks at
about file size + converted params (the diffusers-folder path peaks at params + one tensor).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from distrifusion_jax.io.components import read_config
from distrifusion_jax.io.keys import ConversionError
from distrifusion_jax.io.weights import (
    ALLOW_PICKLE_HINT,
    PICKLE_SUFFIXES,
    DictSource,
    PickleFile,
    PickleRefused,
    SafetensorsFile,
    TensorSource,
    WeightsError,
)
from distrifusion_jax.models.clip import sdxl_text_encoder_2_config, sdxl_text_encoder_config
from distrifusion_jax.models.unet_config import sdxl_base
from distrifusion_jax.models.vae import sdxl_vae_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."


def _sdxl_configs() -> dict[str, dict[str, Any]]:
    """stabilityai/stable-diffusion-xl-base-1.0's published component configs."""
    te1 = {"architectures": ["CLIPTextModel"], **sdxl_text_encoder_config().to_dict()}
    te2 = {
        "architectures": ["CLIPTextModelWithProjection"],
        **sdxl_text_encoder_2_config().to_dict(),
    }
    return {
        "unet": sdxl_base().to_diffusers(),
        "vae": {"_class_name": "AutoencoderKL", **sdxl_vae_config().to_dict()},
        "text_encoder": te1,
        "text_encoder_2": te2,
    }


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """All tensors of a single file as (lazily mmapped) torch tensors."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        SafetensorsFile(path).close()  # validates the header: one clear error if corrupt
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.name.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise PickleRefused(f"{path} is a pickle: {ALLOW_PICKLE_HINT}")
        return PickleFile(path)._sd
    raise WeightsError(
        f"{path}: a single-file checkpoint must be .safetensors (or, with --allow-pickle, "
        ".ckpt/.pt/.bin)"
    )


def component_configs(
    checkpoint: Mapping[str, Any],
    where: Path,
    config: str | os.PathLike | None = None,
    original_config: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """diffusers config dicts for the components present in `checkpoint`.

    In order of preference: `config`, a diffusers folder whose `<component>/config.json` (or,
    for a component folder, `config.json`) describe the checkpoint, as diffusers'
    `from_single_file(config=...)`; the original YAML; the published SDXL base configs.
    """
    from diffusers.loaders import single_file_utils as sfu

    present = [
        name
        for name, found in (
            ("unet", any(k.startswith(UNET_PREFIX) for k in checkpoint)),
            ("vae", any(k.startswith(VAE_PREFIXES) for k in checkpoint)),
            ("text_encoder", any(k.startswith(TE1_PREFIX) for k in checkpoint)),
            ("text_encoder_2", any(k.startswith(TE2_PREFIX) for k in checkpoint)),
        )
        if found
    ]
    if not present:
        raise ValueError(
            f"{where} has no keys in the original SD layout (model.diffusion_model.*, "
            "first_stage_model.*, conditioner.*); for a diffusers checkpoint pass its folder"
        )
    if config is not None:
        config = Path(config)
        if (config / "config.json").is_file():  # one component folder: the UNet's
            return {"unet": read_config(config)} if "unet" in present else {}
        return {n: read_config(config / n) for n in present if (config / n).is_dir()}
    model_type = sfu.infer_diffusers_model_type(checkpoint)
    configs = _sdxl_configs() if model_type == "xl_base" else {}
    if original_config is not None:
        if "unet" in present:
            unet = sfu.create_unet_diffusers_config_from_ldm(original_config, checkpoint)
            configs["unet"] = {"_class_name": "UNet2DConditionModel", **unet}
        if "vae" in present:
            vae = sfu.create_vae_diffusers_config_from_ldm(original_config, checkpoint)
            configs["vae"] = {"_class_name": "AutoencoderKL", **vae}
    elif model_type != "xl_base":
        raise ValueError(
            f"{where} looks like a {model_type!r} checkpoint and only SDXL base has built-in "
            "configs: pass --config with a diffusers folder of this model's configs, or "
            "--original-config with its original YAML"
        )
    return {n: configs[n] for n in present if n in configs}


def diffusers_tensors(
    name: str, checkpoint: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """Component `name`'s tensors under diffusers keys (diffusers' own renaming functions)."""
    from diffusers.loaders import single_file_utils as sfu

    if name == "unet":
        return sfu.convert_ldm_unet_checkpoint(dict(checkpoint), dict(config))
    if name == "vae":
        return sfu.convert_ldm_vae_checkpoint(dict(checkpoint), dict(config))
    if name == "text_encoder":
        return sfu.convert_ldm_clip_checkpoint(dict(checkpoint), remove_prefix=TE1_PREFIX)
    if name == "text_encoder_2":
        # diffusers reads only `text_model.config.hidden_size` (when text_projection is absent).
        hidden = types.SimpleNamespace(hidden_size=config["hidden_size"])
        model = types.SimpleNamespace(config=hidden)
        return sfu.convert_open_clip_checkpoint(model, dict(checkpoint), prefix=TE2_PREFIX)
    raise ValueError(f"no single-file mapping for component {name!r}")


def unused_unet_keys(checkpoint: Mapping[str, Any], mapped: Mapping[str, Any]) -> list[str]:
    """UNet keys that diffusers' renaming silently dropped (it passes tensors through as is)."""
    if any(k.startswith("model_ema.") for k in checkpoint):
        return []  # EMA checkpoints: diffusers picks one copy on purpose
    used = {id(v) for v in mapped.values()}
    unet = (k for k, v in checkpoint.items() if k.startswith(UNET_PREFIX) and id(v) not in used)
    return sorted(unet)


@contextlib.contextmanager
def open_single_file(
    path: str | os.PathLike,
    names: tuple[str, ...] | None = None,
    config: str | os.PathLike | None = None,
    original_config: Mapping[str, Any] | str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> Iterator[dict[str, tuple[dict[str, Any], TensorSource]]]:
    """Yield `{component: (diffusers config dict, tensors under diffusers keys)}`.

    Args:
      path: the `.safetensors` (or, with allow_pickle, `.ckpt`) file.
      names: components wanted (default: every one present that has a config).
      config: a diffusers folder with this model's configs (see `component_configs`).
      original_config: the original YAML (path or parsed dict).
      allow_pickle: allow pickles (they can run code when loaded).
    """
    path = Path(path)
    if isinstance(original_config, (str, os.PathLike)):
        import yaml

        original_config = yaml.safe_load(Path(original_config).read_text())
    checkpoint = load_state_dict(path, allow_pickle=allow_pickle)
    configs = component_configs(checkpoint, path, config, original_config)
    if names is not None:
        absent = [n for n in names if n not in configs]
        if absent:
            raise ValueError(f"{path} holds no {', '.join(absent)} (it has {sorted(configs)})")
        configs = {n: configs[n] for n in names}
    out = {}
    for name, raw in configs.items():
        tensors = diffusers_tensors(name, checkpoint, raw)
        if name == "unet" and (dropped := unused_unet_keys(checkpoint, tensors)):
            shown = ", ".join(dropped[:20]) + (", ..." if len(dropped) > 20 else "")
            raise ConversionError(
                f"{path}: {len(dropped)} UNet key(s) fit no diffusers key: {shown}. "
                "Check that the config describes this checkpoint."
            )
        out[name] = (dict(raw), DictSource(tensors))
    try:
        yield out
    finally:
        out.clear()
        checkpoint.clear()
