"""Down, mid and up blocks vs diffusers (fp32): outputs and every skip."""

import pytest
import torch
from diffusers.models.unets import unet_2d_blocks as tb

from distrifusion_jax.models import unet_blocks as fb
from tests.tiny import assert_close, flax_params, nchw_to_nhwc, randn, randomize_

# Tolerance: fp32, 'highest' matmul precision; a few resnets + transformers deep, so summation
# order differences stay ~1e-7 relative.
MAX_ABS, REL = 4e-5, 2e-6
TEMB, CROSS = 128, 24
COMMON = dict(temb_channels=TEMB, resnet_eps=1e-5, resnet_groups=8)
FLAX_COMMON = dict(resnet_eps=1e-5, resnet_groups=8)


def _inputs(c: int, h: int = 8, w: int = 6):
    return randn(0, 2, c, h, w), randn(1, 2, TEMB), randn(2, 2, 7, CROSS)


def _compare(ours, ref, label):
    assert_close(ours, nchw_to_nhwc(ref), MAX_ABS, REL, label)


@pytest.mark.parametrize("add_downsample", [True, False])
@torch.no_grad()
def test_down_block(add_downsample):
    tm = tb.DownBlock2D(
        in_channels=32, out_channels=64, num_layers=2, add_downsample=add_downsample, **COMMON
    )
    randomize_(tm, 8)
    m = fb.DownBlock2D(64, 2, add_downsample=add_downsample, **FLAX_COMMON)
    x, temb, _ = _inputs(32)
    params = flax_params(tm, m, nchw_to_nhwc(x), temb)
    y, skips = m.apply({"params": params}, nchw_to_nhwc(x), temb)
    ry, rskips = tm(torch.from_numpy(x), torch.from_numpy(temb))
    assert len(skips) == len(rskips) == 2 + add_downsample
    _compare(y, ry, "DownBlock2D")
    for i, (s, r) in enumerate(zip(skips, rskips)):
        _compare(s, r, f"DownBlock2D skip {i}")


@pytest.mark.parametrize("linear", [True, False], ids=["linear_proj", "conv_proj"])
@torch.no_grad()
def test_cross_attn_down_block(linear):
    tm = tb.CrossAttnDownBlock2D(
        in_channels=32,
        out_channels=64,
        num_layers=2,
        transformer_layers_per_block=[1, 2],
        num_attention_heads=4,
        cross_attention_dim=CROSS,
        use_linear_projection=linear,
        **COMMON,
    )
    randomize_(tm, 9)
    m = fb.CrossAttnDownBlock2D(
        64, 2, num_attention_heads=4, transformer_layers_per_block=(1, 2),
        use_linear_projection=linear, **FLAX_COMMON,
    )
    x, temb, ctx = _inputs(32)
    params = flax_params(tm, m, nchw_to_nhwc(x), temb, ctx)
    y, skips = m.apply({"params": params}, nchw_to_nhwc(x), temb, ctx)
    ry, rskips = tm(torch.from_numpy(x), torch.from_numpy(temb), torch.from_numpy(ctx))
    _compare(y, ry, f"CrossAttnDownBlock2D linear={linear}")
    for i, (s, r) in enumerate(zip(skips, rskips, strict=True)):
        _compare(s, r, f"CrossAttnDownBlock2D skip {i}")


@torch.no_grad()
def test_mid_block():
    tm = tb.UNetMidBlock2DCrossAttn(
        in_channels=64,
        transformer_layers_per_block=2,
        num_attention_heads=4,
        cross_attention_dim=CROSS,
        use_linear_projection=True,
        output_scale_factor=1.5,
        **COMMON,
    )
    randomize_(tm, 10)
    m = fb.UNetMidBlock2DCrossAttn(
        64, 1, num_attention_heads=4, transformer_layers_per_block=2,
        use_linear_projection=True, output_scale_factor=1.5, **FLAX_COMMON,
    )
    x, temb, ctx = _inputs(64, 4, 6)
    params = flax_params(tm, m, nchw_to_nhwc(x), temb, ctx)
    y = m.apply({"params": params}, nchw_to_nhwc(x), temb, ctx)
    ry = tm(torch.from_numpy(x), torch.from_numpy(temb), torch.from_numpy(ctx))
    _compare(y, ry, "UNetMidBlock2DCrossAttn")


def _skips(h: int, w: int):
    # consumed from the end: resnets 0, 1 get out_channels skips, the last one in_channels.
    return (randn(5, 2, 32, h, w), randn(6, 2, 64, h, w), randn(7, 2, 64, h, w))


@pytest.mark.parametrize("size", [None, (15, 11)])
@torch.no_grad()
def test_up_block(size):
    tm = tb.UpBlock2D(
        in_channels=32, prev_output_channel=64, out_channels=64, num_layers=3, **COMMON
    )
    randomize_(tm, 11)
    m = fb.UpBlock2D(64, 3, **FLAX_COMMON)
    x, temb, _ = _inputs(64)
    skips = _skips(8, 6)
    args = (nchw_to_nhwc(x), tuple(nchw_to_nhwc(s) for s in skips), temb)
    params = flax_params(tm, m, *args)  # size is static: not traced
    y = m.apply({"params": params}, *args, size)
    ry = tm(torch.from_numpy(x), tuple(map(torch.from_numpy, skips)), torch.from_numpy(temb), size)
    _compare(y, ry, f"UpBlock2D size={size}")


@pytest.mark.parametrize("linear,add_upsample", [(False, True), (True, False)])
@torch.no_grad()
def test_cross_attn_up_block(linear, add_upsample):
    tm = tb.CrossAttnUpBlock2D(
        in_channels=32,
        prev_output_channel=64,
        out_channels=64,
        num_layers=3,
        transformer_layers_per_block=1,
        num_attention_heads=4,
        cross_attention_dim=CROSS,
        use_linear_projection=linear,
        add_upsample=add_upsample,
        **COMMON,
    )
    randomize_(tm, 12)
    m = fb.CrossAttnUpBlock2D(
        64, 3, num_attention_heads=4, transformer_layers_per_block=1,
        use_linear_projection=linear, add_upsample=add_upsample, **FLAX_COMMON,
    )
    x, temb, ctx = _inputs(64)
    skips = _skips(8, 6)
    args = (nchw_to_nhwc(x), tuple(nchw_to_nhwc(s) for s in skips), temb, ctx)
    params = flax_params(tm, m, *args)
    y = m.apply({"params": params}, *args)
    ry = tm(
        torch.from_numpy(x),
        tuple(map(torch.from_numpy, skips)),
        torch.from_numpy(temb),
        torch.from_numpy(ctx),
    )
    _compare(y, ry, f"CrossAttnUpBlock2D linear={linear} upsample={add_upsample}")
