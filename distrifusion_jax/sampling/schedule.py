"""Noise-schedule tables shared by the schedulers, computed with numpy on the host.

Every function reproduces diffusers' (0.42) arithmetic bit for bit, bar torch's sqrt: the
torch float32 betas, the float64 cumulative product, the numpy timestep spacings, `np.interp`
of the training sigmas, Karras sigmas and the sigma -> t inversion. A scheduler is a frozen
dataclass of its diffusers config (field names = config keys) built by `from_config(dict)`.

Interface every scheduler implements (the sampler loop drives it inside `lax.scan`):
  set_timesteps(n) -> Schedule        host-side tables as jnp arrays; `timesteps [T]` float32
  init_state(schedule, shape, dtype, first_step=0) -> state  pytree with `step` (int32, starts at
                                       first_step: img2img skips steps) and any multistep buffers
  init_noise_sigma(schedule) -> scalar   multiplies the initial Gaussian noise
  scale_model_input(schedule, state, x) -> x   what the UNet sees at this step
  step(schedule, state, model_output, x, noise=None) -> (x_prev, new_state)
  add_noise(schedule, x0, noise, i) -> x   x0 noised to the level of step i (img2img, inpainting)
  needs_noise                          True when `step` reads `noise` (ancestral/SDE)
All per-sample arithmetic is elementwise, so a row band of the latent steps like the whole.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ---------------------------------------------------------------------------------------------
# Training schedule: betas and alphas_cumprod (float32, as torch computes them).


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` on CPU, bit for bit.

    torch's kernel takes `step = (end - start) / (steps - 1)` in float32 and evaluates
    `start + step * i` for the first half and `end - step * (steps - 1 - i)` for the second,
    each with one rounding (a fused multiply-add); float64 then one cast gives the same bits.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps)
    head = np.float64(start32) + step * i
    tail = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, head, tail).astype(np.float32)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule (`squaredcos_cap_v2`), computed in Python floats as diffusers does."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, np.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Training betas [num_train_timesteps], float32."""
    if trained_betas is not None:
        return np.asarray(trained_betas, np.float32)
    if beta_schedule == "linear":
        return torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise ValueError(f"Unknown beta_schedule {beta_schedule!r}; supported: {BETA_SCHEDULES}")


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in float64 (at::acc_type), then rounds each entry.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (arXiv 2305.08891, Alg. 1), float32 as diffusers."""
    alphas_bar_sqrt = np.sqrt(cumprod_f32(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = alphas_bar_sqrt - last
    alphas_bar_sqrt = alphas_bar_sqrt * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return np.float32(1.0) - alphas


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) [num_train_timesteps], float32, t ascending.

    np.sqrt rounds correctly; torch's float32 sqrt (2.13, CPU) is one ulp low on ~0.7% of
    inputs, so diffusers' table may differ from this one in the last bit of a few entries.
    """
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


# ---------------------------------------------------------------------------------------------
# Inference timesteps and sigmas.


def spaced_timesteps(
    spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0
) -> np.ndarray:
    """Descending inference timesteps [T], float64, as DDIM/Euler compute them.

    `linspace` is not rounded here (Euler keeps fractional values; DDIM rounds them).
    `trailing` may give T != num_inference_steps when the ratio is not an integer, as diffusers.
    """
    n, n_train = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(n_train, 0, -n_train / n).round() - 1
    raise ValueError(f"Unknown timestep_spacing {spacing!r}; supported: {TIMESTEP_SPACINGS}")


def interp_sigmas(timesteps: np.ndarray, sigmas_train: np.ndarray) -> np.ndarray:
    """Training sigmas linearly interpolated at (possibly fractional) timesteps, float64."""
    return np.interp(timesteps, np.arange(0, len(sigmas_train)), sigmas_train)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n sigmas from sigma_max down to sigma_min, float64."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose log-sigma interpolates to each sigma [T], float64."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # [n_train, T]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigmas))


# ---------------------------------------------------------------------------------------------
# Shared pytrees and the config base class.


@flax.struct.dataclass
class SigmaSchedule:
    """Tables of a sigma-parameterised scheduler (Euler, Euler ancestral, DPM-Solver)."""

    timesteps: jnp.ndarray  # [T] float32, fed to the UNet
    sigmas: jnp.ndarray  # [T + 1] float32, sigmas[T] is the final sigma (usually 0)


@flax.struct.dataclass
class StepState:
    """State of a single-step scheduler: only the step index."""

    step: jnp.ndarray  # [] int32


def sqrt(x):
    # diffusers writes `x ** 0.5`, which torch computes as sqrt; jnp's `x ** 0.5` lowers to pow.
    return jnp.sqrt(x)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Config fields common to the diffusers schedulers we port (names = diffusers keys).

    Subclasses list in `UNSUPPORTED` the diffusers keys they accept only at one value: a config
    that sets another value raises instead of silently sampling differently.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}
    DIFFUSERS_CLASS: ClassVar[str] = ""

    def __post_init__(self):
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        name = type(self).__name__
        for key, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
            ("prediction_type", PREDICTION_TYPES),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{name}: {key}={getattr(self, key)!r} unsupported; use one of {allowed}"
                )

    @classmethod
    def from_config(cls, d: dict):
        """Build from a diffusers `scheduler_config.json` dict.

        Keys this class does not know are ignored (diffusers' `from_config` does the same), so an
        Euler config can build a DDIM scheduler; keys in `UNSUPPORTED` must keep their default.
        """
        for key, allowed in cls.UNSUPPORTED.items():
            if key in d and d[key] not in allowed:
                raise ValueError(
                    f"{cls.__name__}: {key}={d[key]!r} is not supported (only {allowed})"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    # Training tables -----------------------------------------------------------------------
    def betas(self) -> np.ndarray:
        betas = make_betas(
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            self.beta_schedule,
            self.trained_betas,
        )
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> np.ndarray:
        """abar_t [num_train_timesteps], float32."""
        return cumprod_f32(np.float32(1.0) - self.betas())

    def check_steps(self, num_inference_steps: int) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} must be in "
                f"[1, num_train_timesteps={self.num_train_timesteps}]"
            )

    @property
    def needs_noise(self) -> bool:
        return False
