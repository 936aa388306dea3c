"""Samplers: pure-JAX schedulers equal to diffusers' (DDIM, Euler, Euler a, DPM-Solver++ 2M)."""

from distrifusion_jax.sampling.ddim import DDIMSchedule, DDIMScheduler
from distrifusion_jax.sampling.dpm_solver import DPMSolverMultistepScheduler, DPMSolverState
from distrifusion_jax.sampling.euler import EulerDiscreteScheduler
from distrifusion_jax.sampling.euler_ancestral import EulerAncestralDiscreteScheduler
from distrifusion_jax.sampling.schedule import SigmaSchedule, StepState
from distrifusion_jax.sampling.schedulers import SCHEDULERS, scheduler_from_config

__all__ = [
    "SCHEDULERS",
    "DDIMSchedule",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverState",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "SigmaSchedule",
    "StepState",
    "scheduler_from_config",
]
