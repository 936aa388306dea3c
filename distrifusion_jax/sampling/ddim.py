"""DDIM (Song et al. 2020), numerically equal to diffusers' `DDIMScheduler`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.sampling.schedule import SchedulerConfig, StepState, sqrt


@flax.struct.dataclass
class DDIMSchedule:
    timesteps: jnp.ndarray  # [T] float32 (integer values)
    alphas_cumprod: jnp.ndarray  # [T] float32, abar at timesteps[i]
    alphas_cumprod_prev: jnp.ndarray  # [T] float32, abar at t - n_train // n (final abar if < 0)


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(SchedulerConfig):
    """Deterministic DDIM for `eta=0` (the pipelines' default); `eta > 0` reads `noise`.

    `eta` is a step argument in diffusers, not a config key; here it is a field (default 0).
    SDXL pipelines use it with `set_alpha_to_one=False, clip_sample=False`.
    """

    timestep_spacing: str = "leading"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    eta: float = 0.0

    # Thresholding takes a quantile over the whole image: not computable on a row band.
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"thresholding": (False,)}
    DIFFUSERS_CLASS = "DDIMScheduler"

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0

    def set_timesteps(self, num_inference_steps: int) -> DDIMSchedule:
        self.check_steps(num_inference_steps)
        n_train = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, n_train - 1, num_inference_steps).round()[::-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, num_inference_steps) * (n_train // num_inference_steps)).round()
            ts = ts[::-1] + self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(n_train, 0, -n_train / num_inference_steps)) - 1
        ts = ts.astype(np.int64)
        # diffusers steps back by n_train // n whatever the spacing.
        prev = ts - n_train // num_inference_steps
        ac = self.alphas_cumprod()
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        ac_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
        return DDIMSchedule(
            timesteps=jnp.asarray(ts, jnp.float32),
            alphas_cumprod=jnp.asarray(ac[ts]),
            alphas_cumprod_prev=jnp.asarray(ac_prev),
        )

    def init_state(
        self, schedule: DDIMSchedule, sample_shape, dtype=jnp.float32, first_step=0
    ) -> StepState:
        del schedule, sample_shape, dtype
        return StepState(step=jnp.asarray(first_step, jnp.int32))

    def add_noise(self, schedule: DDIMSchedule, original, noise, i):
        """sqrt(abar) x0 + sqrt(1 - abar) noise at timesteps[i] (diffusers' `add_noise`)."""
        a = schedule.alphas_cumprod[i]
        x = sqrt(a) * original.astype(jnp.float32) + sqrt(1 - a) * noise.astype(jnp.float32)
        return x.astype(original.dtype)

    def init_noise_sigma(self, schedule: DDIMSchedule) -> jnp.ndarray:
        del schedule
        return jnp.float32(1.0)

    def scale_model_input(self, schedule, state, sample):
        del schedule, state
        return sample

    def step(self, schedule: DDIMSchedule, state: StepState, model_output, sample, noise=None):
        if self.needs_noise and noise is None:
            raise ValueError(f"DDIMScheduler with eta={self.eta} needs `noise` like the sample")
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        a_t = schedule.alphas_cumprod[state.step]
        a_prev = schedule.alphas_cumprod_prev[state.step]
        beta_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = (x - sqrt(beta_t) * m) / sqrt(a_t)
            eps = m
        else:  # v_prediction
            x0 = sqrt(a_t) * x - sqrt(beta_t) * m
            eps = sqrt(a_t) * m + sqrt(beta_t) * x
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        variance = (1 - a_prev) / beta_t * (1 - a_t / a_prev)
        std = jnp.float32(self.eta) * sqrt(variance)
        prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std * std) * eps
        if self.needs_noise:
            prev = prev + std * noise.astype(jnp.float32)
        return prev.astype(sample.dtype), StepState(step=state.step + 1)
