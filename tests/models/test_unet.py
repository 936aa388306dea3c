"""UNet2DConditionModel: config handling, whole-model parity with diffusers on tiny configs,
and key/shape coverage of the full-size SDXL / SD 1.5 / SD 2.1 UNets (torch meta device)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from distrifusion_jax.io.keys import convert_tensors, flatten
from distrifusion_jax.models import UNet2DConditionModel, UNetConfig, sd15, sd21, sdxl_base
from tests.tiny import (
    TINY_SD15_UNET_CONFIG,
    TINY_SDXL_POOLED_DIM,
    TINY_SDXL_UNET_CONFIG,
    assert_close,
    flax_params,
    nchw_to_nhwc,
    randn,
    tiny_torch_unet,
)

# environment.md §5, the public SDXL base UNet config.
SDXL_PUBLISHED = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    only_cross_attention=False, block_out_channels=[320, 640, 1280], layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    resnet_time_scale_shift="default",
)


# ---- config ------------------------------------------------------------------------------


def test_fields_mirror_diffusers_signature():
    params = inspect.signature(TorchUNet.__init__).parameters
    torch_defaults = {k: p.default for k, p in params.items() if k != "self"}
    ours = UNetConfig().to_dict()
    assert set(ours) == set(torch_defaults)
    for k, v in torch_defaults.items():
        assert ours[k] == (list(v) if isinstance(v, tuple) else v), k


def test_presets():
    xl = sdxl_base()
    assert {k: xl.to_dict()[k] for k in SDXL_PUBLISHED} == SDXL_PUBLISHED
    assert xl.heads_per_level == (5, 10, 20) and xl.num_downsamplers == 2
    assert sd15().heads_per_level == (8,) * 4 and sd15().num_downsamplers == 3
    assert sd15().cross_attention_dims == (768,) * 4 and not sd15().use_linear_projection
    assert sd21().heads_per_level == (5, 10, 20, 20) and sd21().use_linear_projection
    assert (sd15().sample_size, sd21().sample_size, sd21().cross_attention_dim) == (64, 96, 1024)


def test_from_diffusers_round_trip_and_metadata():
    d = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.19.0.dev0",
        "_name_or_path": "somewhere/unet",
        **sdxl_base().to_dict(),
    }
    cfg = UNetConfig.from_diffusers(d)
    assert cfg == sdxl_base() and hash(cfg) == hash(sdxl_base())
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert isinstance(cfg.block_out_channels, tuple)


@pytest.mark.parametrize(
    "key,value",
    [
        ("resnet_time_scale_shift", "scale_shift"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("downsample_padding", 0),
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("num_attention_heads", 8),
        ("only_cross_attention", True),
        ("time_embedding_type", "fourier"),
        ("act_fn", "gelu"),
        ("conv_in_kernel", 1),
        ("encoder_hid_dim", 64),
    ],
)
def test_from_diffusers_rejects_unsupported(key, value):
    d = dict(TINY_SD15_UNET_CONFIG, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64])
    d[key] = value
    with pytest.raises(ValueError, match=key) as err:
        UNetConfig.from_diffusers(d)
    assert "\n" not in str(err.value) and "supported" in str(err.value)


def test_from_diffusers_rejects_unknown_key():
    with pytest.raises(ValueError, match="frobnicate"):
        UNetConfig.from_diffusers(dict(TINY_SDXL_UNET_CONFIG, frobnicate=1))
    with pytest.raises(ValueError, match="_class_name"):
        UNetConfig.from_diffusers(dict(TINY_SDXL_UNET_CONFIG, _class_name="UNet2DModel"))


def test_harmless_values_accepted():
    cfg = UNetConfig.from_diffusers(
        dict(TINY_SDXL_UNET_CONFIG, upcast_attention=None, dropout=0.1, act_fn="swish",
             mid_block_only_cross_attention=None, cross_attention_norm=None)
    )
    assert cfg.num_downsamplers == 1


# ---- whole-model parity ------------------------------------------------------------------

# Tolerance: fp32 with 'highest' matmul precision on both sides; the only differences are
# summation order (convs, matmuls, GroupNorm moments: torch two-pass vs our E[x^2]-E[x]^2 in
# fp32) and 1-ulp exp/sin differences in the timestep embedding, accumulated over ~40 layers.
# Measured ~3e-6 max / ~1e-6 relative; the bounds leave ~10x headroom.
MAX_ABS, REL_L2 = 1e-4, 1e-5
TIMESTEPS = np.array([999.0, 17.0], np.float32)


def _parity(config: dict, hw: tuple[int, int], timesteps, label: str, seed: int = 0):
    tm = tiny_torch_unet(config, seed)
    cfg = UNetConfig.from_diffusers(config)
    model = UNet2DConditionModel(cfg)
    b = 2
    x = randn(1, b, cfg.in_channels, *hw)
    ctx = randn(2, b, 7, cfg.cross_attention_dims[0])
    cond = None
    if cfg.addition_embed_type == "text_time":
        ids = [[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 1024, 768]]
        text = randn(3, b, TINY_SDXL_POOLED_DIM)
        cond = {"text_embeds": text, "time_ids": np.array(ids, np.float32)}
    args = (nchw_to_nhwc(x), timesteps, ctx, cond)
    params = flax_params(tm, model, *args)
    ours = jax.jit(model.apply)({"params": params}, *args)
    with torch.no_grad():
        t = torch.from_numpy(np.asarray(timesteps))
        tcond = None if cond is None else {k: torch.from_numpy(v) for k, v in cond.items()}
        ref = tm(torch.from_numpy(x), t, torch.from_numpy(ctx), added_cond_kwargs=tcond).sample
    assert ours.shape == (b, *hw, cfg.out_channels) and ours.dtype == jnp.float32
    assert_close(ours, nchw_to_nhwc(ref), MAX_ABS, REL_L2, label)


def test_tiny_sdxl_parity():
    """SDXL topology: text_time embedding, linear projections, per-level depth and heads."""
    _parity(TINY_SDXL_UNET_CONFIG, (32, 16), TIMESTEPS, "tiny SDXL UNet 32x16")


def test_tiny_sd15_parity():
    """SD 1.5 topology: 3 downsamplers, 1x1-conv projections, int heads; scalar timestep."""
    _parity(TINY_SD15_UNET_CONFIG, (16, 16), np.float32(481.0), "tiny SD1.5 UNet 16x16")


# ---- full-size key coverage (shapes only) ------------------------------------------------


def _tiny_variant() -> UNetConfig:
    """No mid block, a custom time_embedding_dim and per-level cross_attention_dim."""
    return UNetConfig.from_diffusers(
        dict(TINY_SD15_UNET_CONFIG, mid_block_type=None, time_embedding_dim=48,
             cross_attention_dim=[32, 32, 32, 32], layers_per_block=[1, 2, 1, 2])
    )


@pytest.mark.parametrize(
    "preset", [sdxl_base, sd15, sd21, _tiny_variant], ids=lambda f: f.__name__
)
def test_full_size_keys_match_diffusers(preset):
    """Every torch state-dict key maps onto our tree with the right shape, and nothing is left."""
    cfg = preset()
    with torch.device("meta"):
        tm = TorchUNet(**cfg.to_dict())
    shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}

    model = UNet2DConditionModel(cfg)
    h = 2**cfg.num_downsamplers
    cond = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond = {"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, 6))}
    target = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, h, h, cfg.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 2, cfg.cross_attention_dims[0])),
        cond,
    )["params"]
    zero = np.zeros((), np.float32)
    # Strict: raises listing any missing, unexpected or mis-shaped key. Zero-stride arrays only.
    converted = convert_tensors(
        shapes, lambda k: np.broadcast_to(zero, shapes[k]), target, cast=lambda a, p: a.shape
    )
    assert len(flatten(converted)) == len(flatten(target)) == len(shapes)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    assert n_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target))
    if preset is sdxl_base:
        assert len(shapes) == 1680 and n_params == 2_567_463_684  # environment.md §5
