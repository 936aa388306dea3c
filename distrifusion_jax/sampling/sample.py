"""The jit-compiled sampling loop: one `shard_map` around the whole denoising trajectory.

Each device carries `(latent band, scheduler state, stale state)` through two `lax.scan`s:
steps 0..w are synchronous (they fill the stale state), steps w+1..T-1 are displaced. The
latent stays sharded by rows for the whole loop; the caller's output array is the gathered
image latent. The loop does not care which scheduler drives it (see `sampling/schedule.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distrifusion_jax.parallel.config import ParallelConfig
from distrifusion_jax.parallel.step import cond_spec, latent_spec, local_eps

Cond = dict[str, jax.Array]


def _noise_slice(key: jax.Array, i: jax.Array, local_shape, axes: dict[str, int]) -> jax.Array:
    """This device's slice of the step-i noise of the whole latent (same on any mesh).

    `axes` maps a mesh axis name to the latent dimension it shards.
    """
    full = list(local_shape)
    starts = [0] * len(local_shape)
    for name, dim in axes.items():
        size = jax.lax.axis_size(name)
        full[dim] *= size
        starts[dim] = jax.lax.axis_index(name) * local_shape[dim]
    noise = jax.random.normal(jax.random.fold_in(key, i), tuple(full), jnp.float32)
    return jax.lax.dynamic_slice(noise, starts, local_shape)


def make_sampler(
    model: nn.Module,
    scheduler: Any,
    num_inference_steps: int,
    parallel: ParallelConfig,
    mesh: Mesh,
) -> Callable[..., jax.Array]:
    """Build `sample(params, noise, cond, guidance_scale, key) -> latents`, a pure jit-able function.

    Args:
      model: the UNet module (patch context is set per phase).
      scheduler: a scheduler from `distrifusion_jax.sampling` (`set_timesteps`, `step`, ...).
      num_inference_steps: T.
      parallel: mesh layout, mode and warm-up.
      mesh: from `parallel.mesh.make_mesh(parallel)`.

    The returned function takes `noise [B, H, W, C]` (unit Gaussian, fp32), `cond` (leading
    `[G, B]`, G = 2 with guidance), a traced `guidance_scale`, and a PRNG `key` for ancestral
    noise; it returns the final latents `[B, H, W, C]` (fp32).
    """
    schedule = scheduler.set_timesteps(num_inference_steps)
    steps = num_inference_steps
    warm = min(parallel.warmup_steps, steps - 1)  # steps 0..warm are synchronous
    naive = parallel.mode == "naive_patch"
    n = parallel.patches

    def predict(params, stale, x, i, cond, g, displaced):
        t = schedule.timesteps[i]
        if not naive:
            return local_eps(model, params, stale, x, t, cond, g, parallel, displaced)
        # Naive patch: the latent is whole on every device; run the plain model on one band
        # (rows, or columns; `alternate` switches every step) and gather the bands.
        j = jax.lax.axis_index("patch")

        def on(axis):
            size = x.shape[axis] // n
            band = jax.lax.dynamic_slice_in_dim(x, j * size, size, axis)
            eps, _ = local_eps(model, params, {}, band, t, cond, g, parallel, False)
            return jax.lax.all_gather(eps, "patch", axis=axis, tiled=True)

        if parallel.naive_split == "alternate":
            return jax.lax.cond(i % 2 == 0, lambda: on(1), lambda: on(2)), stale
        return on(1 if parallel.naive_split == "row" else 2), stale

    def body(params, x, cond, g, key):
        sched_state = scheduler.init_state(schedule, x.shape)
        x = x.astype(jnp.float32) * scheduler.init_noise_sigma(schedule)
        noise_axes = {"data": 0} if naive else {"data": 0, "patch": 1}

        def phase(displaced):
            def one(carry, i):
                x, ss, stale = carry
                xin = scheduler.scale_model_input(schedule, ss, x)
                eps, stale = predict(params, stale, xin, i, cond, g, displaced)
                noise = _noise_slice(key, i, x.shape, noise_axes) if scheduler.needs_noise else None
                x, ss = scheduler.step(schedule, ss, eps, x, noise)
                return (x, ss, stale), None

            return one

        carry, _ = phase(False)((x, sched_state, {}), jnp.int32(0))  # creates the stale state
        if warm >= 1:
            carry, _ = jax.lax.scan(phase(False), carry, jnp.arange(1, warm + 1))
        if steps > warm + 1:
            carry, _ = jax.lax.scan(phase(True), carry, jnp.arange(warm + 1, steps))
        return carry[0]

    spec_x = P("data") if naive else latent_spec("row")
    sharded = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), spec_x, cond_spec(parallel), P(), P()),
        out_specs=spec_x,
        check_vma=False,
    )
    num_down = getattr(getattr(model, "config", None), "num_downsamplers", None)

    @jax.jit
    def sample(params, noise, cond, guidance_scale=5.0, key=None):
        if num_down is not None:
            parallel.check_shapes(noise.shape[1:3], num_down, batch=noise.shape[0])
        if parallel.cfg_split and cond["encoder_hidden_states"].shape[0] != 2:
            raise ValueError(
                "cfg_split needs classifier-free guidance: pass (unconditional, conditional) "
                "conditioning with a leading axis of 2, or disable cfg_split."
            )
        key = jax.random.PRNGKey(0) if key is None else key
        return sharded(params, noise, cond, jnp.asarray(guidance_scale, jnp.float32), key)

    return sample
