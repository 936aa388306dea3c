"""Run one sampling trajectory with diffusers' torch scheduler and with ours, on an analytic eps.

The "model" is a fixed function of (scaled sample, t), evaluated in numpy float32 for both sides,
so the only difference between the two trajectories is the schedulers' own arithmetic. Noise for
ancestral / SDE / eta>0 steps is drawn once from numpy and fed to both.
"""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.sampling import scheduler_from_config
from distrifusion_jax.sampling.schedulers import SDXL_SCHEDULER_CONFIG

SDXL_CONFIG = SDXL_SCHEDULER_CONFIG  # stabilityai/stable-diffusion-xl-base-1.0
SHAPE = (2, 4, 8, 6)  # elementwise schedulers: the layout does not matter

# Our short name -> diffusers class name.
DIFFUSERS_CLASS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
}
_FORCED = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
}


def model_fn(x, t):
    """eps(x, t) = 0.3 x + 0.1 sin(t/100 + x), float32 (numpy or jnp)."""
    mod = jnp if isinstance(x, jax.Array) else np
    return (0.3 * x + 0.1 * mod.sin(t / 100 + x)).astype(np.float32)


def config(name: str, **overrides) -> dict:
    return {**SDXL_CONFIG, **_FORCED.get(name, {}), **overrides}


def draw(num_steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((num_steps + 1, *SHAPE)).astype(np.float32)
    return x, noises


@contextlib.contextmanager
def _quiet_diffusers():
    log = logging.getLogger("diffusers")
    level = log.level
    log.setLevel(logging.ERROR)  # from_config warns about the Euler-only keys
    try:
        yield
    finally:
        log.setLevel(level)


def run_diffusers(name: str, cfg: dict, num_steps: int, eta: float = 0.0, seed: int = 0):
    """diffusers' trajectory: (timesteps, init_noise_sigma, final sample, table dict)."""
    import diffusers
    import torch
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea

    x_np, noises = draw(num_steps, seed)
    with _quiet_diffusers():
        sched = getattr(diffusers, DIFFUSERS_CLASS[name]).from_config(cfg)
    sched.set_timesteps(num_steps)
    timesteps = sched.timesteps
    init_sigma = float(sched.init_noise_sigma)
    x = torch.from_numpy(x_np) * sched.init_noise_sigma
    patched = ea.randn_tensor
    it = iter(noises)
    ea.randn_tensor = lambda *a, **k: torch.from_numpy(next(it))  # Euler a's only noise
    try:
        for i, t in enumerate(timesteps):
            x_in = sched.scale_model_input(x, t)
            eps = torch.from_numpy(model_fn(x_in.numpy(), float(t)))
            kw = {}
            if name == "ddim":
                kw = {"eta": eta, "variance_noise": torch.from_numpy(noises[i]) if eta else None}
            elif name.startswith("dpmpp") and sched.config.algorithm_type.startswith("sde"):
                kw = {"variance_noise": torch.from_numpy(noises[i])}
            x = sched.step(eps, t, x, **kw).prev_sample
    finally:
        ea.randn_tensor = patched
    tables = {"sigmas": getattr(sched, "sigmas", None)}
    return timesteps.double().numpy(), init_sigma, x.numpy(), tables


def make_ours(name: str, cfg: dict, eta: float = 0.0, by_class: bool = False):
    """Ours by short name, or (by_class) by the config's diffusers `_class_name`."""
    sched = scheduler_from_config(cfg, None if by_class else name)
    return sched.replace(eta=eta) if eta else sched


def run_ours(
    name: str, cfg: dict, num_steps: int, eta: float = 0.0, seed: int = 0, by_class: bool = False
):
    """Our trajectory with a Python loop over jitted steps: same outputs as run_diffusers."""
    sched = make_ours(name, cfg, eta, by_class)
    schedule = sched.set_timesteps(num_steps)
    x_np, noises = draw(num_steps, seed)
    x = jnp.asarray(x_np) * sched.init_noise_sigma(schedule)
    state = sched.init_state(schedule, x.shape)
    scale, step = jax.jit(sched.scale_model_input), jax.jit(sched.step)
    for i in range(schedule.timesteps.shape[0]):
        t = float(schedule.timesteps[i])
        eps = model_fn(np.asarray(scale(schedule, state, x)), t)
        noise = jnp.asarray(noises[i]) if sched.needs_noise else None
        x, state = step(schedule, state, jnp.asarray(eps), x, noise)
    tables = {"sigmas": getattr(schedule, "sigmas", None)}
    init_sigma = float(sched.init_noise_sigma(schedule))
    return np.asarray(schedule.timesteps, np.float64), init_sigma, np.asarray(x), tables


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (max-norm relative error of the whole sample)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def compare(
    name: str,
    cfg: dict,
    num_steps: int,
    eta: float = 0.0,
    rtol: float = 1e-5,
    by_class: bool = False,
) -> float:
    """Assert equal timesteps, sigmas, init sigma and final sample (max-norm rel err <= rtol)."""
    ts_ref, s0_ref, x_ref, tab_ref = run_diffusers(name, cfg, num_steps, eta)
    ts, s0, x, tab = run_ours(name, cfg, num_steps, eta, by_class=by_class)
    # torch's float32 sqrt is one ulp low on ~0.7% of inputs (np.sqrt rounds correctly), so the
    # training sigmas may differ in the last bit: sigma tables and the fractional timesteps that
    # Karras sigmas map back to (sigma_to_t) are compared to 2 ulp / 1e-6; all others exactly.
    if not cfg.get("use_karras_sigmas"):
        np.testing.assert_array_equal(ts, ts_ref)
    else:
        np.testing.assert_allclose(ts, ts_ref, rtol=1e-6)
    if tab_ref["sigmas"] is not None and tab["sigmas"] is not None:
        sigmas, sigmas_ref = np.asarray(tab["sigmas"]), tab_ref["sigmas"].numpy()
        # Zero-terminal-SNR rescaling subtracts the last sqrt(abar) and rescales, which turns
        # those last-bit differences into ~2e-6 relative near the end of the schedule (seen
        # on an AMD EPYC host; torch's vectorized sqrt differs between CPUs).
        sig_rtol = 4e-6 if cfg.get("rescale_betas_zero_snr") else 2.5e-7
        np.testing.assert_allclose(sigmas, sigmas_ref, rtol=sig_rtol)
    np.testing.assert_allclose(s0, s0_ref, rtol=1e-7)
    assert np.all(np.isfinite(x_ref)), "reference diverged: pick another config"
    err = rel_err(x, x_ref)
    assert err <= rtol, f"{name} {num_steps} steps: rel err {err:.3g} > {rtol}"
    return err
