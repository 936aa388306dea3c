"""diffusers/transformers PyTorch keys -> Flax parameter paths, and the per-leaf transforms.

Convention (all our Flax models follow it): a Flax module is named like the PyTorch attribute,
with list indices joined by `_` (`down_blocks.1.attentions.0` -> `down_blocks_1/attentions_0`,
`to_out.0` -> `to_out_0`). Leaves: `weight` becomes `kernel` (conv: OIHW -> HWIO, linear: .T),
`scale` (norms) or `embedding` (embedding tables), whichever the target tree has; `bias` stays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

Path = tuple[str, ...]

# PyTorch buffers that are not parameters of any Flax model (pattern -> why).
IGNORED_KEYS: dict[str, str] = {
    r"(^|\.)position_ids$": "CLIP's constant position-id buffer",
}


class ConversionError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected or mis-shaped key."""


def is_ignored(torch_key: str) -> bool:
    return any(re.search(p, torch_key) for p in IGNORED_KEYS)


def module_path(torch_key: str) -> Path:
    """`'down_blocks.1.attentions.0.proj_in.weight'` -> `('down_blocks_1', 'attentions_0', 'proj_in', 'weight')`."""
    out: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def flax_path(torch_key: str, target: Mapping[Path, Any]) -> Path:
    """The Flax path for a PyTorch key, choosing `kernel`/`scale`/`embedding` by the target tree."""
    path = module_path(torch_key)
    prefix, leaf = path[:-1], path[-1]
    if leaf == "weight":
        for name in ("kernel", "scale", "embedding"):
            if prefix + (name,) in target:
                return prefix + (name,)
    return path


def to_flax_layout(array: np.ndarray, path: Path) -> np.ndarray:
    """Rearrange a PyTorch tensor for the Flax leaf at `path` (conv OIHW -> HWIO, linear .T)."""
    if path[-1] == "kernel":
        if array.ndim == 4:
            return np.transpose(array, (2, 3, 1, 0))
        if array.ndim == 2:
            return array.T
    return array


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested dict -> `{path: leaf}`."""
    flat: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """`{path: leaf}` -> nested dict."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def convert_tensors(
    keys: Iterable[str],
    load: Callable[[str], np.ndarray],
    target: Mapping[str, Any],
    cast: Callable[[np.ndarray, Path], Any] = lambda a, p: a,
    strip_prefix: str = "",
) -> dict[str, Any]:
    """Strictly map PyTorch tensors onto a Flax target tree, one tensor at a time.

    Args:
      keys: PyTorch state-dict keys.
      load: key -> numpy array (called once per key, so it can read lazily from mmap).
      target: nested dict of leaves with `.shape` (e.g. from `jax.eval_shape`).
      cast: applied to each converted array (dtype cast, device put); returns the stored leaf.
      strip_prefix: removed from each key first (e.g. `"text_model."`).

    Returns:
      nested params dict with the target's structure.

    Raises:
      ConversionError listing every missing, unexpected and mis-shaped key.
    """
    flat_target = flatten(target)
    out: dict[Path, Any] = {}
    unexpected, misshaped = [], []
    for key in keys:
        if is_ignored(key):
            continue
        name = key[len(strip_prefix) :] if strip_prefix and key.startswith(strip_prefix) else key
        path = flax_path(name, flat_target)
        if path not in flat_target:
            unexpected.append(key)
            continue
        array = to_flax_layout(np.asarray(load(key)), path)
        want = tuple(flat_target[path].shape)
        if tuple(array.shape) != want:
            misshaped.append(f"{key}: checkpoint {tuple(array.shape)} vs model {want}")
            continue
        out[path] = cast(array, path)
    missing = ["/".join(p) for p in flat_target if p not in out]
    if missing or unexpected or misshaped:
        raise ConversionError(mismatch_message(missing, unexpected, misshaped))
    return unflatten(out)


def mismatch_message(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    """One line naming every missing, unexpected and mis-shaped key (the first 20 of each)."""
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            shown = ", ".join(items[:20]) + (
                f", ... ({len(items)} in all)" if len(items) > 20 else ""
            )
            parts.append(f"{len(items)} {label} key(s): {shown}")
    return (
        "checkpoint does not match the model config: "
        + "; ".join(parts)
        + ". Check that the weights belong to this config.json."
    )
