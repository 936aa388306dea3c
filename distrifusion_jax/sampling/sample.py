"""Sampling drivers over one per-device denoising step.

Each device carries `(latent band, scheduler state, stale state)`: steps 0..w are synchronous
(they fill the stale state), steps w+1..T-1 are displaced. The latent stays sharded by rows
for the whole trajectory and is gathered once at the end. Two drivers share the step:
- `make_sampler`: the whole loop in one jit (`lax.scan`s inside one `shard_map`); a pure
  function of (params, noise, cond, guidance_scale, key) for research code.
- `make_stepper`: `init`/`step`/`finish` jitted separately, for a Python loop with a progress
  bar; the carry lives between calls as global arrays with a leading device axis.
The loop does not care which scheduler drives it (interface: `sampling/schedule.py`).

Image-to-image and inpainting start at step `first_step` (the steps before it are skipped; the
warm-up counts from there) and take an `image` dict of latent-sized arrays, split by rows like
the latent (`ImageCond`). An ensemble of expert denoisers (base -> refiner, diffusers'
`denoising_end`/`denoising_start`) stops the base at `last_step` and starts the refiner at that
step with `resume=True`: its `noise` argument is then the base's latents, used as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distrifusion_jax.parallel.config import ParallelConfig
from distrifusion_jax.parallel.mesh import exchange_compiler_options, shard
from distrifusion_jax.parallel.step import STATE_SPEC, cond_spec, latent_spec, local_eps

Cond = dict[str, jax.Array]
Carry = tuple[jax.Array, Any, dict]  # (latent band, scheduler state, model state)
# Image conditioning, every entry `[B, h, w, K]` (a band of rows on a device), all optional:
#   "init"    scaled image latents: the trajectory starts at add_noise(init, noise, first_step)
#             instead of noise * init_noise_sigma (img2img; inpainting with strength < 1)
#   "known" + "mask"  after every step the known region (mask 0) is replaced by `known` noised
#             to the next step with the initial noise (inpainting with a 4-channel UNet)
#   "concat"  appended to the UNet input channels every step (9-channel inpainting UNet:
#             mask [1] and masked-image latents [4])
#   "control" ControlNet conditioning images of a `ControlledUNet`, a tuple of
#             `[B, h*f, w*f, C_k]` (f: the VAE factor), with `cond["control_scales"]`
#             `[G, B, T, K]` (each ControlNet's scale for each step; see `pipeline_control`)
ImageCond = dict[str, Any]


def _noise_slice(key: jax.Array, i: jax.Array, local_shape, axes: dict[str, int]) -> jax.Array:
    """This device's slice of the step-i noise of the whole latent (same on any mesh).

    `axes` maps a mesh axis name to the latent dimension it shards.
    """
    full = list(local_shape)
    starts = [0] * len(local_shape)
    for name, dim in axes.items():
        full[dim] *= jax.lax.axis_size(name)
        starts[dim] = jax.lax.axis_index(name) * local_shape[dim]
    noise = jax.random.normal(jax.random.fold_in(key, i), tuple(full), jnp.float32)
    return jax.lax.dynamic_slice(noise, starts, local_shape)


@dataclasses.dataclass(frozen=True)
class LocalLoop:
    """The per-device pieces of a trajectory (run inside shard_map)."""

    model: nn.Module
    scheduler: Any
    schedule: Any
    parallel: ParallelConfig
    resume: bool = False  # `init` takes the latents at `first_step` (a hand-off), not noise

    @property
    def latent_spec(self) -> P:
        # Naive patch keeps the whole latent on every device and splits per step.
        return P("data") if self.parallel.naive else latent_spec("row")

    def init(self, x: jax.Array, image: ImageCond, first_step: int = 0) -> Carry:
        """Unit noise band `[B_l, h, W, C]` (with `resume`: the latents at step `first_step`)
        -> the carry before step `first_step`."""
        ss = self.scheduler.init_state(self.schedule, x.shape, first_step=first_step)
        x = x.astype(jnp.float32)
        if self.resume:  # denoising_start: continue another sampler's trajectory as it is
            pass
        elif "init" in image:
            x = self.scheduler.add_noise(
                self.schedule, image["init"].astype(x.dtype), x, first_step
            )
        else:
            x = x * self.scheduler.init_noise_sigma(self.schedule)
        return x, ss, {}

    def step(
        self, params, carry: Carry, i, cond: Cond, g, key, displaced: bool, image=None, noise0=None
    ) -> Carry:
        """Denoising step i (synchronous or displaced) on this device's band.

        `image` (`ImageCond`) and `noise0` (the unit noise the trajectory started from, needed
        with "known") are only for img2img / inpainting.
        """
        x, ss, state = carry
        image = image or {}
        xin = self.scheduler.scale_model_input(self.schedule, ss, x)
        if "concat" in image:
            xin = jnp.concatenate([xin, image["concat"].astype(xin.dtype)], axis=-1)
        eps, state = self._predict(params, state, xin, i, cond, g, displaced, image.get("control"))
        noise = None
        if self.scheduler.needs_noise:
            axes = {"data": 0} if self.parallel.naive else {"data": 0, "patch": 1}
            noise = _noise_slice(key, i, x.shape, axes)
        x, ss = self.scheduler.step(self.schedule, ss, eps, x, noise)
        if "known" in image:  # diffusers' inpainting with a 4-channel UNet
            known = image["known"].astype(x.dtype)
            last = i + 1 >= self.schedule.timesteps.shape[0]
            renoised = self.scheduler.add_noise(self.schedule, known, noise0, i + 1)
            known = jnp.where(last, known, renoised)
            mask = image["mask"].astype(x.dtype)
            x = (1 - mask) * known + mask * x
        return x, ss, state

    def _predict(self, params, state, x, i, cond, g, displaced, control=None):
        t = self.schedule.timesteps[i]
        pc = self.parallel
        if control is not None:  # ControlNets: this step's scales [G, B, K] from [G, B, T, K]
            cond = {**cond, "control_scales": cond["control_scales"][:, :, i]}
        if not self.parallel.naive:
            return local_eps(self.model, params, state, x, t, cond, g, pc, displaced, control)
        # Naive patch: the plain model on one band (rows, or columns; `alternate` switches
        # every step), then the bands are gathered. No other exchange.
        j = jax.lax.axis_index("patch")

        def on(axis):
            size = x.shape[axis] // pc.patches
            band = jax.lax.dynamic_slice_in_dim(x, j * size, size, axis)
            ctl = None
            if control is not None:  # conditioning images: the same band, at their resolution
                rows = lambda a: a.shape[axis] // pc.patches
                ctl = tuple(jax.lax.dynamic_slice_in_dim(a, j * rows(a), rows(a), axis)
                            for a in control)  # fmt: skip
            eps, new = local_eps(self.model, params, state, band, t, cond, g, pc, False, ctl)
            return jax.lax.all_gather(eps, "patch", axis=axis, tiled=True), new

        if pc.naive_split == "alternate":
            return jax.lax.cond(i % 2 == 0, lambda: on(1), lambda: on(2))
        return on(1 if pc.naive_split == "row" else 2)


def _check_first(first_step: int, num_inference_steps: int) -> int:
    if not 0 <= first_step < num_inference_steps:
        raise ValueError(
            f"first_step {first_step} must be in [0, {num_inference_steps}) "
            f"(num_inference_steps {num_inference_steps})"
        )
    return first_step


def _check_last(first_step: int, last_step: int | None, num_inference_steps: int) -> int:
    """The step after the last one run (`last_step`, default T), checked against first_step."""
    end = num_inference_steps if last_step is None else last_step
    if not first_step < end <= num_inference_steps:
        raise ValueError(
            f"last_step {end} must be in ({first_step}, {num_inference_steps}] "
            f"(first_step {first_step}, num_inference_steps {num_inference_steps})"
        )
    return end


def start_step(num_inference_steps: int, strength: float) -> int:
    """The first step img2img runs (diffusers' `get_timesteps`: the last `int(T * strength)`
    steps are run). Raises ValueError when strength is outside (0, 1] or no step is left."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1]; got {strength}")
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run < 1:
        raise ValueError(
            f"strength {strength} with {num_inference_steps} steps runs no step; "
            f"raise strength or the number of steps"
        )
    return num_inference_steps - run


def _checks(loop: LocalLoop, noise_shape, cond: Cond) -> None:
    pc = loop.parallel
    num_down = getattr(getattr(loop.model, "config", None), "num_downsamplers", None)
    if num_down is not None:
        pc.check_shapes(noise_shape[1:3], num_down, batch=noise_shape[0])
    if pc.cfg_split and cond["encoder_hidden_states"].shape[0] != 2:
        raise ValueError(
            "cfg_split needs classifier-free guidance: pass (unconditional, conditional) "
            "conditioning with a leading axis of 2, or disable cfg_split."
        )


def make_sampler(
    model: nn.Module,
    scheduler: Any,
    num_inference_steps: int,
    parallel: ParallelConfig,
    mesh: Mesh,
    first_step: int = 0,
    last_step: int | None = None,
    resume: bool = False,
) -> Callable[..., jax.Array]:
    """Build `sample(params, noise, cond, guidance_scale, key, image=None) -> latents`, jit-ed.

    Args:
      model: the UNet module (its patch context is set per phase).
      scheduler: a scheduler from `distrifusion_jax.sampling`.
      num_inference_steps: T.
      parallel: mesh layout, mode and warm-up (steps 0..w synchronous).
      mesh: from `parallel.mesh.make_mesh(parallel)`.
      first_step: steps 0..first_step-1 are skipped (img2img: `start_step`); the warm-up
        steps are first_step..first_step+w, so the first step run is synchronous.
      last_step: steps last_step..T-1 are left out (default T); the latents returned are those
        before step last_step (a base expert: `denoising_end`).
      resume: `noise` is the latents before step `first_step` (a refiner continuing a base's
        trajectory: `denoising_start`), neither scaled nor noised.

    The returned function takes `noise [B, H, W, C]` (unit Gaussian), `cond` (leading `[G, B]`,
    G = 2 with guidance), a traced `guidance_scale` and a PRNG `key` (ancestral schedulers draw
    their step noise from it; required, so no two callers share a hidden default); it returns
    the final latents `[B, H, W, C]` (fp32). `image` (`ImageCond`, global arrays split like
    `noise`) conditions img2img and inpainting. One compile serves every prompt and seed.
    """
    schedule = scheduler.set_timesteps(num_inference_steps)
    loop = LocalLoop(model, scheduler, schedule, parallel, resume)
    first = _check_first(first_step, num_inference_steps)
    end = _check_last(first, last_step, num_inference_steps)
    warm = min(parallel.warmup_steps, end - first - 1)

    def body(params, x, cond, g, key, image):
        def phase(displaced):
            def f(c, i):
                return loop.step(params, c, i, cond, g, key, displaced, image, x), None

            return f

        start = loop.init(x, image, first)
        carry = loop.step(params, start, jnp.int32(first), cond, g, key, False, image, x)
        if warm >= 1:
            carry, _ = jax.lax.scan(phase(False), carry, jnp.arange(first + 1, first + warm + 1))
        if end > first + warm + 1:
            rest = jnp.arange(first + warm + 1, end)
            carry, _ = jax.lax.scan(phase(True), carry, rest)
        return carry[0]

    sharded = shard(
        body,
        mesh,
        in_specs=(P(), loop.latent_spec, cond_spec(parallel), P(), P(), loop.latent_spec),
        out_specs=loop.latent_spec,
    )

    @functools.partial(jax.jit, compiler_options=exchange_compiler_options(mesh))
    def sample(params, noise, cond, guidance_scale, key, image=None):
        _checks(loop, noise.shape, cond)
        g = jnp.asarray(guidance_scale, jnp.float32)
        return sharded(params, noise, cond, g, key, dict(image or {}))

    return sample


class StepTime(NamedTuple):
    """Wall time of one step call of `Stepper.run` (waited for)."""

    seconds: float
    compiled: bool  # the call traced and compiled its program (or read it from the cache)


def steady_step(times: list[StepTime]) -> float:
    """Median seconds of the steps that did not compile (NaN if every step compiled)."""
    steady = sorted(t.seconds for t in times if not t.compiled)
    return steady[len(steady) // 2] if steady else float("nan")


def compile_seconds(times: list[StepTime]) -> float:
    """Time the compiling steps took beyond a steady step (0 if nothing compiled)."""
    steady = steady_step(times)
    steady = 0.0 if math.isnan(steady) else steady
    return sum(t.seconds - steady for t in times if t.compiled)


def _cache_entries(fn: Callable) -> int | None:
    """Programs a jitted function holds (jax.jit's `_cache_size`, jax 0.10); None if unknown."""
    size = getattr(fn, "_cache_size", None)
    return size() if size is not None else None


@dataclasses.dataclass(frozen=True)
class Stepper:
    """The same trajectory as `make_sampler`, one jitted call per step (see `run`)."""

    first: Callable[..., Any]  # (params, noise, cond, g, key, image) -> carry after step 0
    sync: Callable[..., Any]  # (params, carry, i, cond, g, key, image, noise) -> carry
    displaced: Callable[..., Any]
    finish: Callable[..., jax.Array]  # carry -> latents [B, H, W, C]
    check: Callable[..., None]  # (noise shape, cond) -> None; raises ValueError
    num_steps: int  # the step after the last one run (T, or last_step)
    warmup_steps: int
    first_step: int = 0

    def run(
        self,
        params,
        noise: jax.Array,
        cond: Cond,
        guidance_scale: float,
        key: jax.Array,
        progress: Callable = iter,
        times: list[StepTime] | None = None,
        image: ImageCond | None = None,
    ) -> jax.Array:
        """Steps first_step..T-1 -> latents `[B, H, W, C]`. `progress` wraps the step range
        (e.g. `tqdm.tqdm`). With a `times` list, each step is waited for and a `StepTime`
        appended, saying whether that call compiled. `image`: see `ImageCond`."""
        self.check(noise.shape, cond)
        g = jnp.float32(guidance_scale)
        image = dict(image or {})
        seen: set[int] = set()
        carry = None
        first, last_sync = self.first_step, self.first_step + self.warmup_steps
        for i in progress(range(first, self.num_steps)):
            fn = self.first if i == first else self.sync if i <= last_sync else self.displaced
            before = _cache_entries(fn)
            t = time.perf_counter()
            if i == first:
                carry = fn(params, noise, cond, g, key, image)
            else:
                carry = fn(params, carry, jnp.int32(i), cond, g, key, image, noise)
            if times is not None:
                jax.block_until_ready(carry)
                after = _cache_entries(fn)
                compiled = id(fn) not in seen if before is None else after > before
                times.append(StepTime(time.perf_counter() - t, compiled))
            seen.add(id(fn))
        return self.finish(carry)


def make_stepper(
    model: nn.Module,
    scheduler: Any,
    num_inference_steps: int,
    parallel: ParallelConfig,
    mesh: Mesh,
    first_step: int = 0,
    last_step: int | None = None,
    resume: bool = False,
) -> Stepper:
    """A step-at-a-time driver (for progress bars); equal to `make_sampler`'s trajectory
    (`first_step`, `last_step`, `resume` as there).

    Between calls every carry leaf has a leading device axis `[data*cfg*patch, ...]`; `sync`
    and `displaced` donate the carry they are given (do not reuse it after the call).
    """
    schedule = scheduler.set_timesteps(num_inference_steps)
    loop = LocalLoop(model, scheduler, schedule, parallel, resume)
    first_step = _check_first(first_step, num_inference_steps)
    end = _check_last(first_step, last_step, num_inference_steps)
    add = lambda tree: jax.tree.map(lambda a: a[None], tree)
    drop = lambda tree: jax.tree.map(lambda a: a[0], tree)
    cspec = cond_spec(parallel)

    def jit(f, in_specs, out_specs, donate=()):
        return jax.jit(
            shard(f, mesh, in_specs, out_specs),
            donate_argnums=donate,
            compiler_options=exchange_compiler_options(mesh),
        )

    lspec = loop.latent_spec

    def first(params, x, cond, g, key, image):
        start = loop.init(x, image, first_step)
        return add(loop.step(params, start, jnp.int32(first_step), cond, g, key, False, image, x))

    def later(displaced):
        def f(params, carry, i, cond, g, key, image, x):
            return add(loop.step(params, drop(carry), i, cond, g, key, displaced, image, x))

        # The carry is donated: stale buffers are updated in place, not copied every step.
        specs = (P(), STATE_SPEC, P(), cspec, P(), P(), lspec, lspec)
        return jit(f, specs, STATE_SPEC, donate=(1,))

    sync = later(False)
    return Stepper(
        first=jit(first, (P(), lspec, cspec, P(), P(), lspec), STATE_SPEC),
        sync=sync,
        # One band, or the naive baseline: a displaced step is the synchronous one; one program
        # (one compile) serves both.
        displaced=sync if parallel.context(True) is None else later(True),
        finish=jit(lambda carry: drop(carry)[0], (STATE_SPEC,), loop.latent_spec),
        check=lambda shape, cond: _checks(loop, shape, cond),
        num_steps=end,
        warmup_steps=min(parallel.warmup_steps, end - first_step - 1),
        first_step=first_step,
    )
