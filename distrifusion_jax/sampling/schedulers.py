"""Scheduler registry: a diffusers `scheduler_config.json` dict (or a short name) -> scheduler."""

from __future__ import annotations

from distrifusion_jax.sampling.ddim import DDIMScheduler
from distrifusion_jax.sampling.dpm_solver import DPMSolverMultistepScheduler
from distrifusion_jax.sampling.euler import EulerDiscreteScheduler
from distrifusion_jax.sampling.euler_ancestral import EulerAncestralDiscreteScheduler

# stabilityai/stable-diffusion-xl-base-1.0 `scheduler/scheduler_config.json` (diffusers keys).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# Short name -> (class, config values it forces). Iterating SCHEDULERS gives the names.
_NAMED = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
}
SCHEDULERS = {name: cls for name, (cls, _) in _NAMED.items()}
_BY_CLASS = {cls.DIFFUSERS_CLASS: cls for cls in SCHEDULERS.values()}


def scheduler_from_config(d: dict, name: str | None = None):
    """Build a scheduler from a diffusers scheduler config.

    Args:
      d: the `scheduler/scheduler_config.json` dict. Its `_class_name` picks the algorithm
        unless `name` is given; its other keys configure it (unknown keys are ignored, as in
        diffusers' `from_config`, so the SDXL Euler config also builds DDIM or DPM-Solver++).
      name: optional override, a short name (`ddim`, `euler`, `euler_a`, `dpmpp_2m`,
        `dpmpp_2m_sde`) or a diffusers class name.
    Returns:
      A frozen scheduler dataclass (see `schedule.py` for the interface).
    Raises:
      ValueError: unknown scheduler, or a config value this port does not reproduce.
    """
    key = name if name is not None else d.get("_class_name")
    if key in _NAMED:
        cls, forced = _NAMED[key]
        return cls.from_config({**d, **forced})
    if key in _BY_CLASS:
        return _BY_CLASS[key].from_config(d)
    raise ValueError(
        f"Unknown scheduler {key!r}; supported: {', '.join(SCHEDULERS)} "
        f"or diffusers classes {', '.join(_BY_CLASS)}"
    )
