"""SDXL refiner: the low-noise expert of diffusers' "ensemble of expert denoisers".

    pipe = DistriSDXLPipeline.from_pretrained(base_path, parallel=..., refiner=refiner_path)
    images = pipe("a lion", denoising_end=0.8)  # base: timesteps >= 200, refiner: < 200

A refiner folder (stable-diffusion-xl-refiner-1.0's layout) has `text_encoder_2/` and
`tokenizer_2/` only, its own `scheduler/`, and a UNet whose added time ids are 5 numbers:
original size, crop top-left and an aesthetic score (`requires_aesthetics_score`; diffusers'
`StableDiffusionXLImg2ImgPipeline._get_add_time_ids`, aesthetic_score 6.0 for the conditional
half, negative_aesthetic_score 2.5 for the unconditional one). The base runs the steps whose
timestep is at or above the cutoff `round(N_train * (1 - denoising_end))`, the refiner the steps
below the cutoff of `denoising_start`, continuing from the base's latents as they are: both UNets
live on the same mesh and the latents stay split by rows across the hand-off. The image is
decoded with the base's VAE (diffusers' docs share it too: `vae=base.vae`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from distrifusion_jax.io.checkpoint import load_component
from distrifusion_jax.io.refiner_folder import (
    HIGH_NOISE_FRAC,
    check_fraction,
    is_refiner_folder,
    model_index,
)
from distrifusion_jax.parallel.config import ParallelConfig
from distrifusion_jax.parallel.mesh import to_global
from distrifusion_jax.parallel.step import cond_spec
from distrifusion_jax.prompt import TextEncoder, encode_prompts, load_clip_tokenizer
from distrifusion_jax.sampling import scheduler_from_config
from distrifusion_jax.sampling.sample import StepTime, make_sampler, make_stepper

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' img2img defaults


def _cutoff(num_train_timesteps: int, fraction: float) -> int:
    """diffusers' `discrete_timestep_cutoff`."""
    return round(num_train_timesteps - fraction * num_train_timesteps)


def end_step(timesteps: np.ndarray, num_train_timesteps: int, denoising_end: float) -> int:
    """Steps the base runs before handing off (diffusers' `denoising_end`: the timesteps at or
    above the cutoff). `timesteps` `[T]`, descending."""
    check_fraction("denoising_end", denoising_end)
    cutoff = _cutoff(num_train_timesteps, denoising_end)
    return int((np.asarray(timesteps) >= cutoff).sum())


def begin_step(timesteps: np.ndarray, num_train_timesteps: int, denoising_start: float) -> int:
    """The first step the refiner runs (diffusers' img2img `get_timesteps` with
    `denoising_start`: the timesteps below the cutoff; every scheduler here has order 1)."""
    check_fraction("denoising_start", denoising_start)
    cutoff = _cutoff(num_train_timesteps, denoising_start)
    return len(timesteps) - int((np.asarray(timesteps) < cutoff).sum())


def split_steps(
    base_timesteps: np.ndarray,
    refiner_timesteps: np.ndarray,
    num_train: tuple[int, int],
    first: int,
    denoising_end: float,
    denoising_start: float,
) -> tuple[int, int]:
    """(the step after the base's last, the refiner's first step); ValueError when either
    expert would run no step. `num_train`: (base, refiner) num_train_timesteps."""
    end = end_step(base_timesteps, num_train[0], denoising_end)
    if end <= first:
        raise ValueError(
            f"denoising_end {denoising_end} leaves the base no step to run (it would stop at "
            f"step {end}, starting at {first}); raise denoising_end or the number of steps"
        )
    begin = begin_step(refiner_timesteps, num_train[1], denoising_start)
    if begin >= len(refiner_timesteps):
        raise ValueError(
            f"denoising_start {denoising_start} leaves the refiner no step of "
            f"{len(refiner_timesteps)}; lower it or raise the number of steps"
        )
    return end, begin


@dataclasses.dataclass
class Refiner:
    """A refiner UNet and its text encoder(s) on the base pipeline's mesh (`from_pretrained`)."""

    unet: Any
    unet_params: Any  # global arrays, replicated over the mesh
    encoders: list[TextEncoder]  # SDXL's refiner: text_encoder_2 only
    scheduler_config: dict
    path: str = ""
    requires_aesthetics_score: bool = True
    force_zeros_for_empty_prompt: bool = True
    _compiled: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, mesh: Any, dtype: Any = jnp.float32, **load_kw: Any
    ) -> Refiner:
        """Load a diffusers or converted refiner folder (`unet/`, `text_encoder_2/`,
        `tokenizer_2/`, `scheduler/`; `vae/` is not read: the base's decodes)."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(
                f"refiner folder {root} does not exist; pass an SDXL refiner model folder"
            )
        for need in ("unet", "scheduler"):
            if not (root / need).is_dir():
                raise FileNotFoundError(
                    f"refiner {root} has no {need}/ folder; pass a full SDXL refiner folder"
                )
        encoders = []
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if (root / enc).is_dir():
                module, params = load_component(root, enc, dtype, **load_kw)
                encoders.append(TextEncoder(load_clip_tokenizer(root / tok), module, params))
        if not encoders:
            raise FileNotFoundError(
                f"refiner {root} has no text_encoder_2/ folder; pass a full SDXL refiner folder"
            )
        unet, params = load_component(root, "unet", dtype, **load_kw)
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(
                f"{root} is not an SDXL refiner (its UNet has no text/time conditioning); "
                f"pass an SDXL refiner folder as the refiner"
            )
        index = model_index(root)
        aesthetic = index.get("requires_aesthetics_score", is_refiner_folder(root))
        out = cls(
            unet=unet,
            unet_params=to_global(params, mesh, P()),
            encoders=encoders,
            scheduler_config=json.loads((root / "scheduler" / "scheduler_config.json").read_text()),
            path=str(root),
            requires_aesthetics_score=bool(aesthetic),
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        )
        out._check_time_ids()
        return out

    def _check_time_ids(self) -> None:
        """The UNet's added-embedding width must fit 5 (aesthetic) or 6 time ids + pooled text,
        as diffusers' `_get_add_time_ids` checks."""
        cfg = self.unet.config
        pooled = self.encoders[-1].module.config.projection_dim
        ids = 5 if self.requires_aesthetics_score else 6
        got = cfg.projection_class_embeddings_input_dim
        want = ids * cfg.addition_time_embed_dim + pooled
        if got != want:
            raise ValueError(
                f"the refiner's UNet expects added embeddings of width {got}, but {ids} time ids "
                f"give {want}; set requires_aesthetics_score to "
                f"{not self.requires_aesthetics_score} in its model_index.json"
            )

    def scheduler(self, name: str | None = None):
        return scheduler_from_config(self.scheduler_config, name)

    def time_ids(
        self,
        size: tuple[int, int],
        original_size: tuple[int, int] | None,
        crops_coords_top_left: tuple[int, int],
        target_size: tuple[int, int] | None,
        aesthetic_score: float,
    ) -> list[float]:
        """diffusers' img2img `_get_add_time_ids`: original size + crop top-left + (aesthetic
        score, or target size when the refiner does not require aesthetics)."""
        tail = [aesthetic_score] if self.requires_aesthetics_score else [*(target_size or size)]
        return [*(original_size or size), *crops_coords_top_left, *tail]

    def cond(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None,
        guided: bool,
        size: tuple[int, int],
        mesh: Any,
        parallel: ParallelConfig,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = AESTHETIC_SCORE,
        negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
    ) -> dict[str, jax.Array]:
        """The refiner's conditioning, `[G, B, ...]` global arrays split like the base's:
        `encoder_hidden_states [G, B, 77, D2]`, `text_embeds [G, B, P]`, `time_ids [G, B, 5]`."""
        ids = lambda score: self.time_ids(
            size, original_size, crops_coords_top_left, target_size, score
        )
        cond = encode_prompts(
            self.encoders,
            prompts,
            negative_prompts,
            guided,
            True,
            ids(aesthetic_score),
            self.force_zeros_for_empty_prompt,
            negative_time_ids=ids(negative_aesthetic_score),
        )
        return to_global(jax.device_get(cond), mesh, cond_spec(parallel))

    def denoise(
        self,
        latents: jax.Array,
        cond: dict[str, jax.Array],
        guidance_scale: float,
        key: jax.Array,
        num_inference_steps: int,
        first_step: int,
        parallel: ParallelConfig,
        mesh: Any,
        scheduler: str | None = None,
        progress: Callable | None = None,
        times: list[StepTime] | None = None,
    ) -> jax.Array:
        """Steps first_step..T-1 from the base's `latents` `[B, h, w, C]` (global, split by rows
        as the base's sampler returns them; nothing is gathered) -> final latents, same split."""
        cache_key = (num_inference_steps, scheduler, progress is not None, first_step)
        if cache_key not in self._compiled:
            build = make_stepper if progress is not None else make_sampler
            self._compiled[cache_key] = build(
                self.unet,
                self.scheduler(scheduler),
                num_inference_steps,
                parallel,
                mesh,
                first_step=first_step,
                resume=True,
            )
        driver = self._compiled[cache_key]
        if progress is None:
            return driver(self.unet_params, latents, cond, guidance_scale, key)
        return driver.run(
            self.unet_params, latents, cond, guidance_scale, key, progress, times=times
        )


def expert_steps(
    sched: Any,
    refiner: Refiner | None,
    scheduler: str | None,
    num_inference_steps: int,
    first: int,
    denoising_end: float | None,
    denoising_start: float | None,
) -> tuple[int, int | None]:
    """(the step after the base's last, the refiner's first step; None without a refiner).

    Without a refiner, `denoising_end` only stops the base early (default: run every step);
    with one it defaults to `HIGH_NOISE_FRAC` and `denoising_start` to `denoising_end`.
    `sched`: the base's scheduler; `scheduler`: the name both experts use (None: their own).
    """
    t = num_inference_steps
    timesteps = np.asarray(sched.set_timesteps(t).timesteps)
    num_train = sched.num_train_timesteps
    if refiner is None:
        if denoising_start is not None:
            raise ValueError(
                "denoising_start needs a refiner: load one (from_pretrained(..., "
                "refiner=PATH), generate.py --refiner PATH) or drop denoising_start"
            )
        if denoising_end is None:
            return t, None
        end = end_step(timesteps, num_train, denoising_end)
        if end <= first:
            raise ValueError(
                f"denoising_end {denoising_end} leaves no step to run (it would stop at "
                f"step {end}, starting at {first}); raise it or the number of steps"
            )
        return end, None
    denoising_end = HIGH_NOISE_FRAC if denoising_end is None else denoising_end
    denoising_start = denoising_end if denoising_start is None else denoising_start
    refiner_sched = refiner.scheduler(scheduler)
    return split_steps(
        timesteps,
        np.asarray(refiner_sched.set_timesteps(t).timesteps),
        (num_train, refiner_sched.num_train_timesteps),
        first,
        denoising_end,
        denoising_start,
    )
