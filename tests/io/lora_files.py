"""Random LoRA files for the tiny SDXL, written the ways people download them: diffusers'
`save_lora_weights` (PEFT keys + adapter metadata) and kohya keys (diffusers or SGM module
names, a `.alpha` per module)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

Adapter = dict[str, torch.Tensor]  # PEFT state dict: `<module>.lora_A.weight` / `.lora_B.weight`


def peft_adapter(
    model: torch.nn.Module, targets: list[str], rank: int, alpha: float, seed: int
) -> tuple[Adapter, dict]:
    """Seeded random, non-zero LoRA weights for `model` (a deep copy is adapted) and the PEFT
    LoraConfig as a dict. down ~ N(0, 1/fan_in), up ~ N(0, 0.25/rank): each update changes its
    layer's output by roughly half, times alpha/rank."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    adapted = inject_adapter_in_model(config, copy.deepcopy(model), adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in get_peft_model_state_dict(adapted, adapter_name="x").items():
        noise = torch.randn(v.shape, generator=g, dtype=torch.float32)
        out[key] = noise / math.sqrt(math.prod(v.shape[1:])) * (0.5 if ".lora_B." in key else 1.0)
    return out, config.to_dict()


def save_diffusers(folder: Path, name: str, adapters: Mapping[str, tuple[Adapter, dict]]) -> Path:
    """`StableDiffusionXLPipeline.save_lora_weights` of {component: (adapter, config)}."""
    from diffusers import StableDiffusionXLPipeline

    kw = {}
    for comp, (sd, config) in adapters.items():
        kw[f"{comp}_lora_layers"] = sd
        kw[f"{comp}_lora_adapter_metadata"] = config
    StableDiffusionXLPipeline.save_lora_weights(folder, weight_name=name, **kw)
    return folder / name


def kohya_tensors(
    adapters: Mapping[str, Adapter],
    alpha: Callable[[str], float],
    unet_name: Callable[[str], str] = lambda m: m.replace(".", "_"),
) -> dict[str, torch.Tensor]:
    """kohya keys for PEFT adapters {component: adapter}: `lora_unet_<name>.lora_down.weight`,
    `.lora_up.weight`, `.alpha` (alpha(module)); text encoders as `lora_te1_`/`lora_te2_`."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    out = {}
    for comp, sd in adapters.items():
        for key, v in sd.items():
            module, role = key.rsplit(".lora_", 1)
            name = prefixes[comp] + (
                unet_name(module) if comp == "unet" else module.replace(".", "_")
            )
            out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = v
            out[f"{name}.alpha"] = torch.tensor(float(alpha(module)))
    return out


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))
    return path
