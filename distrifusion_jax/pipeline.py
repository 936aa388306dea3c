"""Text -> image: tokenize, encode, sample on the mesh, decode on row bands.

    pipe = DistriSDXLPipeline.from_pretrained("path/to/sdxl", parallel=ParallelConfig(patches=8))
    images = pipe("an astronaut riding a horse", num_inference_steps=50)
    images = pipe("a red horse", image="horse.png", strength=0.5)           # img2img
    images = pipe("a cat", image="room.png", mask_image="mask.png")          # inpainting
    pipe.load_controlnets(["path/to/controlnet-canny"])                      # ControlNet
    images = pipe("a bird", control_image="edges.png", controlnet_conditioning_scale=0.5)
    pipe = DistriSDXLPipeline.from_pretrained(base, refiner=refiner_path)     # base -> refiner
    images = pipe("a lion", denoising_end=0.8)                               # (`refiner.py`)

Image-to-image and inpainting follow diffusers' `StableDiffusionXLImg2ImgPipeline` /
`StableDiffusionXLInpaintPipeline` (and the SD 1.x/2.x ones): the image is VAE-encoded on row
bands, the first `T - int(T * strength)` steps are skipped, a 4-channel UNet blends the known
region back every step and a 9-channel inpainting UNet reads mask and masked-image latents.

Works for SDXL (two text encoders, micro-conditioning) and SD 1.x/2.x (one encoder) folders,
diffusers-format or converted (`python -m convert`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from PIL import Image

from distrifusion_jax import control
from distrifusion_jax.io.checkpoint import load_component
from distrifusion_jax.io.images import (
    ImageInput,
    default_size,
    image_to_array,
    latent_mask,
    load_image,
    mask_to_array,
)
from distrifusion_jax.io.lora import kernel_shapes, load_lora, merge_loras
from distrifusion_jax.parallel.config import ParallelConfig
from distrifusion_jax.parallel.mesh import make_mesh, to_global, to_host
from distrifusion_jax.parallel.step import cond_spec, latent_spec, make_decode, make_encode
from distrifusion_jax.prompt import TextEncoder, encode_prompts, load_clip_tokenizer
from distrifusion_jax.refiner import (
    AESTHETIC_SCORE,
    NEGATIVE_AESTHETIC_SCORE,
    Refiner,
    expert_steps,
    is_refiner_folder,
)
from distrifusion_jax.sampling import scheduler_from_config
from distrifusion_jax.sampling.sample import (
    StepTime,
    compile_seconds,
    make_sampler,
    make_stepper,
    start_step,
    steady_step,
)


def default_strength(sdxl: bool, inpaint: bool) -> float:
    """diffusers' default `strength`: SDXL img2img 0.3, inpainting 0.9999; SD 0.8 and 1.0."""
    return (0.9999 if sdxl else 1.0) if inpaint else (0.3 if sdxl else 0.8)


@dataclasses.dataclass
class Timings:
    """Seconds spent in the last call; `step_times` only with a `progress` driver."""

    encode: float = 0.0
    denoise: float = 0.0  # all steps, compiles included
    decode: float = 0.0
    step_times: list[StepTime] = dataclasses.field(default_factory=list)

    def steady_step(self) -> float:
        """Median seconds of the steps that did not compile (NaN if none)."""
        return steady_step(self.step_times)

    def compile_seconds(self) -> float:
        """Seconds the compiling steps took beyond a steady step."""
        return compile_seconds(self.step_times)


@dataclasses.dataclass
class DistriSDXLPipeline:
    """A loaded model spread over a mesh. Build with `from_pretrained`."""

    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    encoders: list[TextEncoder]
    scheduler_config: dict
    parallel: ParallelConfig
    mesh: Any
    force_zeros_for_empty_prompt: bool = True
    timings: Timings = dataclasses.field(default_factory=Timings)
    _compiled: dict = dataclasses.field(default_factory=dict)
    loras: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # set_loras
    _base: dict = dataclasses.field(default_factory=dict)  # what set_loras merges into
    refiner: Refiner | None = None  # load_refiner: the low-noise expert
    controlnets: list[control.ControlNet] = dataclasses.field(default_factory=list)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        parallel: ParallelConfig | None = None,
        dtype: Any = jnp.float32,
        mesh: Any = None,
        refiner: str | Path | None = None,
        **load_kw: Any,
    ) -> DistriSDXLPipeline:
        """Load every component of a diffusers or converted folder.

        Args:
          path: model root with `unet/`, `vae/`, `text_encoder/` (+ `text_encoder_2/` for SDXL),
            `tokenizer/` (+ `tokenizer_2/`), `scheduler/`.
          parallel: mesh layout and DistriFusion mode (default: one device).
          dtype: params and activations of the UNet and text encoders (the VAE stays fp32 when
            its config says `force_upcast` and dtype is float16).
          mesh: an existing mesh (default `make_mesh(parallel)`).
          refiner: an SDXL refiner folder run after this base (see `load_refiner`).
          load_kw: passed to `load_component` (e.g. `variant="fp16"`).
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(
                f"model folder {root} does not exist; pass a diffusers or converted model folder"
            )
        if is_refiner_folder(root):
            raise ValueError(
                f"{root} is an SDXL refiner (text_encoder_2 only, aesthetic-score time ids), not "
                f"a base model; pass a base model folder as the model and this one as the "
                f"refiner (generate.py --refiner PATH, from_pretrained(..., refiner=PATH))"
            )
        for need in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (root / need).is_dir():
                raise FileNotFoundError(
                    f"{root} has no {need}/ folder; pass a full diffusers or converted model root"
                )
        parallel = parallel or ParallelConfig()
        unet, unet_params = load_component(root, "unet", dtype, **load_kw)
        vae_dtype = jnp.float32 if dtype == jnp.float16 else dtype
        vae, vae_params = load_component(root, "vae", vae_dtype, **load_kw)
        encoders = []
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if (root / enc).is_dir():
                module, params = load_component(root, enc, dtype, **load_kw)
                encoders.append(TextEncoder(load_clip_tokenizer(root / tok), module, params))
        sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        mesh = mesh if mesh is not None else make_mesh(parallel)
        pipe = cls(
            unet=unet,
            unet_params=to_global(unet_params, mesh, P()),
            vae=vae,
            vae_params=to_global(vae_params, mesh, P()),
            encoders=encoders,
            scheduler_config=sched,
            parallel=parallel,
            mesh=mesh,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        )
        if refiner is not None:
            pipe.load_refiner(refiner, dtype, **load_kw)
        return pipe

    def load_refiner(self, path: str | Path, dtype: Any = None, **load_kw: Any) -> None:
        """Load an SDXL refiner onto this pipeline's mesh: calls then run this base for the
        high-noise steps and the refiner for the rest (`denoising_end`, default 0.8)."""
        if not self.is_sdxl:
            raise ValueError(
                "a refiner continues an SDXL base; this model is SD 1.x/2.x (no text/time "
                "conditioning): pass an SDXL base model"
            )
        dtype = dtype if dtype is not None else self.unet.dtype
        refiner = Refiner.from_pretrained(path, self.mesh, dtype, **load_kw)
        if refiner.unet.config.in_channels != self.unet.config.out_channels:
            raise ValueError(
                f"the refiner's UNet takes {refiner.unet.config.in_channels} channels but the "
                f"base makes {self.unet.config.out_channels}; pass a refiner for this base"
            )
        self.refiner = refiner

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.addition_embed_type == "text_time"

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def default_size(self) -> int:
        """Pixels per side the UNet was trained at (diffusers: sample_size * VAE factor)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> None:
        """Merge LoRA files `[(path, scale), ...]` into the UNet and text encoders, replacing any
        set before (`[]` restores the loaded params). Every file is read and checked against the
        model first (`io.lora.LoraError` names the file and key), so a bad one changes nothing;
        the base params are kept, so swapping or rescaling never reloads the checkpoint.
        """
        names = ("text_encoder", "text_encoder_2")[: len(self.encoders)]
        if not self._base:  # first call: keep what was loaded (encoders with their jit caches)
            self._base = {"unet": self.unet_params, **dict(zip(names, self.encoders))}
        kernels = {"unet": kernel_shapes(self._base["unet"])}
        kernels.update({n: kernel_shapes(self._base[n].params) for n in names})
        parsed = [(load_lora(path, kernels), float(scale)) for path, scale in loras]
        self.unet_params = merge_loras(self._base["unet"], parsed, "unet")
        encoders = []
        for n in names:
            base = self._base[n]
            params = merge_loras(base.params, parsed, n)
            encoders.append(
                base if params is base.params else dataclasses.replace(base, params=params)
            )
        self.encoders = encoders
        self.loras = [(str(path), float(scale)) for path, scale in loras]

    def scheduler(self, name: str | None = None):
        return scheduler_from_config(self.scheduler_config, name)

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int = 0,
        scheduler: str | None = None,
        num_images: int = 1,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        progress: Callable | None = None,
        noise: np.ndarray | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float | None = None,
        posterior: str = "sample",
        denoising_end: float | None = None,
        denoising_start: float | None = None,
        aesthetic_score: float = AESTHETIC_SCORE,
        negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
        control_image: ImageInput | Sequence[ImageInput] | None = None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
    ) -> list[Image.Image]:
        """Generate `num_images` images per prompt; returns PIL images (on every process).

        `progress` (e.g. `tqdm.tqdm`) switches to the step-at-a-time driver and records
        per-step times in `self.timings`; otherwise the whole loop is one jit call.
        `noise` `[B, h, w, C]` (unit Gaussian) replaces the seeded initial latents.
        `image` (PIL or path): img2img from it; with `mask_image` (white = repaint, same size)
        inpainting. Height and width default to the image's, rounded down to the VAE factor.
        `strength` in (0, 1] (default `default_strength`): the share of the steps run.
        `posterior`: "sample" draws the image latents from the VAE posterior (seeded, as
        diffusers), "mean" takes its mean (diffusers' `sample_mode="argmax"`).
        `denoising_end` in (0, 1): the base stops where that share of the noise levels is
        denoised (diffusers' name); with a refiner loaded (default 0.8) the refiner takes over
        from `denoising_start` (default `denoising_end`), conditioned on `aesthetic_score` and
        `negative_aesthetic_score` (SDXL refiner); without one the latents are returned as they
        are (decoded by `__call__`).
        `control_image` (one per ControlNet of `load_controlnets`, PIL or path; resized to the
        output): ControlNet conditioning as diffusers' ControlNet pipelines, with
        `controlnet_conditioning_scale`, `control_guidance_start`/`_end` (shares of the steps in
        which each ControlNet acts; a value or one per ControlNet) and `guess_mode`.
        """
        latents = self.generate_latents(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            seed,
            scheduler,
            num_images,
            original_size,
            crops_coords_top_left,
            target_size,
            progress,
            noise,
            image,
            mask_image,
            strength,
            posterior,
            denoising_end=denoising_end,
            denoising_start=denoising_start,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
            control_image=control_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
            guess_mode=guess_mode,
        )
        return self.decode(latents)

    def generate_latents(
        self,
        prompt,
        negative_prompt=None,
        height=None,
        width=None,
        num_inference_steps=50,
        guidance_scale=5.0,
        seed=0,
        scheduler=None,
        num_images=1,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        progress=None,
        noise=None,
        image=None,
        mask_image=None,
        strength=None,
        posterior="sample",
        denoising_end=None,
        denoising_start=None,
        aesthetic_score=AESTHETIC_SCORE,
        negative_aesthetic_score=NEGATIVE_AESTHETIC_SCORE,
        control_image=None,
        controlnet_conditioning_scale=1.0,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
        guess_mode=False,
    ) -> jax.Array:
        """Like `__call__` but returns the final latents `[B, h, w, C]` (a global array)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        negs = negative_prompt
        if negs is not None:
            negs = [negs] if isinstance(negs, str) else list(negs)
            negs = [n for n in negs for _ in range(num_images)]
            if len(negs) != len(prompts):
                raise ValueError(
                    f"{len(negs) // num_images} negative prompts for "
                    f"{len(prompts) // num_images} prompts; give one per prompt or a single one."
                )
        f = self.vae_scale_factor
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: pass the image to inpaint as well.")
        if posterior not in ("sample", "mean"):
            raise ValueError(f"posterior must be 'sample' or 'mean'; got {posterior!r}")
        first = 0
        if image is not None:
            image = load_image(image)
            if mask_image is not None:
                mask_image = load_image(mask_image, "mask")
                if mask_image.size != image.size:
                    raise ValueError(
                        f"mask size {mask_image.width}x{mask_image.height} differs from image "
                        f"size {image.width}x{image.height}; give a mask of the image's size."
                    )
            if strength is None:
                strength = default_strength(self.is_sdxl, mask_image is not None)
            first = start_step(num_inference_steps, strength)
            h0, w0 = default_size(image, f)
            height, width = height or h0, width or w0
        elif strength is not None:
            raise ValueError("strength needs image: pass an image for img2img or inpainting.")
        height = height or self.default_size
        width = width or self.default_size
        if height % f or width % f:
            raise ValueError(
                f"height {height} and width {width} must be multiples of the VAE factor {f}."
            )
        guided = guidance_scale > 1.0
        pc = self.parallel
        if pc.cfg_split and not guided:
            raise ValueError(
                f"cfg_split needs guidance_scale > 1 (got {guidance_scale}); disable cfg split."
            )
        lat_shape = (len(prompts), height // f, width // f, self.unet.config.out_channels)
        self._check_channels(lat_shape[-1], mask_image is not None)
        pc.check_shapes(lat_shape[1:3], self.unet.config.num_downsamplers, batch=lat_shape[0])
        sched = self.scheduler(scheduler)
        end, begin = expert_steps(
            sched, self.refiner, scheduler, num_inference_steps, first, denoising_end,
            denoising_start,
        )  # fmt: skip
        if begin is not None:
            self._check_refiner(lat_shape, mask_image is not None)

        t0 = time.perf_counter()
        time_ids = None
        if self.is_sdxl:
            time_ids = [
                *(original_size or (height, width)),
                *crops_coords_top_left,
                *(target_size or (height, width)),
            ]
        cond = encode_prompts(
            self.encoders,
            prompts,
            negs,
            guided,
            self.is_sdxl,
            time_ids,
            self.force_zeros_for_empty_prompt,
        )
        cond = to_global(jax.device_get(cond), self.mesh, cond_spec(pc))
        if begin is not None:
            refiner_cond = self.refiner.cond(
                prompts, negs, guided, (height, width), self.mesh, pc, original_size,
                crops_coords_top_left, target_size, aesthetic_score, negative_aesthetic_score,
            )  # fmt: skip
        key = jax.random.PRNGKey(seed)
        noise_key, step_key = jax.random.split(key)
        if noise is None:
            noise = jax.random.normal(noise_key, lat_shape, jnp.float32)
        elif tuple(noise.shape) != lat_shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {lat_shape}.")
        noise = np.asarray(noise, np.float32)
        spec = P("data") if pc.naive else latent_spec("row")
        noise = to_global(noise, self.mesh, spec)
        step_key = to_global(np.asarray(step_key), self.mesh, P())
        cond_image = {}
        if image is not None:
            image_key = jax.random.fold_in(key, 2)  # the txt2img keys stay as they were
            cond_image = self._image_cond(
                image, mask_image, lat_shape, strength, posterior, image_key
            )
            cond_image = to_global(cond_image, self.mesh, spec)
        model, params, signature = self.unet, self.unet_params, None
        if control_image is not None or self.controlnets:
            ctl = self._control_inputs(
                control_image, height, width, len(prompts), num_inference_steps, guided,
                controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                guess_mode,
            )  # fmt: skip
            model, params, signature = ctl.model, ctl.params, ctl.signature()
            cond = {**cond, "control_scales": to_global(ctl.scales, self.mesh, cond_spec(pc))}
            cond_image = {**cond_image, "control": to_global(ctl.images, self.mesh, spec)}
        self.timings = Timings(encode=time.perf_counter() - t0)

        t0 = time.perf_counter()
        cache_key = (num_inference_steps, scheduler, progress is not None, first, end, signature)
        if cache_key not in self._compiled:
            build = make_stepper if progress is not None else make_sampler
            self._compiled[cache_key] = build(
                model, sched, num_inference_steps, pc, self.mesh, first_step=first,
                last_step=end,
            )  # fmt: skip
        driver = self._compiled[cache_key]
        if progress is None:
            latents = driver(params, noise, cond, guidance_scale, step_key, cond_image)
        else:
            latents = driver.run(
                params,
                noise,
                cond,
                guidance_scale,
                step_key,
                progress,
                times=self.timings.step_times,
                image=cond_image,
            )
        if begin is not None:  # the hand-off: the base's latents, still split by rows
            refiner_key = to_global(np.asarray(jax.random.fold_in(key, 3)), self.mesh, P())
            latents = self.refiner.denoise(
                latents, refiner_cond, guidance_scale, refiner_key, num_inference_steps, begin,
                pc, self.mesh, scheduler, progress, self.timings.step_times,
            )  # fmt: skip
        latents.block_until_ready()
        self.timings.denoise = time.perf_counter() - t0
        return latents

    def load_controlnets(
        self, paths: Sequence[str | Path], dtype: Any = None, **load_kw: Any
    ) -> None:
        """Load ControlNet folders (diffusers or converted), replacing any loaded before; calls
        then need one `control_image` per ControlNet (`[]`: none, plain generation)."""
        dtype = dtype if dtype is not None else self.unet.dtype
        self.controlnets = [
            control.load_controlnet(path, dtype, self.mesh, **load_kw) for path in paths
        ]

    def _control_inputs(
        self, images, height, width, batch, steps, guided, scale, start, end, guess_mode
    ) -> control.ControlInputs:
        """The ControlledUNet, its params and host arrays for one call (see `control.py`)."""
        if images is None:
            raise ValueError(
                f"{len(self.controlnets)} ControlNet(s) loaded: pass control_image (one per "
                "ControlNet), or load_controlnets([]) for plain generation."
            )
        return control.prepare(
            self.unet, self.unet_params, self.controlnets, images, height, width, batch, steps,
            guided, self.vae_scale_factor, scale, start, end, guess_mode,
        )  # fmt: skip

    def _check_refiner(self, lat_shape: tuple[int, ...], inpaint: bool) -> None:
        """Before any work: the refiner can take this latent (its own downsampling count)."""
        if inpaint:
            raise ValueError(
                "inpainting with a refiner is not supported; drop the mask or the refiner"
            )
        cfg = self.refiner.unet.config
        self.parallel.check_shapes(lat_shape[1:3], cfg.num_downsamplers, batch=lat_shape[0])

    def _check_channels(self, latent_channels: int, inpaint: bool) -> None:
        """A 4-channel UNet, or with a mask a 9-channel inpainting UNet (latents, mask,
        masked-image latents)."""
        c_in, c = self.unet.config.in_channels, latent_channels
        if c_in == c or (inpaint and c_in == 2 * c + 1):
            return
        raise ValueError(
            f"the UNet takes {c_in} input channels; expected {c} (text/img2img/inpainting) or "
            f"{2 * c + 1} (inpainting UNet{', which needs mask_image' if not inpaint else ''})."
        )

    def encode_image(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels `[B, H, W, 3]` in [-1, 1] -> VAE posterior (mean, logvar) `[B, h, w, C]`
        (host arrays), encoding on row bands across the mesh (exact)."""
        if "encode" not in self._compiled:
            self._compiled["encode"] = make_encode(self.vae, self.parallel, self.mesh)
        x = to_global(pixels.astype(self.vae.dtype), self.mesh, latent_spec("row"))
        mean, logvar = self._compiled["encode"](self.vae_params, x)
        return to_host(mean).astype(np.float32), to_host(logvar).astype(np.float32)

    def _image_latents(self, pixels: np.ndarray, b: int, posterior: str, key) -> np.ndarray:
        """One image `[H, W, 3]` -> scaled latents `[B, h, w, C]` (one posterior draw, repeated
        over the batch as diffusers does)."""
        data = self.parallel.data  # the encode splits the batch over `data`
        mean, logvar = self.encode_image(np.broadcast_to(pixels, (data, *pixels.shape)))
        z = mean[:1]
        if posterior == "sample":
            eps = np.asarray(jax.random.normal(key, z.shape, jnp.float32))
            z = z + np.exp(0.5 * logvar[:1]) * eps
        cfg = self.vae.config
        z = (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        return np.repeat(z.astype(np.float32), b, axis=0)

    def _image_cond(self, image, mask_image, lat_shape, strength, posterior, key) -> dict:
        """Host arrays of the sampler's `ImageCond` (see `sampling/sample.py`)."""
        b, h, w, c = lat_shape
        f = self.vae_scale_factor
        pixels = image_to_array(image, h * f, w * f)
        image_key, masked_key = jax.random.split(key)
        latents = self._image_latents(pixels, b, posterior, image_key)
        if mask_image is None:
            return {"init": latents}
        mask = mask_to_array(mask_image, h * f, w * f)
        out = {} if strength == 1.0 else {"init": latents}  # diffusers: pure noise at 1.0
        lat_mask = np.repeat(latent_mask(mask, f)[None], b, axis=0)
        if self.unet.config.in_channels == c:
            return {**out, "known": latents, "mask": lat_mask}
        masked = self._image_latents(pixels * (mask < 0.5), b, posterior, masked_key)
        return {**out, "concat": np.concatenate([lat_mask, masked], axis=-1)}

    def decode(self, latents: jax.Array) -> list[Image.Image]:
        """Latents `[B, h, w, C]` -> PIL images, decoding on row bands across the mesh."""
        t0 = time.perf_counter()
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        if "decode" not in self._compiled:
            self._compiled["decode"] = make_decode(self.vae, self.parallel, self.mesh)
        if self.parallel.naive:  # latents are whole on every device
            z = to_global(to_host(z), self.mesh, latent_spec("row"))
        image = to_host(self._compiled["decode"](self.vae_params, z.astype(self.vae.dtype)))
        self.timings.decode = time.perf_counter() - t0
        pixels = np.clip(np.round((image.astype(np.float32) / 2 + 0.5) * 255), 0, 255)
        return [Image.fromarray(p.astype(np.uint8)) for p in pixels]
