"""Fixtures of the parallel tests: the toy model (built once per test process)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.parallel.toy import ToyUNet


@pytest.fixture(scope="session")
def toy():
    """(ToyUNet, perturbed params, latents [2, 32, 24, 4], cond with leading [G=2, B=2])."""
    model = ToyUNet()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32, 24, 4)), jnp.float32)
    cond = {"encoder_hidden_states": jnp.asarray(rng.standard_normal((2, 2, 7, 8)), jnp.float32)}
    ehs = cond["encoder_hidden_states"][0]
    params = model.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)), ehs)["params"]
    # Perturb so GroupNorm scale/bias and biases are not trivial.
    params = jax.tree.map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), params
    )
    return model, params, x, cond
