"""Tiny model configs and helpers shared by the parity tests.

Torch modules get seeded random weights (every parameter, including the ones diffusers
zero-initialises such as `conv_out` and `proj_out`), are converted with the project's generic
converter onto `jax.eval_shape` of the Flax module, and are compared on the same inputs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import torch

from distrifusion_jax.io.keys import convert_tensors

# SDXL topology (environment.md §5, diffusers' SDXL `get_dummy_components`) with 8 GroupNorm
# groups instead of 1/32, so group statistics span several channels and several groups.
TINY_SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(32, 64),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=8,
    norm_eps=1e-5,
    cross_attention_dim=64,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),  # heads (diffusers' naming): head dim 16
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,  # 6*8 (time_ids) + 32 (pooled text)
    upcast_attention=False,
    resnet_time_scale_shift="default",
)
TINY_SDXL_POOLED_DIM = 32

# SD 1.5 topology: 3 downsamplers, 1x1-conv proj_in/out, one int head count for all levels.
TINY_SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,
    use_linear_projection=False,
)


def randomize_(module: torch.nn.Module, seed: int = 0, bias_std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (in place); returns the module.

    Weights with a fan-in get N(0, 1/fan_in) (unit gain, so activations stay O(1) through the
    UNet); norm scales get 1 + N(0, 0.1^2) and biases N(0, bias_std^2), so nothing is zero.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(noise / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(bias_std * noise)
    return module.eval()


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The module's state dict as float32 numpy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def flax_params(
    torch_module: torch.nn.Module, flax_module: Any, *init_args: Any, **init_kwargs: Any
) -> dict[str, Any]:
    """Convert `torch_module`'s weights onto `flax_module`'s param tree (strict: every key used)."""
    shapes = jax.eval_shape(flax_module.init, jax.random.key(0), *init_args, **init_kwargs)
    sd = state_dict_numpy(torch_module)
    return convert_tensors(sd.keys(), sd.__getitem__, shapes["params"])


def tiny_torch_unet(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """diffusers `UNet2DConditionModel(**config)` with random weights, eval mode, fp32."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**config), seed)


def nchw_to_nhwc(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def randn(seed: int, *shape: int) -> np.ndarray:
    """Unit-scale float32 normal noise, seeded."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def errors(ours: Any, ref: Any) -> tuple[float, float]:
    """(max |ours - ref|, ||ours - ref||_2 / ||ref||_2), in float64."""
    a = np.asarray(ours, np.float64)
    b = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = a - b
    return float(np.max(np.abs(d))), float(np.linalg.norm(d) / np.linalg.norm(b))


def assert_close(
    ours: Any, ref: Any, max_abs: float = 1e-4, rel_l2: float = 1e-5, label: str = ""
) -> tuple[float, float]:
    """Assert both error measures; prints them (`pytest -s`) so reports can quote them."""
    mx, rel = errors(ours, ref)
    print(f"[parity] {label}: max_abs={mx:.3g} rel_l2={rel:.3g}")
    assert mx <= max_abs and rel <= rel_l2, f"{label}: max_abs={mx:.3g} rel_l2={rel:.3g}"
    return mx, rel

