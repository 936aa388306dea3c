"""Euler and Euler ancestral trajectories vs diffusers (SDXL base config and variants).

Tolerance: final sample to 1e-5 of its max (fp32 scalar rounding only; measured ~4e-7).
Euler ancestral gets the same numpy noise as diffusers (its randn_tensor is patched).
"""

import pytest

from tests.sampling.trajectory import compare, config

pytest.importorskip("diffusers")

SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction"]


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_matches_diffusers(spacing, karras, prediction_type, num_steps):
    cfg = config(
        "euler", timestep_spacing=spacing, use_karras_sigmas=karras, prediction_type=prediction_type
    )
    compare("euler", cfg, num_steps)


@pytest.mark.parametrize(
    "overrides",
    [
        {"final_sigmas_type": "sigma_min"},
        {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
        {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
         "timestep_spacing": "trailing"},
    ],
)
def test_euler_variants(overrides):
    compare("euler", config("euler", **overrides), 20)


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_ancestral_matches_diffusers(spacing, prediction_type, num_steps):
    cfg = config("euler_a", timestep_spacing=spacing, prediction_type=prediction_type)
    compare("euler_a", cfg, num_steps)


@pytest.mark.parametrize(
    "overrides",
    [
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
         "timestep_spacing": "trailing"},
    ],
)
def test_euler_ancestral_variants(overrides):
    compare("euler_a", config("euler_a", **overrides), 20)
