"""Flax AutoencoderKL vs diffusers (PyTorch) on the same random weights; key coverage; bands."""

from __future__ import annotations

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distrifusion_jax.io.keys import convert_tensors, flatten, flax_path, to_flax_layout
from distrifusion_jax.models import vae
from distrifusion_jax.parallel import ParallelConfig
from tests.models.test_clip import assert_close, randomize_

# environment.md section 6: the SDXL VAE.
SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
    norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # fmt: skip

VARIANTS = {
    # two levels, 8 groups: the default tiny VAE
    "default": {},
    # three levels, no quant convs, no mid-block attention, 2 resnets per level
    "plain": dict(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ),
}


@functools.cache
def build(variant: str):
    """(torch model with random weights, our config, our params)."""
    cfg = vae.tiny_config(**VARIANTS[variant])
    torch_model = diffusers.AutoencoderKL(**cfg.to_dict()).eval()
    randomize_(torch_model, seed=4)
    model = vae.AutoencoderKL(cfg)
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    sd = torch_model.state_dict()
    params = convert_tensors(sd.keys(), lambda k: sd[k].numpy(), target["params"])
    return torch_model, cfg, params


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encode_matches_diffusers(variant):
    torch_model, cfg, params = build(variant)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)  # non-square
    with torch.no_grad():
        dist = torch_model.encode(nchw(x)).latent_dist
    mean, logvar = jax.jit(
        lambda p, x: vae.AutoencoderKL(cfg).apply({"params": p}, x, method="encode")
    )(params, jnp.asarray(x))
    f = cfg.downsample_factor
    assert mean.shape == (2, 32 // f, 48 // f, cfg.latent_channels)
    errors: dict = {}
    assert_close("mean", mean, nhwc(dist.mean), errors)
    assert_close("logvar", logvar, nhwc(dist.logvar), errors)
    print(variant, errors)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_matches_diffusers(variant):
    torch_model, cfg, params = build(variant)
    f = cfg.downsample_factor
    z = np.random.default_rng(1).normal(size=(2, 32 // f, 48 // f, 4)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.decode(nchw(z)).sample
    out = jax.jit(lambda p, z: vae.AutoencoderKL(cfg).apply({"params": p}, z, method="decode"))(
        params, jnp.asarray(z)
    )
    errors: dict = {}
    assert_close("decode", out, nhwc(ref), errors)
    print(variant, errors)


def test_row_bands_full_sync_equal_single_device():
    """With a sync PatchContext on n=4 row bands the VAE equals the plain one (halos, stride-2
    padding, GroupNorm moments and mid-block K,V all exchanged)."""
    _, cfg, params = build("default")
    n = 4
    ctx = ParallelConfig(patches=n, mode="full_sync").context(displaced=False)
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 32, 48, 3)).astype(np.float32))
    plain = vae.AutoencoderKL(cfg).apply({"params": params}, x)
    mesh = Mesh(np.array(jax.devices()[:n]), ("patch",))
    banded = jax.jit(
        jax.shard_map(
            lambda p, x: vae.AutoencoderKL(cfg, patch=ctx).apply({"params": p}, x),
            mesh=mesh,
            in_specs=(P(), P(None, "patch")),
            out_specs=P(None, "patch"),
        )
    )(params, x)
    np.testing.assert_allclose(np.asarray(banded), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_full_size_key_coverage():
    """Every key of the full-size SDXL VAE maps to a Flax param of the right shape; none left."""
    with torch.device("meta"):
        torch_model = diffusers.AutoencoderKL(**SDXL_VAE_CONFIG)
    cfg = vae.AutoencoderKLConfig.from_diffusers(dict(torch_model.config))
    assert cfg == vae.sdxl_vae_config()
    model = vae.AutoencoderKL(cfg)
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    flat = flatten(target["params"])
    seen = set()
    for key, tensor in torch_model.state_dict().items():
        path = flax_path(key, flat)
        assert path in flat, f"torch key {key} has no Flax param"
        shape = to_flax_layout(np.empty(tensor.shape, np.uint8), path).shape
        assert shape == flat[path].shape, (key, shape, flat[path].shape)
        seen.add(path)
    assert not set(flat) - seen, f"Flax params without a torch key: {sorted(set(flat) - seen)}"
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 83_653_863


def test_config_round_trip_and_errors():
    cfg = vae.sdxl_vae_config()
    assert vae.AutoencoderKLConfig.from_diffusers(cfg.to_dict()) == cfg
    d = dict(SDXL_VAE_CONFIG, _class_name="AutoencoderKL", _diffusers_version="0.18.0.dev0")
    assert vae.AutoencoderKLConfig.from_diffusers(d) == cfg
    with pytest.raises(ValueError, match="down_block_types: 'AttnDownEncoderBlock2D'.*supported"):
        vae.AutoencoderKLConfig.from_diffusers(
            dict(SDXL_VAE_CONFIG, down_block_types=["AttnDownEncoderBlock2D"] * 4)
        )
    with pytest.raises(ValueError, match="act_fn: 'gelu'"):
        vae.AutoencoderKLConfig.from_diffusers(dict(SDXL_VAE_CONFIG, act_fn="gelu"))
    with pytest.raises(ValueError, match="'norm_type'.*not supported"):
        vae.AutoencoderKLConfig.from_diffusers(dict(SDXL_VAE_CONFIG, norm_type="spatial"))
