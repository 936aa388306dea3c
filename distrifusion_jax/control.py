"""ControlNet conditioning for the pipeline: loading, conditioning images, per-step scales.

Follows diffusers' `StableDiffusionXLControlNetPipeline` / `StableDiffusionControlNetPipeline`
(and `MultiControlNetModel` for several at once):
- each conditioning image is resized (Lanczos) to the output size and scaled to [0, 1]
  (`control_image_to_array`, diffusers' `VaeImageProcessor(do_normalize=False)`);
- ControlNet k runs at step i of T with scale `conditioning_scale_k` when
  `start_k <= i / T` and `(i + 1) / T <= end_k`, else 0 (`control_scales`);
- `guess_mode` (with guidance): the unconditional half gets no residuals (scale 0 there) and
  the residuals are weighted 0.1 ... 1.0 from the first skip to the mid block.
The sampler reads the images split by rows like the latent (`ImageCond["control"]`) and the
table `cond["control_scales"]` `[G, B, T, K]`; the model is a `ControlledUNet`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distrifusion_jax.io.images import ImageInput, load_image
from distrifusion_jax.models.controlled_unet import ControlledUNet, controlled_params
from distrifusion_jax.models.controlnet import ControlNetModel


@dataclasses.dataclass(frozen=True)
class ControlNet:
    """One loaded ControlNet: the Flax module and its params (global arrays on the mesh)."""

    module: ControlNetModel
    params: Any
    path: str = ""


def load_controlnet(path: str | Path, dtype: Any, mesh: Any, **load_kw: Any) -> ControlNet:
    """A diffusers (or converted) ControlNet folder -> `ControlNet`, params replicated."""
    from jax.sharding import PartitionSpec as P

    from distrifusion_jax.io.checkpoint import load_component
    from distrifusion_jax.parallel.mesh import to_global

    module, params = load_component(path, "controlnet", dtype, **load_kw)
    return ControlNet(module, to_global(params, mesh, P()), str(path))


def per_net(value: Any, k: int, name: str) -> list[float]:
    """A scalar or one value per ControlNet -> a list of k floats (diffusers' broadcasting)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * k
    if len(values) != k:
        raise ValueError(f"{name} has {len(values)} values for {k} ControlNets; give 1 or {k}.")
    return [float(v) for v in values]


def control_scales(
    num_steps: int,
    scales: Sequence[float],
    starts: Sequence[float],
    ends: Sequence[float],
    batch: int,
    guided: bool,
    guess_mode: bool = False,
) -> np.ndarray:
    """Every ControlNet's scale at every step: `[G, B, T, K]` fp32 (G = 2 when guided).

    As diffusers: `keep = 1 - (i / T < start or (i + 1) / T > end)`, scale * keep; in guess mode
    with guidance the unconditional half (G index 0) gets 0.
    """
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(
                f"control guidance start {s} and end {e} must satisfy 0 <= start < end <= 1."
            )
    i = np.arange(num_steps, dtype=np.float64)[:, None]  # [T, 1]
    off = (i / num_steps < np.asarray(starts)) | ((i + 1) / num_steps > np.asarray(ends))
    table = np.asarray(scales, np.float32) * (1.0 - off).astype(np.float32)  # [T, K]
    g = 2 if guided else 1
    out = np.broadcast_to(table, (g, batch) + table.shape).copy()  # [G, B, T, K]
    if guided and guess_mode:
        out[0] = 0.0
    return out


def control_image_to_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB conditioning image -> `[H, W, 3]` float32 in [0, 1] at (height, width) (Lanczos)."""
    # diffusers resizes, then converts to RGB
    image = image.resize((width, height), resample=Image.LANCZOS).convert("RGB")
    return np.asarray(image, np.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class ControlInputs:
    """What a controlled generation adds to a plain one (host arrays)."""

    model: ControlledUNet
    params: dict
    scales: np.ndarray  # cond["control_scales"] [G, B, T, K]
    images: tuple[np.ndarray, ...]  # image["control"], each [B, H, W, C_k]

    def signature(self) -> tuple:
        """Hashable: what the compiled sampler depends on."""
        return (self.model.controlnets, self.model.guess_mode, self.model.dtype)


def prepare(
    unet: Any,
    unet_params: Any,
    controlnets: Sequence[ControlNet],
    images: ImageInput | Sequence[ImageInput],
    height: int,
    width: int,
    batch: int,
    num_steps: int,
    guided: bool,
    vae_factor: int,
    conditioning_scale: float | Sequence[float] = 1.0,
    guidance_start: float | Sequence[float] = 0.0,
    guidance_end: float | Sequence[float] = 1.0,
    guess_mode: bool = False,
) -> ControlInputs:
    """The `ControlledUNet`, its params, the step-scale table and the conditioning images.

    Raises ValueError when the counts of images/scales/starts/ends do not match the
    ControlNets, or a ControlNet's embedding factor is not the VAE's.
    """
    k = len(controlnets)
    if k == 0:
        raise ValueError("control images given but no ControlNet is loaded; load one first.")
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    images = list(images)
    if len(images) != k:
        raise ValueError(f"{len(images)} control images for {k} ControlNets; give one per net.")
    for net in controlnets:
        f = net.module.config.conditioning_factor
        if f != vae_factor:
            raise ValueError(
                f"ControlNet {net.path or ''} embeds its image {f}x down but the VAE factor is "
                f"{vae_factor}; use a ControlNet made for this model."
            )
    arrays = tuple(
        np.ascontiguousarray(
            np.broadcast_to(
                control_image_to_array(load_image(im, "control image"), height, width),
                (batch, height, width, 3),
            )
        )
        for im in images
    )
    scales = control_scales(
        num_steps,
        per_net(conditioning_scale, k, "controlnet_conditioning_scale"),
        per_net(guidance_start, k, "control_guidance_start"),
        per_net(guidance_end, k, "control_guidance_end"),
        batch,
        guided,
        guess_mode,
    )
    model, params = controlled_model(unet, unet_params, controlnets, guess_mode)
    return ControlInputs(model, params, scales, arrays)


def controlled_model(
    unet: Any, unet_params: Any, controlnets: Sequence[ControlNet], guess_mode: bool = False
) -> tuple[ControlledUNet, dict]:
    """The `ControlledUNet` of a UNet and its ControlNets (the UNet's dtypes) and its params."""
    model = ControlledUNet(
        unet.config,
        tuple(net.module.config for net in controlnets),
        guess_mode=guess_mode,
        dtype=unet.dtype,
        param_dtype=unet.param_dtype,
    )
    return model, controlled_params(unet_params, [net.params for net in controlnets])
