"""ControlNetModel: config handling, per-residual parity with diffusers on tiny SDXL- and
SD1.5-style ControlNets, the UNet with ControlNet residuals, loading a diffusers folder, and
key coverage of a full-size SDXL ControlNet (torch meta device)."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet

from distrifusion_jax.io.checkpoint import load_component
from distrifusion_jax.io.keys import convert_tensors, flatten
from distrifusion_jax.models import UNet2DConditionModel, UNetConfig, sdxl_base
from distrifusion_jax.models.controlnet import ControlNetModel
from distrifusion_jax.models.controlnet_config import ControlNetConfig, sdxl_controlnet
from tests.controlnet_fixtures import (
    TINY_SD15_CONTROLNET_CONFIG,
    TINY_SDXL_CONTROLNET_CONFIG,
    controlnet_config,
    tiny_torch_controlnet,
)
from tests.tiny import (
    TINY_SDXL_POOLED_DIM,
    TINY_SDXL_UNET_CONFIG,
    assert_close,
    flax_params,
    nchw_to_nhwc,
    randn,
    tiny_torch_unet,
)

# fp32, 'highest' matmul precision on both sides: only the order of sums differs (as the
# UNet parity tests). Acceptance: <= 1e-5 relative L2 per residual.
MAX_ABS, REL_L2 = 1e-4, 1e-5
TIMESTEPS = np.array([999.0, 17.0], np.float32)


# ---- config ------------------------------------------------------------------------------


def test_fields_mirror_diffusers_signature():
    params = inspect.signature(TorchControlNet.__init__).parameters
    torch_defaults = {k: p.default for k, p in params.items() if k != "self"}
    ours = ControlNetConfig().to_dict()
    assert set(ours) == set(torch_defaults)
    for k, v in torch_defaults.items():
        assert ours[k] == (list(v) if isinstance(v, tuple) else v), k


def test_from_diffusers_round_trip():
    cfg = ControlNetConfig.from_diffusers(
        {"_class_name": "ControlNetModel", "_diffusers_version": "0.20.0",
         **TINY_SDXL_CONTROLNET_CONFIG}
    )  # fmt: skip
    assert ControlNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert cfg.conditioning_factor == 2 and cfg.num_residuals == 1 + 2 * 2 + 1
    assert ControlNetConfig().conditioning_factor == 8


@pytest.mark.parametrize(
    "key,value",
    [
        ("global_pool_conditions", True),
        ("controlnet_conditioning_channel_order", "xyz"),
        ("mid_block_type", None),
        ("class_embed_type", "timestep"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("frobnicate", 1),
    ],
)
def test_from_diffusers_rejects(key, value):
    with pytest.raises(ValueError, match=key.split("_")[0]) as err:
        ControlNetConfig.from_diffusers(dict(TINY_SDXL_CONTROLNET_CONFIG, **{key: value}))
    assert "\n" not in str(err.value)


# ---- parity ------------------------------------------------------------------------------


def _inputs(cfg: ControlNetConfig, hw, b: int = 2, seed: int = 1):
    f = cfg.conditioning_factor
    x = randn(seed, b, cfg.in_channels, *hw)
    image = np.random.default_rng(seed + 5).uniform(size=(b, 3, hw[0] * f, hw[1] * f))
    ctx = randn(seed + 1, b, 7, cfg.cross_attention_dim)
    cond = None
    if cfg.addition_embed_type == "text_time":
        ids = [[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 1024, 768]][:b]
        text = randn(seed + 2, b, TINY_SDXL_POOLED_DIM)
        cond = {"text_embeds": text, "time_ids": np.array(ids, np.float32)}
    return x, image.astype(np.float32), ctx, cond


def _torch_residuals(tm, x, t, ctx, image, cond, scale, guess_mode):
    with torch.no_grad():
        tcond = None if cond is None else {k: torch.from_numpy(v) for k, v in cond.items()}
        down, mid = tm(
            torch.from_numpy(x), torch.from_numpy(np.asarray(t)), torch.from_numpy(ctx),
            torch.from_numpy(image), conditioning_scale=scale, added_cond_kwargs=tcond,
            guess_mode=guess_mode, return_dict=False,
        )  # fmt: skip
    return [nchw_to_nhwc(d) for d in down], nchw_to_nhwc(mid)


def _residual_parity(torch_config: dict, hw, label: str, scale=1.0, guess_mode=False, t=TIMESTEPS):
    tm = tiny_torch_controlnet(torch_config)
    cfg = ControlNetConfig.from_diffusers(torch_config)
    model = ControlNetModel(cfg)
    x, image, ctx, cond = _inputs(cfg, hw)
    args = (nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(image), cond)
    params = flax_params(tm, model, *args)
    apply = functools.partial(model.apply, guess_mode=guess_mode)
    down, mid = jax.jit(apply)({"params": params}, *args, scale)
    want_down, want_mid = _torch_residuals(tm, x, t, ctx, image, cond, scale, guess_mode)
    assert len(down) == len(want_down) == cfg.num_residuals
    worst = 0.0
    for i, (d, w) in enumerate(zip(down, want_down)):
        worst = max(worst, assert_close(d, w, MAX_ABS, REL_L2, f"{label} down {i}")[1])
    worst = max(worst, assert_close(mid, want_mid, MAX_ABS, REL_L2, f"{label} mid")[1])
    print(f"[parity] {label}: worst residual rel_l2={worst:.3g}")
    return tm, model, params


def test_tiny_sdxl_controlnet_residuals():
    _residual_parity(TINY_SDXL_CONTROLNET_CONFIG, (16, 8), "tiny SDXL ControlNet", scale=0.7)


def test_tiny_sd15_controlnet_residuals():
    _residual_parity(
        TINY_SD15_CONTROLNET_CONFIG, (16, 8), "tiny SD1.5 ControlNet", t=np.float32(481.0)
    )


def test_guess_mode_bgr_plain_mid_and_head_count():
    """guess_mode's 0.1..1 weights, a BGR ControlNet, diffusers' `UNetMidBlock2D` and
    `num_attention_heads` given instead of `attention_head_dim`."""
    config = dict(
        TINY_SD15_CONTROLNET_CONFIG, controlnet_conditioning_channel_order="bgr",
        mid_block_type="UNetMidBlock2D", num_attention_heads=4, attention_head_dim=8,
    )  # fmt: skip
    _residual_parity(config, (8, 8), "tiny SD1.5 ControlNet variant", 0.5, guess_mode=True)


def test_unet_with_controlnet_residuals_equals_diffusers():
    """The UNet adds the residuals where diffusers does (skips and the mid block's output)."""
    tm = tiny_torch_controlnet(TINY_SDXL_CONTROLNET_CONFIG)
    tu = tiny_torch_unet(TINY_SDXL_UNET_CONFIG)
    cn_cfg = ControlNetConfig.from_diffusers(TINY_SDXL_CONTROLNET_CONFIG)
    x, image, ctx, cond = _inputs(cn_cfg, (16, 8))
    down, mid = _torch_residuals(tm, x, TIMESTEPS, ctx, image, cond, 0.8, False)
    with torch.no_grad():
        want = tu(
            torch.from_numpy(x), torch.from_numpy(TIMESTEPS), torch.from_numpy(ctx),
            added_cond_kwargs={k: torch.from_numpy(v) for k, v in cond.items()},
            down_block_additional_residuals=[torch.from_numpy(np.transpose(d, (0, 3, 1, 2)).copy())
                                             for d in down],
            mid_block_additional_residual=torch.from_numpy(np.transpose(mid, (0, 3, 1, 2)).copy()),
        ).sample  # fmt: skip
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(TINY_SDXL_UNET_CONFIG))
    args = (nchw_to_nhwc(x), TIMESTEPS, ctx, cond)
    params = flax_params(tu, unet, *args)
    got = jax.jit(unet.apply)({"params": params}, *args, tuple(down), mid)
    assert_close(got, nchw_to_nhwc(want), MAX_ABS, REL_L2, "tiny SDXL UNet + ControlNet residuals")
    with pytest.raises(ValueError, match="residuals"):
        unet.apply({"params": params}, *args, tuple(down[:-1]), mid)


# ---- loading -----------------------------------------------------------------------------


def test_load_component_from_diffusers_folder(tmp_path):
    """`save_pretrained` folder -> `load_component(path, "controlnet")`: same residuals."""
    tm = tiny_torch_controlnet(TINY_SDXL_CONTROLNET_CONFIG)
    tm.save_pretrained(tmp_path / "cn")
    model, params = load_component(tmp_path / "cn", "controlnet")
    assert isinstance(model, ControlNetModel)
    x, image, ctx, cond = _inputs(model.config, (8, 8), b=1)
    down, mid = model.apply(
        {"params": params}, nchw_to_nhwc(x), 500.0, ctx, nchw_to_nhwc(image), cond
    )
    want_down, want_mid = _torch_residuals(tm, x, np.float32(500.0), ctx, image, cond, 1.0, False)
    for d, w in zip(down, want_down):
        assert_close(d, w, MAX_ABS, REL_L2, "loaded ControlNet")
    assert_close(mid, want_mid, MAX_ABS, REL_L2, "loaded ControlNet mid")


def _sdxl_controlnet() -> ControlNetConfig:
    """diffusers/controlnet-canny-sdxl-1.0's config: the SDXL base trunk, 8x embedding (the
    fields both configs have, from the UNet's dict: independent of `from_unet`)."""
    keys = {f for f in ControlNetConfig().to_dict()}
    base = {k: v for k, v in sdxl_base().to_dict().items() if k in keys}
    return ControlNetConfig(**base)


def test_sdxl_controlnet_preset():
    """`sdxl_controlnet()` (the benchmark's abstract shapes) is the SDXL base trunk, as
    `ControlNetModel.from_unet`: controlnet-canny-sdxl-1.0's 1.25B parameters."""
    from distrifusion_jax.io.components import COMPONENTS

    assert sdxl_controlnet() == _sdxl_controlnet()
    target = COMPONENTS["controlnet"].target(ControlNetModel(sdxl_controlnet()))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target))
    assert n_params == 1_251_014_160  # diffusers' count (test_full_size_sdxl_keys_...)


def test_full_size_sdxl_keys_match_diffusers():
    """Every key of a full-size SDXL ControlNet maps onto our tree with the right shape."""
    cfg = _sdxl_controlnet()
    with torch.device("meta"):
        tm = TorchControlNet(**cfg.to_dict())
    shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    from distrifusion_jax.io.components import COMPONENTS

    model = ControlNetModel(cfg)
    target = COMPONENTS["controlnet"].target(model)
    zero = np.zeros((), np.float32)
    converted = convert_tensors(
        shapes, lambda k: np.broadcast_to(zero, shapes[k]), target, cast=lambda a, p: a.shape
    )
    assert len(flatten(converted)) == len(flatten(target)) == len(shapes)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    print(f"[controlnet] full-size SDXL ControlNet: {len(shapes)} tensors, {n_params:,} params")
    assert n_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target))


def test_factor_mismatch_is_a_clear_error():
    cfg = ControlNetConfig.from_diffusers(controlnet_config(TINY_SDXL_UNET_CONFIG, 4))
    model = ControlNetModel(cfg)
    x, image, ctx, cond = _inputs(ControlNetConfig.from_diffusers(TINY_SDXL_CONTROLNET_CONFIG),
                                  (8, 8), b=1)  # fmt: skip
    with pytest.raises(ValueError, match="4x the latent"):
        jax.eval_shape(
            model.init, jax.random.key(0), nchw_to_nhwc(x), jnp.zeros((1,)), ctx,
            nchw_to_nhwc(image), cond,
        )  # fmt: skip
