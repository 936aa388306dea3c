"""DDIM trajectories vs diffusers' DDIMScheduler (SDXL config: set_alpha_to_one/clip_sample False).

Tolerance: final sample to 1e-5 of its max (fp32 scalar rounding only; measured ~5e-7).
"""

import pytest

from tests.sampling.trajectory import compare, config

pytest.importorskip("diffusers")


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_matches_diffusers(spacing, prediction_type, num_steps):
    cfg = config("ddim", timestep_spacing=spacing, prediction_type=prediction_type)
    compare("ddim", cfg, num_steps)


@pytest.mark.parametrize(
    "overrides,eta",
    [
        ({}, 0.5),  # stochastic DDIM: noise fed to both
        ({"clip_sample": True, "set_alpha_to_one": True}, 0.0),
        ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 0.0),
        ({"beta_schedule": "squaredcos_cap_v2"}, 0.0),
        (
            {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
             "timestep_spacing": "trailing"},
            0.0,
        ),
    ],
)
def test_ddim_variants(overrides, eta):
    compare("ddim", config("ddim", **overrides), 20, eta=eta)
