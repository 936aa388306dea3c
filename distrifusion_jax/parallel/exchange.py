"""What each stale buffer receives, and when: the exchange of step t runs at the start of t+1.

A patch-aware layer names its exchanged values with one of the names in `RULES`; the name says
how a device's local value becomes what its peers receive:

- `above`: this band's bottom rows, `ppermute`d to band j+1 (band 0 receives zeros);
- `below`: this band's top rows, `ppermute`d to band j-1 (the last band receives zeros);
- `k`, `v`: local keys/values `[B, L/n, C]`, `all_gather`ed along tokens to `[B, L, C]`;
- `moments`: local GroupNorm moments `[2, B, G]`, `all_gather`ed to `[n, 2, B, G]`.

(PCPP self-attention keeps its neighbours' edge tokens of K,V, stacked `[2, B, r, C]`, as
`above`/`below` too.)

Every step parks its layers' local values in the "outbox" collection (`store` in a synchronous
step, `send` in a displaced one); the state carried to the next step is that outbox. A
displaced step begins by exchanging it (`receive`): its collectives read only the state, never
this step's latents, so each can run while the layers before its reader compute, and the
carried state is the local values (1/n of the gathered K,V). Per buffer (default) or, with
`ctx.fused_exchange`, in one `ppermute` per direction and one `all_gather` per dtype (`flush`:
for hosts where collectives block and cost a fixed latency each, as CPU processes). `no_sync`
keeps what its last synchronous step received in "stale", frozen.
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


def store(module: nn.Module, ctx: PatchContext, local: dict, received: dict) -> None:
    """Synchronous step: keep what the displaced steps will read.

    Refreshing modes keep this step's `local` values in "outbox", exactly as a displaced step
    parks its sends: the next displaced step exchanges them at its start (`receive`).
    `no_sync` keeps the `received` values in "stale": frozen, never exchanged again.
    """
    target, values = (OUTBOX, local) if ctx.refresh_state else (STALE, received)
    if module.is_mutable_collection(target):
        for name, x in values.items():
            module.put_variable(target, name, x)


def send(module: nn.Module, ctx: PatchContext, **local: jax.Array) -> None:
    """Displaced step: park the layer's local values in "outbox" for step t+1 (`receive`
    exchanges them at its start); nothing is sent now, so nothing here waits on the link."""
    if ctx.refresh_state and module.is_mutable_collection(OUTBOX):
        for name, x in local.items():
            module.put_variable(OUTBOX, name, x)


def receive(outbox: Any, axis: str, n: int, fused: bool = False) -> dict:
    """Start of a displaced step: the previous step's outbox (nested dict of local values) ->
    the same tree as received ("stale"), one collective per buffer (each can finish while the
    layers before its reader compute), or, `fused`, a few concatenated ones (`flush`)."""
    if fused:
        return flush(outbox, axis, n)
    flat = traverse_util.flatten_dict(outbox)
    return traverse_util.unflatten_dict({p: exchange(p[-1], x, axis, n) for p, x in flat.items()})


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
