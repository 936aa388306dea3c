"""Euler (Karras et al. 2022, Alg. 2, no churn), equal to diffusers' `EulerDiscreteScheduler`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from distrifusion_jax.sampling import schedule as sch
from distrifusion_jax.sampling.schedule import SchedulerConfig, SigmaSchedule, StepState, sqrt


def sigma_schedule(
    cfg: SchedulerConfig,
    num_inference_steps: int,
    *,
    use_karras_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigma_min: bool = False,
) -> SigmaSchedule:
    """Timesteps and sigmas of the Euler family (diffusers' `set_timesteps`, numpy on the host)."""
    cfg.check_steps(num_inference_steps)
    ac = cfg.alphas_cumprod()
    if cfg.rescale_betas_zero_snr:
        ac[-1] = 2**-24  # diffusers: keep sigma finite at the last training step
    ts = sch.spaced_timesteps(
        cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps, cfg.steps_offset
    ).astype(np.float32)
    train = sch.train_sigmas(ac)
    sigmas = sch.interp_sigmas(ts, train)  # [T] float64
    if use_karras_sigmas:
        lo = sigma_min if sigma_min is not None else sigmas[-1].item()
        hi = sigma_max if sigma_max is not None else sigmas[0].item()
        sigmas = sch.karras_sigmas(lo, hi, num_inference_steps)
        ts = sch.sigma_to_t(sigmas, np.log(train))
    last = train[0] if final_sigma_min else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return SigmaSchedule(timesteps=jnp.asarray(ts, jnp.float32), sigmas=jnp.asarray(sigmas))


def noise_sigma(spacing: str, schedule: SigmaSchedule) -> jnp.ndarray:
    """Scale of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) for `leading` spacing."""
    s = jnp.max(schedule.sigmas)
    return s if spacing in ("linspace", "trailing") else sqrt(s * s + 1)


def scale_by_sigma(schedule: SigmaSchedule, state: StepState, sample):
    """x / sqrt(sigma^2 + 1): the UNet input of a sigma-parameterised (VE) sample."""
    sigma = schedule.sigmas[state.step]
    return (sample / sqrt(sigma * sigma + 1)).astype(sample.dtype)


def add_sigma_noise(schedule: SigmaSchedule, original, noise, i):
    """x0 + sigma_i * noise: `original` noised to step i (diffusers' Euler `add_noise`)."""
    sigma = schedule.sigmas[i]
    return (original.astype(jnp.float32) + noise.astype(jnp.float32) * sigma).astype(original.dtype)


def predict_x0(prediction_type: str, model_output, sample, sigma):
    """x0 from the model output (sigma_hat = sigma: no churn)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    # v_prediction
    return model_output * (-sigma / sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(SchedulerConfig):
    """Deterministic Euler; `s_churn` (a diffusers step argument, 0 in pipelines) is not offered."""

    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "timestep_type": ("discrete",),
    }
    DIFFUSERS_CLASS = "EulerDiscreteScheduler"

    def __post_init__(self):
        super().__post_init__()
        if self.interpolation_type != "linear":
            raise ValueError(
                f"EulerDiscreteScheduler: interpolation_type={self.interpolation_type!r} "
                "unsupported; use 'linear'"
            )
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(
                f"EulerDiscreteScheduler: final_sigmas_type={self.final_sigmas_type!r} "
                "unsupported; use 'zero' or 'sigma_min'"
            )

    def set_timesteps(self, num_inference_steps: int) -> SigmaSchedule:
        return sigma_schedule(
            self,
            num_inference_steps,
            use_karras_sigmas=bool(self.use_karras_sigmas),
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            final_sigma_min=self.final_sigmas_type == "sigma_min",
        )

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
        del noise
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        sigma = schedule.sigmas[state.step]
        x0 = predict_x0(self.prediction_type, m, x, sigma)
        derivative = (x - x0) / sigma
        dt = schedule.sigmas[state.step + 1] - sigma
        prev = x + derivative * dt
        return prev.astype(sample.dtype), StepState(step=state.step + 1)
