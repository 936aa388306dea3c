"""Registry of convertible components: folder name -> config parser, Flax module, example inputs.

A diffusers model root has one folder per component (`unet/`, `vae/`, `text_encoder/`,
`text_encoder_2/`, plus tokenizers and a scheduler that need no conversion). Each registered
component converts strictly onto `jax.eval_shape` of its Flax module (no random init).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.io.keys import ConversionError, convert_tensors, flatten
from distrifusion_jax.io.weights import TensorSource
from distrifusion_jax.models import clip
from distrifusion_jax.models.controlnet import ControlNetModel
from distrifusion_jax.models.controlnet_config import ControlNetConfig
from distrifusion_jax.models.unet import UNet2DConditionModel
from distrifusion_jax.models.unet_config import UNetConfig
from distrifusion_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

# Folders copied verbatim into a converted model (no weights to convert).
COPIED_FOLDERS = ("tokenizer", "tokenizer_2", "scheduler")


@dataclasses.dataclass(frozen=True)
class Component:
    """How to build one kind of component from its config.json.

    Attributes:
      name: folder name in a diffusers root.
      class_names: `_class_name` / `architectures` values this entry handles.
      make: (config.json dict, dtype) -> Flax module (params and activations in dtype).
      example_inputs: module -> positional args for `module.init` (shapes only matter).
      strip_prefix: removed from checkpoint keys before mapping (CLIP's `text_model.`).
    """

    name: str
    class_names: tuple[str, ...]
    make: Callable[[Mapping[str, Any], Any], Any]
    example_inputs: Callable[[Any], tuple[Any, ...]]
    strip_prefix: str = ""

    def target(self, module: Any) -> dict[str, Any]:
        """The param tree of `module` as `jax.ShapeDtypeStruct` leaves (nothing allocated)."""
        shapes = jax.eval_shape(module.init, jax.random.key(0), *self.example_inputs(module))
        return shapes["params"]


# ---- UNet -------------------------------------------------------------------------------


def _make_unet(raw: Mapping[str, Any], dtype: Any) -> Any:
    return UNet2DConditionModel(UNetConfig.from_diffusers(raw), dtype=dtype, param_dtype=dtype)


def _unet_inputs(module: Any) -> tuple[Any, ...]:
    cfg = module.config
    f = 2**cfg.num_downsamplers  # smallest latent that survives every downsampler
    sample = jnp.zeros((1, f, f, cfg.in_channels), jnp.float32)
    ctx = jnp.zeros((1, 1, cfg.cross_attention_dims[0]), jnp.float32)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {
            "text_embeds": jnp.zeros((1, pooled), jnp.float32),
            "time_ids": jnp.zeros((1, 6), jnp.float32),
        }
    return (sample, jnp.zeros((1,), jnp.float32), ctx, added)


# ---- ControlNet -------------------------------------------------------------------------


def _make_controlnet(raw: Mapping[str, Any], dtype: Any) -> Any:
    config = ControlNetConfig.from_diffusers(raw)
    return ControlNetModel(config, dtype=dtype, param_dtype=dtype)


def _controlnet_inputs(module: Any) -> tuple[Any, ...]:
    cn = module.config
    sample, t, ctx, added = _unet_inputs(UNet2DConditionModel(cn.as_unet()))
    f = cn.conditioning_factor
    h, w = sample.shape[1:3]
    image = jnp.zeros((1, h * f, w * f, cn.conditioning_channels), jnp.float32)
    return (sample, t, ctx, image, added)


# ---- VAE --------------------------------------------------------------------------------


def _make_vae(raw: Mapping[str, Any], dtype: Any) -> Any:
    config = AutoencoderKLConfig.from_diffusers(dict(raw))
    return AutoencoderKL(config, dtype=dtype, param_dtype=dtype)


def _vae_inputs(module: Any) -> tuple[Any, ...]:
    cfg = module.config
    f = cfg.downsample_factor
    return (jnp.zeros((1, f, f, cfg.in_channels), jnp.float32),)


# ---- CLIP text encoders -----------------------------------------------------------------


def _make_clip(default_class: str) -> Callable[[Mapping[str, Any], Any], Any]:
    def make(raw: Mapping[str, Any], dtype: Any) -> Any:
        archs = raw.get("architectures") or [default_class]
        classes = {
            "CLIPTextModel": clip.CLIPTextModel,
            "CLIPTextModelWithProjection": clip.CLIPTextModelWithProjection,
        }
        if archs[0] not in classes:
            raise ValueError(
                f"text encoder architecture {archs[0]!r} is not supported; "
                f"supported: {sorted(classes)}."
            )
        config = clip.CLIPTextConfig.from_hf(dict(raw))
        return classes[archs[0]](config, dtype=dtype, param_dtype=dtype)

    return make


def _clip_inputs(module: Any) -> tuple[Any, ...]:
    return (jnp.zeros((1, module.config.max_position_embeddings), jnp.int32),)


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("unet", ("UNet2DConditionModel",), _make_unet, _unet_inputs),
        Component("vae", ("AutoencoderKL",), _make_vae, _vae_inputs),
        Component("controlnet", ("ControlNetModel",), _make_controlnet, _controlnet_inputs),
        Component(
            "text_encoder",
            ("CLIPTextModel",),
            _make_clip("CLIPTextModel"),
            _clip_inputs,
            strip_prefix="text_model.",
        ),
        Component(
            "text_encoder_2",
            ("CLIPTextModelWithProjection",),
            _make_clip("CLIPTextModelWithProjection"),
            _clip_inputs,
            strip_prefix="text_model.",
        ),
    )
}


def get(name: str) -> Component:
    if name not in COMPONENTS:
        raise ValueError(f"no converter for component {name!r}; supported: {sorted(COMPONENTS)}")
    return COMPONENTS[name]


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """A component folder's config.json as a dict (one-line errors that say what to pass)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; pass a diffusers model root (with model_index.json), "
            "a component folder such as unet/, or a single-file .safetensors checkpoint"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore the original") from None


def name_for(folder: str | os.PathLike, raw: Mapping[str, Any]) -> str:
    """Which component a folder holds: by its folder name, else by `_class_name`/`architectures`."""
    if Path(folder).name in COMPONENTS:
        return Path(folder).name
    names = [raw.get("_class_name"), *(raw.get("architectures") or [])]
    for c in COMPONENTS.values():
        if any(n in c.class_names for n in names):
            return c.name
    known = sorted({n for c in COMPONENTS.values() for n in c.class_names})
    described = next((n for n in names if n), "an unknown model")
    raise ValueError(f"{folder}: config.json describes {described}; we convert only {known}")


def convert_params(
    source: TensorSource, component: Component, module: Any, target: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Strictly convert `source` onto `module`'s param tree, casting each tensor as it is read.

    Returns a nested dict of C-contiguous numpy arrays in the target leaves' dtypes.
    Raises `ConversionError` listing every missing, unexpected or mis-shaped key.
    """
    target = component.target(module) if target is None else target
    flat = flatten(target)

    def cast(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
        # One copy: layout (transpose) and dtype in the same pass.
        return np.ascontiguousarray(array, dtype=flat[path].dtype)

    return convert_tensors(
        source.keys(), source.read, target, cast=cast, strip_prefix=component.strip_prefix
    )


__all__ = [
    "COMPONENTS",
    "COPIED_FOLDERS",
    "Component",
    "ConversionError",
    "convert_params",
    "get",
    "name_for",
    "read_config",
]
