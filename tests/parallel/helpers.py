"""Shared helpers of the parallel tests: errors, single-device references, states, trajectories."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.state import state_shapes
from distrifusion_jax.parallel.step import local_eps, make_step
from distrifusion_jax.sampling import scheduler_from_config
from distrifusion_jax.sampling.sample import make_sampler
from distrifusion_jax.sampling.schedulers import SDXL_SCHEDULER_CONFIG

SDXL_SCHEDULER = SDXL_SCHEDULER_CONFIG


def rel_err(a, b) -> float:
    """Relative L2 error of a against b, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def single_device_eps(model, params, x, cond, t, g):
    """Guided eps of the plain model on the whole latent (the reference)."""
    return local_eps(model, params, {}, x, jnp.float32(t), cond, g, ParallelConfig(), False)[0]


def sync_state(model, pc, mesh, params, x, t, cond, g, abstract: bool = False):
    """The state a synchronous step leaves (input of a displaced step); shapes only with
    `abstract=True` (traced by `jax.eval_shape`, nothing runs)."""
    step = make_step(model, pc, mesh, displaced=False)
    args = (params, {}, x, jnp.float32(t), cond, g)
    return state_shapes(step, *args) if abstract else step(*args)[1]


def run_trajectory(model, params, x, cond, pc, steps=8, name="ddim", guidance=1.5):
    """Final latents of the jitted sampler (SDXL's schedule, `name` scheduler, key 1)."""
    sched = scheduler_from_config(SDXL_SCHEDULER, name)
    sample = make_sampler(model, sched, steps, pc, make_mesh(pc))
    return np.asarray(sample(params, x, cond, guidance, jax.random.PRNGKey(1)))
