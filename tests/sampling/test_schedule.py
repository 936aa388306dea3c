"""Host-side tables (schedule.py) vs diffusers' torch ones: betas, alphas_cumprod bit for bit."""

import numpy as np
import pytest

from distrifusion_jax.sampling import schedule as sch
from distrifusion_jax.sampling.ddim import DDIMScheduler
from distrifusion_jax.sampling.euler import EulerDiscreteScheduler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    "start,end,steps", [(0.00085**0.5, 0.012**0.5, 1000), (0.0001, 0.02, 1000), (0.1, 0.3, 7)]
)
def test_torch_linspace_bits(start, end, steps):
    ref = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(sch.torch_linspace_f32(start, end, steps), ref)


@pytest.mark.parametrize("beta_schedule", sch.BETA_SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
def test_alphas_cumprod_bits(beta_schedule, rescale):
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
    ours = DDIMScheduler(**kw, rescale_betas_zero_snr=rescale)
    ref = diffusers.DDIMScheduler(**kw, rescale_betas_zero_snr=rescale)
    if not rescale:
        np.testing.assert_array_equal(ours.betas(), ref.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod(), ref.alphas_cumprod.numpy())
    else:
        # The rescale takes float32 square roots, and torch's are one ulp low on ~0.7% of
        # inputs (np.sqrt rounds correctly): equal to a few ulp.
        np.testing.assert_allclose(
            ours.alphas_cumprod(), ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-10
        )


def test_trained_betas():
    betas = np.linspace(1e-4, 2e-2, 1000).tolist()
    ours = EulerDiscreteScheduler(trained_betas=betas)
    assert isinstance(ours.trained_betas, tuple)  # hashable: usable as a static jit argument
    ref = diffusers.EulerDiscreteScheduler(trained_betas=betas)
    np.testing.assert_array_equal(ours.alphas_cumprod(), ref.alphas_cumprod.numpy())


def test_sigma_to_t_inverts_interp():
    ac = EulerDiscreteScheduler(beta_schedule="scaled_linear").alphas_cumprod()
    train = sch.train_sigmas(ac)
    t = np.array([0.0, 1.5, 250.25, 998.0])
    # log-linear inversion of a linear interpolation: equal at the knots, close in between.
    t_back = sch.sigma_to_t(sch.interp_sigmas(t, train), np.log(train))
    np.testing.assert_allclose(t_back, t, atol=0.03)


def test_karras_endpoints():
    s = sch.karras_sigmas(0.03, 14.6, 10)
    np.testing.assert_allclose(s[[0, -1]], [14.6, 0.03], rtol=1e-12)
    assert np.all(np.diff(s) < 0)
