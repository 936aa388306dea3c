"""ResnetBlock2D, Downsample2D, Upsample2D vs diffusers (fp32, NCHW <-> NHWC)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D

from distrifusion_jax.models.resnet import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    upsample_nearest,
)
from tests.tiny import assert_close, flax_params, nchw_to_nhwc, randn, randomize_

# Tolerance: fp32 with 'highest' matmul precision; only summation order differs (~1e-7 rel).
MAX_ABS, REL = 1e-5, 1e-6


@pytest.mark.parametrize("c_in,c_out", [(32, 64), (32, 32)])
@torch.no_grad()
def test_resnet_block(c_in, c_out):
    tm = TorchResnetBlock2D(
        in_channels=c_in, out_channels=c_out, temb_channels=128, groups=8, eps=1e-5
    )
    randomize_(tm, seed=3)
    m = ResnetBlock2D(c_out, groups=8, eps=1e-5)
    x, temb = randn(0, 2, c_in, 16, 12), randn(1, 2, 128)
    params = flax_params(tm, m, nchw_to_nhwc(x), temb)
    assert ("conv_shortcut" in params) == (c_in != c_out)
    ours = m.apply({"params": params}, nchw_to_nhwc(x), temb)
    ref = tm(torch.from_numpy(x), torch.from_numpy(temb))
    assert_close(ours, nchw_to_nhwc(ref), MAX_ABS, REL, f"ResnetBlock2D {c_in}->{c_out}")


@pytest.mark.parametrize("hw", [(16, 12), (15, 11)])
@torch.no_grad()
def test_downsample(hw):
    tm = randomize_(TorchDownsample2D(32, use_conv=True, out_channels=32, padding=1, name="op"), 4)
    m = Downsample2D(32)
    x = randn(0, 2, 32, *hw)
    params = flax_params(tm, m, nchw_to_nhwc(x))
    ours = m.apply({"params": params}, nchw_to_nhwc(x))
    ref = tm(torch.from_numpy(x))
    assert_close(ours, nchw_to_nhwc(ref), MAX_ABS, REL, f"Downsample2D {hw}")


@pytest.mark.parametrize("size", [None, (15, 11)])
@torch.no_grad()
def test_upsample(size):
    tm = randomize_(TorchUpsample2D(32, use_conv=True, out_channels=32), 5)
    m = Upsample2D(32)
    x = randn(0, 2, 32, 8, 6)
    params = flax_params(tm, m, nchw_to_nhwc(x))  # size is static: not traced
    ours = m.apply({"params": params}, nchw_to_nhwc(x), size)
    ref = tm(torch.from_numpy(x), size)
    assert_close(ours, nchw_to_nhwc(ref), MAX_ABS, REL, f"Upsample2D size={size}")


@pytest.mark.parametrize("h_in,h_out", [(3, 5), (4, 7), (5, 9), (6, 11), (8, 15), (4, 8), (5, 5)])
def test_upsample_nearest_sizes(h_in, h_out):
    x = randn(0, 1, 2, h_in, h_in + 1)
    size = (h_out, h_out + 2)
    ref = F.interpolate(torch.from_numpy(x), size=size, mode="nearest")
    ours = upsample_nearest(nchw_to_nhwc(x), size)
    np.testing.assert_array_equal(np.asarray(ours), nchw_to_nhwc(ref))
