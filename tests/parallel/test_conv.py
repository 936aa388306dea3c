"""`conv2d`: im2col (CPU, few pixels) equals XLA's convolution (fp32, reordered sums only:
1e-6 relative) for 1x1 and 3x3 kernels, strides 1 and 2, image and halo padding; the choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrifusion_jax.parallel.conv import choose_conv, conv2d


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("pads", [((1, 1), (1, 1)), ((0, 0), (1, 1)), ((0, 0), (0, 0))])
def test_im2col_equals_xla(k, stride, pads):
    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.normal(size=(2, 9, 7, 6)), jnp.float32)  # odd sizes: uneven strides
    kernel = jnp.asarray(rng.normal(size=(k, k, 6, 5)), jnp.float32)
    want = conv2d(x, kernel, stride, pads, impl="xla")
    got = jax.jit(conv2d, static_argnums=(2, 3, 4))(x, kernel, stride, pads, "im2col")
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert got.shape == want.shape and got.dtype == jnp.float32 and err <= 1e-6, err


def test_choose_conv():
    assert choose_conv("cpu", 64, 1280) == "im2col"  # SDXL's 8x8 level of a 32x32 latent
    assert choose_conv("cpu", 2 * 64 * 64, 640) == "xla"
    for accelerator in ("gpu", "tpu"):
        assert choose_conv(accelerator, 64, 1280) == "xla"
