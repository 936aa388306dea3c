"""What each stale buffer receives, one collective per buffer or all of a step's in a few.

A patch-aware layer keeps its exchanged values in the "stale" collection under one of the
names in `RULES`; the name says how a device's local value becomes what its peers store:

- `above`: this band's bottom rows, `ppermute`d to band j+1 (band 0 receives zeros);
- `below`: this band's top rows, `ppermute`d to band j-1 (the last band receives zeros);
- `k`, `v`: local keys/values `[B, L/n, C]`, `all_gather`ed along tokens to `[B, L, C]`;
- `moments`: local GroupNorm moments `[2, B, G]`, `all_gather`ed to `[n, 2, B, G]`.

(PCPP self-attention keeps its neighbours' edge tokens of K,V, stacked `[2, B, r, C]`, as
`above`/`below` too.)

In a displaced step the exchanged values are read only in step t+1. `send` either issues each
layer's collective where the layer runs (default: on an accelerator XLA overlaps each with the
rest of the step), or, with `ctx.fused_exchange`, parks the local value in the "outbox"
collection, and `flush` then exchanges the whole outbox in one `ppermute` per direction and one
`all_gather` per dtype (for hosts where collectives block and cost a fixed latency each, as CPU
processes). Both deliver the same values (up to the last bit where XLA fuses the computation of
a sent value differently in the two programs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from distrifusion_jax.parallel.config import PatchContext
from distrifusion_jax.parallel.state import OUTBOX, STALE

# buffer name -> (collective, gather axis): "down"/"up" ppermute to band j+1 / j-1;
# "gather" all_gather, tiled along the given axis, or stacked on a new axis 0 (None).
RULES: dict[str, tuple[str, int | None]] = {
    "above": ("down", None),
    "below": ("up", None),
    "k": ("gather", 1),
    "v": ("gather", 1),
    "moments": ("gather", None),
}


def shift_rows(x: jax.Array, axis: str, n: int, down: bool) -> jax.Array:
    """Send x from band j to band j+1 (down=True) or j-1; the band with no sender gets zeros."""
    if x.size == 0:
        return x
    pairs = [(j, j + 1) for j in range(n - 1)]
    return jax.lax.ppermute(x, axis, pairs if down else [(b, a) for a, b in pairs])


def exchange(name: str, x: jax.Array, axis: str, n: int) -> jax.Array:
    """One buffer's collective: the local value `x` -> what this device receives (see RULES)."""
    kind, gather_axis = RULES[name]
    if kind == "gather":
        if gather_axis is None:
            return jax.lax.all_gather(x, axis)
        return jax.lax.all_gather(x, axis, axis=gather_axis, tiled=True)
    return shift_rows(x, axis, n, down=kind == "down")


def store(module: nn.Module, **received: jax.Array) -> None:
    """Synchronous step: keep what the layer just received for the displaced steps."""
    if module.is_mutable_collection(STALE):
        for name, x in received.items():
            module.put_variable(STALE, name, x)


def send(module: nn.Module, ctx: PatchContext, **local: jax.Array) -> None:
    """Displaced step: exchange the layer's local values for step t+1 (not read in this step).

    Per layer, the collectives are issued here and the results stored in "stale"; with
    `ctx.fused_exchange` the local values go to "outbox" for `flush`.
    """
    target = OUTBOX if ctx.fused_exchange else STALE
    if not module.is_mutable_collection(target):
        return
    for name, x in local.items():
        value = x if ctx.fused_exchange else exchange(name, x, ctx.axis, ctx.n)
        module.put_variable(target, name, value)


def flush(outbox: Any, axis: str, n: int) -> dict:
    """Exchange a step's whole outbox: nested dict of local values -> the same tree received.

    Buffers are flattened and concatenated per (collective, dtype), so a step issues at most
    one `ppermute` per direction and one `all_gather` per dtype.
    """
    flat = traverse_util.flatten_dict(outbox)
    groups: dict[tuple[str, Any], list[tuple[Any, jax.Array]]] = {}
    for path, x in flat.items():
        groups.setdefault((RULES[path[-1]][0], x.dtype), []).append((path, x))
    received = {}
    for (kind, _), items in groups.items():
        packed = jnp.concatenate([x.reshape(-1) for _, x in items])
        if kind == "gather":
            packed = jax.lax.all_gather(packed, axis)  # [n, total]
        else:
            packed = shift_rows(packed, axis, n, down=kind == "down")
        offset = 0
        for path, x in items:
            part = jax.lax.slice_in_dim(packed, offset, offset + x.size, axis=packed.ndim - 1)
            offset += x.size
            received[path] = _unpack(part, x.shape, path[-1], n)
    return traverse_util.unflatten_dict(received)


def _unpack(part: jax.Array, shape: tuple[int, ...], name: str, n: int) -> jax.Array:
    """A buffer's slice of a fused collective -> the shape `exchange` gives it."""
    kind, gather_axis = RULES[name]
    if kind != "gather":
        return part.reshape(shape)
    stacked = part.reshape((n,) + shape)  # [n, *shape]
    if gather_axis is None:
        return stacked
    tiled = jnp.moveaxis(stacked, 0, gather_axis)  # [..., n, shape[axis], ...]
    merged = shape[gather_axis] * n
    return tiled.reshape(shape[:gather_axis] + (merged,) + shape[gather_axis + 1 :])


def merge(state: Any, received: dict) -> dict:
    """`state` (nested dict) with the leaves of `received` replaced or added."""
    flat = traverse_util.flatten_dict(state)
    flat.update(traverse_util.flatten_dict(received))
    return traverse_util.unflatten_dict(flat)
