"""Euler ancestral, equal to diffusers' `EulerAncestralDiscreteScheduler` given the same noise."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from distrifusion_jax.sampling.euler import (
    add_sigma_noise,
    noise_sigma,
    predict_x0,
    scale_by_sigma,
    sigma_schedule,
)
from distrifusion_jax.sampling.schedule import SchedulerConfig, SigmaSchedule, StepState, sqrt


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(SchedulerConfig):
    """Euler step down to sigma_down, then fresh noise of scale sigma_up (`noise` is an input)."""

    DIFFUSERS_CLASS = "EulerAncestralDiscreteScheduler"

    @property
    def needs_noise(self) -> bool:
        return True

    def set_timesteps(self, num_inference_steps: int) -> SigmaSchedule:
        return sigma_schedule(self, num_inference_steps)

    def init_state(
        self, schedule: SigmaSchedule, sample_shape, dtype=jnp.float32, first_step=0
    ) -> StepState:
        del schedule, sample_shape, dtype
        return StepState(step=jnp.asarray(first_step, jnp.int32))

    def add_noise(self, schedule: SigmaSchedule, original, noise, i):
        return add_sigma_noise(schedule, original, noise, i)

    def init_noise_sigma(self, schedule: SigmaSchedule) -> jnp.ndarray:
        return noise_sigma(self.timestep_spacing, schedule)

    def scale_model_input(self, schedule: SigmaSchedule, state: StepState, sample):
        return scale_by_sigma(schedule, state, sample)

    def step(self, schedule: SigmaSchedule, state: StepState, model_output, sample, noise=None):
        """One ancestral step; `noise` ~ N(0, 1) shaped like `sample` (the caller draws it)."""
        if noise is None:
            raise ValueError("EulerAncestralDiscreteScheduler.step needs `noise` like the sample")
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        sigma_from = schedule.sigmas[state.step]
        sigma_to = schedule.sigmas[state.step + 1]
        x0 = predict_x0(self.prediction_type, m, x, sigma_from)
        sf2, st2 = sigma_from * sigma_from, sigma_to * sigma_to
        sigma_up = sqrt(st2 * (sf2 - st2) / sf2)
        sigma_down = sqrt(st2 - sigma_up * sigma_up)
        derivative = (x - x0) / sigma_from
        prev = x + derivative * (sigma_down - sigma_from)
        prev = prev + noise.astype(jnp.float32) * sigma_up
        return prev.astype(sample.dtype), StepState(step=state.step + 1)
