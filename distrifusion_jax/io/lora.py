"""LoRA adapters (diffusers/PEFT and kohya/A1111 files) merged into the UNet and text encoders.

A LoRA layer adds `delta = scale * alpha / rank * up @ down` to one weight: `down` is
`[r, in]` (linear) or `[r, in, kh, kw]` (conv, same kernel as the base), `up` is `[out, r]`
or `[out, r, 1, 1]`. Merged params are `base + sum_i s_i * delta_i`, written onto our kernels
(Dense `[in, out]`, conv HWIO); the base is never modified, so adapters can be swapped.

Key names are mapped by `io/lora_keys.py`. Alphas come from `.alpha` tensors, else from the
`lora_adapter_metadata` diffusers writes (the PEFT LoraConfig), else alpha = rank (unscaled), as
in diffusers. Only `.safetensors` files are read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path as FilePath
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from distrifusion_jax.io.keys import Path, flatten, unflatten
from distrifusion_jax.io.lora_keys import COMPONENTS, diffusers_kernel, kohya_names, parse_key
from distrifusion_jax.io.weights import PICKLE_SUFFIXES, SafetensorsFile, WeightsError

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's lora_alpha default, used when metadata omits it


class LoraError(ValueError):
    """A LoRA file cannot be applied to this model; names the file and the offending key."""


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One low-rank update in torch layout: down `[r, in(, kh, kw)]`, up `[out, r(, 1, 1)]`."""

    down: np.ndarray
    up: np.ndarray
    scale: float  # alpha / rank (alpha / sqrt(rank) for rsLoRA)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def kernel_shape(self, ndim: int) -> tuple[int, ...] | None:
        """The shape of our kernel this update fits (`ndim` 2: Dense, 4: HWIO), else None."""
        cin, k = self.down.shape[1], tuple(self.down.shape[2:]) or (1, 1)
        out = self.up.shape[0]
        if ndim == 4:
            return (*k, cin, out)
        return (cin, out) if ndim == 2 and k == (1, 1) else None

    def delta(self, ndim: int) -> np.ndarray:
        """`scale * up @ down` as our kernel: `[in, out]` (ndim 2) or `[kh, kw, in, out]` (4)."""
        r = self.rank
        down = np.asarray(self.down, np.float32).reshape(r, -1)  # [r, in*kh*kw]
        up = np.asarray(self.up, np.float32).reshape(-1, r)  # [out, r]
        w = (up @ down) * np.float32(self.scale)  # [out, in*kh*kw]
        if ndim == 2:
            return w.T  # [in, out]
        kh, kw = tuple(self.down.shape[2:]) or (1, 1)
        return w.reshape(up.shape[0], self.down.shape[1], kh, kw).transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class Lora:
    """A parsed, validated LoRA file: component -> our kernel path -> update."""

    path: str
    layers: Mapping[str, Mapping[Path, LoraLayer]]


def kernel_shapes(params: Mapping[str, Any]) -> dict[Path, tuple[int, ...]]:
    """`{path: shape}` of every `kernel` leaf of a params tree (what a LoRA may target)."""
    return {p: tuple(v.shape) for p, v in flatten(params).items() if p[-1] == "kernel"}


# ---- reading ----------------------------------------------------------------------------


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the `__metadata__` of a LoRA `.safetensors` (pickles are refused)."""
    path = FilePath(path)
    if path.name.endswith(PICKLE_SUFFIXES):
        raise LoraError(
            f"{path} is a pickle; LoRAs are read only from .safetensors (a pickle can run code "
            "when loaded): convert it to .safetensors"
        )
    if not path.name.endswith(".safetensors"):
        raise LoraError(f"{path} is not a .safetensors file; pass a LoRA .safetensors file")
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        with SafetensorsFile(path) as f:
            tensors = {k: f.read(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except WeightsError as e:
        raise LoraError(str(e)) from None
    return tensors, metadata


def peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per component, the PEFT `LoraConfig` fields diffusers saved (`unet.lora_alpha`, ...)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    packed = json.loads(raw)
    out: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        for comp in COMPONENTS:
            if key.startswith(comp + ".") and "." not in key[len(comp) + 1 :]:
                out.setdefault(comp, {})[key[len(comp) + 1 :]] = value
    return out


def _peft_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """alpha / rank as PEFT computes it from a LoraConfig (alpha_pattern, rsLoRA)."""
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def load_lora(
    path: str | os.PathLike, kernels: Mapping[str, Mapping[Path, tuple[int, ...]]]
) -> Lora:
    """Read a LoRA file and check every key against the model, before anything is changed.

    Args:
      path: a `.safetensors` LoRA (diffusers/PEFT or kohya keys).
      kernels: component name -> `kernel_shapes(params)` of the model it will be merged into.

    Raises:
      LoraError (one line, naming the file and keys) if a key is not a LoRA key, targets no
      kernel of the model, lacks its up/down half, or has ranks/shapes that do not fit.
    """
    tensors, metadata = read_tensors(path)
    configs = peft_alphas(metadata)
    dora = [c for c, cfg in configs.items() if cfg.get("use_dora")]
    if dora:
        raise LoraError(
            f"LoRA {path}: DoRA adapters (use_dora, {', '.join(dora)}) are not supported"
        )
    bare = not any(parse_key(k, False) for k in tensors)
    names = {c: kohya_names(c, shapes) for c, shapes in kernels.items()}
    problems: list[str] = []
    groups: dict[tuple[str, Path], dict[str, tuple[str, np.ndarray, str]]] = {}
    for key, value in tensors.items():
        parsed = parse_key(key, bare)
        if parsed is None:
            problems.append(
                f"{key!r} is not a LoRA key we read (lora_A/lora_B, lora_down/lora_up, alpha)"
            )
            continue
        comp, module, role, kohya = parsed
        if comp not in kernels:
            problems.append(f"{key!r} is for the {comp}, which this model does not have")
            continue
        target = names[comp].get(module) if kohya else diffusers_kernel(comp, module)
        if target is None or target not in kernels[comp]:
            why = "is ambiguous" if kohya and module in names[comp] else "matches no weight"
            problems.append(f"{key!r} {why} of the {comp}")
            continue
        group = groups.setdefault((comp, target), {})
        if role in group:
            problems.append(f"{key!r} and {group[role][0]!r} both give {'/'.join(target)}")
            continue
        group[role] = (key, value, module)
    layers: dict[str, dict[Path, LoraLayer]] = {}
    for (comp, target), group in groups.items():
        layer = _layer(comp, target, group, configs.get(comp), kernels[comp][target], problems)
        if layer is not None:
            layers.setdefault(comp, {})[target] = layer
    if not tensors:
        problems.append("the file holds no tensors")
    if problems:
        more = f" ({len(problems)} problems in all)" if len(problems) > 3 else ""
        raise LoraError(f"LoRA {path}: " + "; ".join(problems[:3]) + more)
    return Lora(str(path), layers)


def _layer(
    comp: str,
    target: Path,
    group: Mapping[str, tuple[str, np.ndarray, str]],
    config: Mapping[str, Any] | None,
    shape: tuple[int, ...],
    problems: list[str],
) -> LoraLayer | None:
    """Check one module's down/up/alpha and build its update (None after noting a problem)."""
    some_key = next(iter(group.values()))[0]
    for role in ("down", "up"):
        if role not in group:
            problems.append(f"{some_key!r} has no matching {role} weight")
            return None
    (down_key, down, module), (up_key, up, _) = group["down"], group["up"]
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[2:] not in ((), (1, 1)):
        problems.append(f"{down_key!r} {down.shape} / {up_key!r} {up.shape} are not LoRA shapes")
        return None
    if down.shape[0] != up.shape[1]:
        problems.append(f"rank mismatch: {down_key!r} {down.shape} vs {up_key!r} {up.shape}")
        return None
    rank = down.shape[0]
    if "alpha" in group:
        scale = float(np.asarray(group["alpha"][1], np.float64).reshape(-1)[0]) / rank
    elif config is not None:
        scale = _peft_scale(config, module, rank)
    else:
        scale = 1.0
    layer = LoraLayer(down, up, scale)
    if layer.kernel_shape(len(shape)) != shape:
        problems.append(
            f"{down_key!r} {down.shape} x {up_key!r} {up.shape} does not fit "
            f"{comp} {'/'.join(target)} {shape}"
        )
        return None
    return layer


# ---- merging ----------------------------------------------------------------------------


@jax.jit
def _add(w: jax.Array, d: jax.Array) -> jax.Array:
    """`w + d` in fp32, back in `w`'s dtype (the output keeps `w`'s sharding)."""
    return (w.astype(jnp.float32) + d).astype(w.dtype)


def _put_like(d: np.ndarray, w: jax.Array) -> jax.Array:
    """`d` (the same on every process) with `w`'s sharding, e.g. replicated over the mesh."""
    return jax.make_array_from_callback(d.shape, w.sharding, lambda idx: d[idx])


def merge_loras(
    params: Mapping[str, Any], loras: Sequence[tuple[Lora, float]], component: str
) -> Mapping[str, Any]:
    """`params` with `sum_i scale_i * delta_i` added to each targeted kernel (a new tree that
    shares the untouched leaves; `params` itself is not changed). Returns `params` if no LoRA
    targets this component. The adds run where the params live (jitted, same sharding)."""
    by_path: dict[Path, list[tuple[LoraLayer, float]]] = {}
    for lora, scale in loras:
        for path, layer in lora.layers.get(component, {}).items():
            by_path.setdefault(path, []).append((layer, float(scale)))
    if not by_path:
        return params
    flat = flatten(params)
    for path, layers in by_path.items():  # one summed delta on the host at a time
        w = flat[path]
        d = sum(s * layer.delta(w.ndim) for layer, s in layers)
        flat[path] = _add(w, _put_like(np.asarray(d, np.float32), w))
    return unflatten(flat)
