"""DPM-Solver++ multistep (Lu et al. 2022), equal to diffusers' `DPMSolverMultistepScheduler`.

Orders 1 and 2 (the "2M" sampler), `dpmsolver++` and `sde-dpmsolver++` (noise is an input),
midpoint or heun second-order rule, Karras sigmas, diffusers' `lower_order_final` rule.
The multistep buffer (last step's x0 prediction) lives in the state, shaped like the sample.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.sampling import schedule as sch
from distrifusion_jax.sampling.schedule import SchedulerConfig, SigmaSchedule, sqrt


@flax.struct.dataclass
class DPMSolverState:
    step: jnp.ndarray  # [] int32
    prev_model_output: jnp.ndarray  # like the sample, fp32: x0 prediction of the previous step
    first_step: jnp.ndarray  # [] int32: the first step run (first order there; img2img > 0)


def _alpha_sigma(sigma):
    """VP (alpha_t, sigma_t) of a VE sigma, as diffusers' `_sigma_to_alpha_sigma_t`."""
    alpha = 1 / sqrt(sigma * sigma + 1)
    return alpha, sigma * alpha


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(SchedulerConfig):
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        # Thresholding needs a whole-image quantile, not computable on a row band.
        "thresholding": (False,),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "use_lu_lambdas": (False, None),
        "use_flow_sigmas": (False, None),
        "use_dynamic_shifting": (False, None),
        "variance_type": (None,),
    }
    DIFFUSERS_CLASS = "DPMSolverMultistepScheduler"

    def __post_init__(self):
        # diffusers maps configs of sibling schedulers (DEIS, UniPC) onto these two.
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        super().__post_init__()
        for key, allowed in (
            ("solver_order", (1, 2)),
            ("algorithm_type", ("dpmsolver++", "sde-dpmsolver++")),
            ("solver_type", ("midpoint", "heun")),
            ("final_sigmas_type", ("zero", "sigma_min")),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"DPMSolverMultistepScheduler: {key}={getattr(self, key)!r} unsupported; "
                    f"use one of {allowed}"
                )

    @property
    def needs_noise(self) -> bool:
        return self.algorithm_type == "sde-dpmsolver++"

    def set_timesteps(self, num_inference_steps: int) -> SigmaSchedule:
        self.check_steps(num_inference_steps)
        n, n_train = num_inference_steps, self.num_train_timesteps
        ac = self.alphas_cumprod()
        if self.rescale_betas_zero_snr:
            ac[-1] = 2**-24
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
        last_t = n_train - int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (last_t // (n + 1))).round()[::-1][:-1] + self.steps_offset
        else:  # trailing
            ts = np.arange(last_t, 0, -n_train / n).round() - 1
        ts = ts.astype(np.int64)
        train = sch.train_sigmas(ac)
        if self.use_karras_sigmas:
            sigmas = sch.karras_sigmas(train[0].item(), train[-1].item(), n)
            ts = sch.sigma_to_t(sigmas, np.log(train))
            if self.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
            ts = ts.astype(np.int64)
        else:
            sigmas = sch.interp_sigmas(ts, train)
        last = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return SigmaSchedule(timesteps=jnp.asarray(ts, jnp.float32), sigmas=jnp.asarray(sigmas))

    def init_state(self, schedule: SigmaSchedule, sample_shape, dtype=jnp.float32, first_step=0):
        del schedule
        first = jnp.asarray(first_step, jnp.int32)
        return DPMSolverState(
            step=first, prev_model_output=jnp.zeros(sample_shape, dtype), first_step=first
        )

    def add_noise(self, schedule: SigmaSchedule, original, noise, i):
        """alpha_i x0 + sigma_i noise (diffusers' `add_noise`, VP form of sigmas[i])."""
        alpha, sigma = _alpha_sigma(schedule.sigmas[i])
        x = alpha * original.astype(jnp.float32) + sigma * noise.astype(jnp.float32)
        return x.astype(original.dtype)

    def init_noise_sigma(self, schedule: SigmaSchedule) -> jnp.ndarray:
        del schedule
        return jnp.float32(1.0)

    def scale_model_input(self, schedule, state, sample):
        del schedule, state
        return sample

    def step(
        self, schedule: SigmaSchedule, state: DPMSolverState, model_output, sample, noise=None
    ):
        if self.needs_noise and noise is None:
            raise ValueError(f"{self.algorithm_type} needs `noise` shaped like the sample")
        i = state.step
        num_steps = schedule.timesteps.shape[0]
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)

        alpha_s0, sigma_s0 = _alpha_sigma(schedule.sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(schedule.sigmas[i + 1])
        alpha_s1, sigma_s1 = _alpha_sigma(schedule.sigmas[jnp.maximum(i - 1, 0)])
        if self.prediction_type == "epsilon":
            x0 = (x - sigma_s0 * m) / alpha_s0
        else:  # v_prediction
            x0 = alpha_s0 * x - sigma_s0 * m

        lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
        lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
        lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
        h = lambda_t - lambda_s0

        # diffusers' rule: first order at the first step run and, with `lower_order_final`, at the last step.
        lower_final = (
            self.euler_at_final
            or (self.lower_order_final and num_steps < 15)
            or self.final_sigmas_type == "zero"
        )
        use_first = (
            (i == state.first_step)
            | (lower_final & (i == num_steps - 1))
            | (self.solver_order == 1)
        )
        # Where the first order is used r0 is 0 or nan (no previous step; h = inf at sigma 0);
        # 1 keeps the unused branch finite. Operation order follows diffusers for equal rounding.
        r0 = jnp.where(use_first, 1.0, (lambda_s0 - lambda_s1) / h)
        d0 = x0
        d1 = 1.0 / r0 * (x0 - state.prev_model_output)
        if self.algorithm_type == "dpmsolver++":
            first = sigma_t / sigma_s0 * x - alpha_t * (jnp.exp(-h) - 1.0) * d0
            if self.solver_type == "midpoint":
                second = first - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
            else:  # heun
                second = first + alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0) * d1
        else:  # sde-dpmsolver++
            z = noise.astype(jnp.float32)
            e2 = jnp.exp(-2.0 * h)
            base = sigma_t / sigma_s0 * jnp.exp(-h) * x + alpha_t * (1 - e2) * d0
            first = base + sigma_t * sqrt(1.0 - e2) * z
            if self.solver_type == "midpoint":
                second = base + 0.5 * (alpha_t * (1 - e2)) * d1 + sigma_t * sqrt(1.0 - e2) * z
            else:  # heun
                coef = alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
                second = base + coef * d1 + sigma_t * sqrt(1.0 - e2) * z

        prev = jnp.where(use_first, first, second)
        prev_x0 = x0.astype(state.prev_model_output.dtype)
        return prev.astype(sample.dtype), state.replace(step=i + 1, prev_model_output=prev_x0)
