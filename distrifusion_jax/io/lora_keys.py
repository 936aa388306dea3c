"""LoRA key names -> our kernel paths, for diffusers/PEFT and kohya/A1111 files.

diffusers/PEFT: `unet.` | `text_encoder.` | `text_encoder_2.` + torch module path + role
(`.lora_A.weight`, `.lora_B.weight`, `.lora.down/up.weight`, `.lora_linear_layer.down/up.weight`,
old `processor.to_q_lora`, `.alpha`); the module path maps like checkpoint keys (`io/keys.py`).
kohya/A1111: `lora_unet_` | `lora_te_`/`lora_te1_` | `lora_te2_` + module path with `_` for `.` +
`.lora_down.weight` / `.lora_up.weight` / `.alpha`. Those names are looked up among the module
paths of our kernels (diffusers layout; for the UNet also the SGM layout kohya trains SDXL on,
`input_blocks_4_1_...`), never by guessing where the dots were.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from distrifusion_jax.io.keys import Path, module_path

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DIFFUSERS_PREFIXES = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
DIFFUSERS_ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
TEXT_PREFIX = "text_model"  # CLIP's torch prefix, stripped from our param paths


_RESNET_SGM = {
    "norm1": "in_layers_0",
    "conv1": "in_layers_2",
    "time_emb_proj": "emb_layers_1",
    "norm2": "out_layers_0",
    "conv2": "out_layers_3",
    "conv_shortcut": "skip_connection",
}
_TOP_SGM = {
    ("conv_in",): "input_blocks_0_0",
    ("time_embedding", "linear_1"): "time_embed_0",
    ("time_embedding", "linear_2"): "time_embed_2",
    ("add_embedding", "linear_1"): "label_emb_0_0",
    ("add_embedding", "linear_2"): "label_emb_0_2",
    ("conv_norm_out",): "out_0",
    ("conv_out",): "out_2",
}
_MID_SGM = {
    "resnets_0": "middle_block_0",
    "attentions_0": "middle_block_1",
    "resnets_1": "middle_block_2",
}


def _index(name: str) -> tuple[str, int]:
    """`'resnets_1'` -> `('resnets', 1)`; `('', -1)` for a name without an index."""
    m = re.fullmatch(r"(.+)_(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else ("", -1)


def sgm_name(module: Path, layers_per_block: int, up_with_attention: set[str]) -> str | None:
    """The SGM/LDM name kohya gives a UNet module (`down_blocks_1/attentions_0/proj_in` ->
    `input_blocks_4_1_proj_in` for 2 layers per block); None where SGM has no counterpart.

    SGM numbers the blocks flat: `input_blocks_0` is conv_in, then each down block's layers
    and its downsampler (`_0_op`); `output_blocks` hold each up block's layers, the last one
    also the upsampler; inside, `_0` is the resnet and `_1` the transformer.
    """
    if module in _TOP_SGM:
        return _TOP_SGM[module]
    if len(module) < 2:
        return None
    head, sub, rest = module[0], module[1], list(module[2:])
    if sub.startswith("resnets_") and rest:
        rest[0] = _RESNET_SGM.get(rest[0], rest[0])
    if head == "mid_block":
        return "_".join([_MID_SGM[sub], *rest]) if sub in _MID_SGM else None
    m = re.fullmatch(r"(down|up)_blocks_(\d+)", head)
    kind, i = _index(sub)
    if m is None or kind not in ("resnets", "attentions", "downsamplers", "upsamplers"):
        return None
    b, per = int(m.group(2)), layers_per_block + 1  # per: the layers + a resampler
    inner = 0 if kind == "resnets" else 1
    if m.group(1) == "down":
        if kind == "downsamplers":
            return f"input_blocks_{(b + 1) * per}_0_op" if rest == ["conv"] else None
        return "_".join([f"input_blocks_{1 + b * per + i}_{inner}", *rest])
    if kind == "upsamplers":
        i, inner = layers_per_block, 2 if head in up_with_attention else 1
    return "_".join([f"output_blocks_{b * per + i}_{inner}", *rest])


def kohya_names(component: str, kernels: Iterable[Path]) -> dict[str, Path | None]:
    """kohya module name -> our kernel path (None where two modules would share a name)."""
    kernels = list(kernels)
    modules = [p[:-1] for p in kernels]
    names: dict[str, Path | None] = {}

    def add(name: str, path: Path) -> None:
        names[name] = path if names.get(name, path) == path else None

    blocks = [m[:2] for m in modules if len(m) > 2]
    layers = 1 + max((_index(s)[1] for h, s in blocks if h == "down_blocks_0"), default=0)
    up_attn = {h for h, s in blocks if h.startswith("up_blocks_") and s.startswith("attentions_")}
    for module, path in zip(modules, kernels):
        add("_".join(module), path)
        if component != "unet":
            add(f"{TEXT_PREFIX}_" + "_".join(module), path)
        elif (sgm := sgm_name(module, layers, up_attn)) is not None:
            add(sgm, path)
    return names


def _fix_processor_key(key: str) -> str:
    """Old diffusers attention-processor keys: `attn1.processor.to_q_lora.down.weight` ->
    `attn1.to_q.lora.down.weight`, `to_out_lora` -> `to_out.0`."""
    key = re.sub(r"\.processor\.(to_[qkv])_lora\.", r".\1.lora.", key)
    return re.sub(r"\.processor\.to_out_lora\.", ".to_out.0.lora.", key)


def _split(key: str, roles: Mapping[str, str]) -> tuple[str, str] | None:
    """`'x.y.lora_A.weight'` -> `('x.y', 'down')` by the longest matching role suffix."""
    for suffix in sorted(roles, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], roles[suffix]
    return None


def parse_key(key: str, bare_is_unet: bool) -> tuple[str, str, str, bool] | None:
    """(component, module name, role, kohya?) of a LoRA key, or None if it is not one."""
    for prefix, comp in KOHYA_PREFIXES.items():
        if key.startswith(prefix) and (split := _split(key[len(prefix) :], KOHYA_ROLES)):
            return comp, split[0], split[1], True
    key = _fix_processor_key(key)
    for prefix, comp in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix) and (split := _split(key[len(prefix) :], DIFFUSERS_ROLES)):
            return comp, split[0], split[1], False
    if bare_is_unet and (split := _split(key, DIFFUSERS_ROLES)):
        return "unet", split[0], split[1], False
    return None


def diffusers_kernel(component: str, module: str) -> Path:
    """Our kernel path for a torch module name (`text_model.` dropped for the encoders)."""
    if component != "unet" and module.startswith(TEXT_PREFIX + "."):
        module = module[len(TEXT_PREFIX) + 1 :]
    return module_path(module) + ("kernel",)
