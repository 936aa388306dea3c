"""Single-file original-layout checkpoints: tiny round trip, full-size SDXL key coverage (meta)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distrifusion_jax import load_unet
from distrifusion_jax.cli.convert import main
from distrifusion_jax.io import single_file
from distrifusion_jax.io.components import COMPONENTS
from distrifusion_jax.io.convert import convert
from distrifusion_jax.io.keys import ConversionError, convert_tensors
from distrifusion_jax.models.unet_config import sdxl_base
from tests.convert.ldm_layout import unet_to_ldm
from tests.tiny import TINY_SDXL_UNET_CONFIG

# The parts of Stability's sd_xl_base.yaml that diffusers' create_*_config_from_ldm read.
SDXL_ORIGINAL_CONFIG = {
    "model": {
        "params": {
            "scale_factor": 0.13025,
            "network_config": {
                "params": {
                    "adm_in_channels": 2816,
                    "num_classes": "sequential",
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4],
                    "num_head_channels": 64,
                    "use_linear_in_transformer": True,
                    "transformer_depth": [1, 2, 10],
                    "context_dim": 2048,
                }
            },
            "first_stage_config": {
                "params": {
                    "ddconfig": {
                        "double_z": True,
                        "z_channels": 4,
                        "resolution": 256,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                    }
                }
            },
        }
    }
}
# A key diffusers uses to recognise SDXL base (CHECKPOINT_KEY_NAMES["xl_base"]).
XL_BASE_MARKER = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"


@pytest.fixture(scope="module")
def tiny_single_file(tiny_sdxl, tmp_path_factory) -> Path:
    sd = {k: v.contiguous() for k, v in tiny_sdxl.unet.state_dict().items()}
    path = tmp_path_factory.mktemp("single") / "tiny_sdxl.safetensors"
    save_file(unet_to_ldm(sd, TINY_SDXL_UNET_CONFIG), path)
    return path


def test_tiny_round_trip(tiny_sdxl, tiny_single_file, tmp_path):
    """original layout -> diffusers' mapping -> ours == the diffusers folder, value for value."""
    dst = tmp_path / "out"
    report = convert(tiny_single_file, dst, config=tiny_sdxl.root)
    assert set(report.converted) == {"unet"}
    assert set(report.copied) == {"tokenizer", "tokenizer_2", "scheduler"}
    _, ref = load_unet(tiny_sdxl.root)
    for path in (dst, tiny_single_file):  # converted, and converted in memory
        _, params = load_unet(path, config=tiny_sdxl.root)
        assert jax.tree.structure(params) == jax.tree.structure(ref)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "key, error",
    [
        # renamed by diffusers, then refused by our strict mapping
        ("input_blocks.1.0.bogus.weight", "unexpected key.*down_blocks.0.resnets.0.bogus.weight"),
        # silently dropped by diffusers' mapping: caught by `unused_unet_keys`
        ("bogus_block.weight", "fit no diffusers key.*model.diffusion_model.bogus_block.weight"),
    ],
)
def test_extra_key_is_an_error(tiny_sdxl, tiny_single_file, tmp_path, key, error):
    from safetensors.torch import load_file

    sd = dict(load_file(tiny_single_file))
    sd["model.diffusion_model." + key] = torch.ones(3)
    path = tmp_path / "extra.safetensors"
    save_file(sd, path)
    with pytest.raises(ConversionError, match=error):
        load_unet(path, config=tiny_sdxl.root)


def test_cli_errors(capsys, tiny_sdxl, tiny_single_file, tmp_path):
    # a non-SDXL single file without configs
    assert main([str(tiny_single_file), str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config" in err[0] and "--original-config" in err[0]
    # diffusers keys in a single file are not the original layout
    save_file(
        {k: v.contiguous() for k, v in tiny_sdxl.unet.state_dict().items()},
        tmp_path / "diffusers_keys.safetensors",
    )
    assert main([str(tmp_path / "diffusers_keys.safetensors"), str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "original SD layout" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers_keys.safetensors"]


@pytest.mark.parametrize("how", ["built-in", "original-yaml"])
def test_full_size_sdxl_unet_key_coverage(how):
    """Every full-size SDXL UNet key survives original layout -> diffusers -> our tree (meta)."""
    from diffusers import UNet2DConditionModel

    config = sdxl_base().to_diffusers()
    with torch.device("meta"):
        sd = UNet2DConditionModel(**sdxl_base().to_dict()).state_dict()
    assert len(sd) == 1680
    checkpoint = unet_to_ldm(sd, config)
    checkpoint[XL_BASE_MARKER] = torch.empty(1280, device="meta")
    original = SDXL_ORIGINAL_CONFIG if how == "original-yaml" else None
    configs = single_file.component_configs(checkpoint, Path("sdxl.safetensors"), None, original)
    if how == "built-in":
        assert configs["unet"] == config
    mapped = single_file.diffusers_tensors("unet", checkpoint, configs["unet"])
    assert mapped.keys() == sd.keys()
    assert all(mapped[k] is sd[k] for k in sd)
    assert single_file.unused_unet_keys(checkpoint, mapped) == []

    comp = COMPONENTS["unet"]
    target = comp.target(comp.make(configs["unet"], jnp.bfloat16))
    zero = np.zeros((), np.float32)
    tree = convert_tensors(  # shapes only: broadcast views, nothing allocated
        mapped.keys(),
        lambda k: np.broadcast_to(zero, tuple(mapped[k].shape)),
        target,
        cast=lambda a, p: a.shape,
    )
    assert len(jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple))) == 1680


def test_single_file_sdxl_config_matches_published():
    """The built-in configs are the published SDXL ones our models parse."""
    configs = single_file._sdxl_configs()
    assert configs["unet"]["transformer_layers_per_block"] == [1, 2, 10]
    assert configs["vae"]["scaling_factor"] == 0.13025
    assert configs["text_encoder_2"]["hidden_size"] == 1280
    for name, raw in configs.items():
        COMPONENTS[name].make(raw, jnp.float32)  # parses
    json.dumps(configs)  # storable as config.json
