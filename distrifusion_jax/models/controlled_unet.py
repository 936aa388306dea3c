"""ControlledUNet: a UNet2DConditionModel steered by one or more ControlNets, as one module.

diffusers' ControlNet pipelines call the ControlNet(s), sum their residuals (MultiControlNet)
and pass them to the UNet. Here the three run in one `apply`, so under patch parallelism one
step is still one pure function: every ControlNet runs on the same row band as the UNet, with
the matching rows of its conditioning image, and keeps its own stale state (under its own
path, "controlnets_k/..."); the band's residuals are added to the UNet's own rows.

Parameters: `{"unet": <UNet params>, "controlnets_0": <ControlNet params>, ...}`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.models.controlnet import ControlNetModel
from distrifusion_jax.models.controlnet_config import ControlNetConfig
from distrifusion_jax.models.unet import UNet2DConditionModel
from distrifusion_jax.models.unet_config import UNetConfig
from distrifusion_jax.parallel import PatchContext

Dtype = Any
# {"images": (one [B, H*f, W*f, C_k] per ControlNet), "scales": [B, K]}: a step's control.
Control = dict[str, Any]


def controlled_params(unet_params: Any, controlnet_params: list[Any] | tuple[Any, ...]) -> dict:
    """The param tree of `ControlledUNet` from the UNet's and each ControlNet's."""
    out = {"unet": unet_params}
    out.update({f"controlnets_{k}": p for k, p in enumerate(controlnet_params)})
    return out


class ControlledUNet(nn.Module):
    """Noise prediction `[B, H, W, C_in] -> [B, H, W, C_out]` with ControlNet residuals.

    Attributes:
      config: the UNet's config (so samplers' shape checks read it as a UNet's).
      controlnets: one config per ControlNet.
      guess_mode: diffusers' `guess_mode` weights on every ControlNet's residuals (static; the
        unconditional half's zero residuals come from its scale, see `pipeline_control`).
      patch, dtype, param_dtype: as `UNet2DConditionModel`.
    """

    config: UNetConfig
    controlnets: tuple[ControlNetConfig, ...] = ()
    guess_mode: bool = False
    patch: PatchContext | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: dict[str, jax.Array] | None = None,
        control: Control | None = None,
    ) -> jax.Array:
        """Args as `UNet2DConditionModel`, plus `control`: `images`, one `[B, H*f, W*f, C_k]`
        per ControlNet (f: its conditioning factor; a row band like `sample`), and `scales`
        `[B, K]` (conditioning scale of each ControlNet for each sample at this step). Without
        `control` the ControlNets do not run."""
        kw = dict(patch=self.patch, dtype=self.dtype, param_dtype=self.param_dtype)
        down, mid = None, None
        if control is not None and self.controlnets:
            images, scales = tuple(control["images"]), control["scales"]
            if len(images) != len(self.controlnets) or scales.shape[-1] != len(self.controlnets):
                raise ValueError(
                    f"{len(self.controlnets)} ControlNets got {len(images)} conditioning images "
                    f"and {scales.shape[-1]} scales; give one of each per ControlNet."
                )
            for k, (cfg, image) in enumerate(zip(self.controlnets, images)):
                d, m = ControlNetModel(cfg, name=f"controlnets_{k}", **kw)(
                    sample,
                    timesteps,
                    encoder_hidden_states,
                    image,
                    added_cond_kwargs,
                    scales[:, k],
                    self.guess_mode,
                )
                # MultiControlNet: residuals summed in ControlNet order.
                down = d if down is None else tuple(a + b for a, b in zip(down, d))
                mid = m if mid is None else mid + m
        return UNet2DConditionModel(self.config, name="unet", **kw)(
            sample, timesteps, encoder_hidden_states, added_cond_kwargs, down, mid
        )
