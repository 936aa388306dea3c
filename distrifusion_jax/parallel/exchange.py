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

With `ParallelConfig.compress` a codec (`parallel/codec.py`) codes the halo rows and K,V on the
way (GroupNorm moments stay exact): each buffer becomes a few parts that follow the buffer's
rule, and the receiver decodes them. A `residual+` codec codes the change since the last send
(`receive_residual`); its synchronous steps keep what they received in "stale" and what they
sent in "recon", exact, so the first displaced exchange sends a zero change.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from distrifusion_jax.parallel.codec import Codec
from distrifusion_jax.parallel.config import PatchContext
from distrifusion_jax.parallel.state import OUTBOX, RECON, STALE

# buffer name -> (collective, gather axis): "down"/"up" ppermute to band j+1 / j-1;
# "gather" all_gather, tiled along the given axis, or stacked on a new axis 0 (None).
RULES: dict[str, tuple[str, int | None]] = {
    "above": ("down", None),
    "below": ("up", None),
    "k": ("gather", 1),
    "v": ("gather", 1),
    "moments": ("gather", None),
}
CODED = ("above", "below", "k", "v")  # buffers a codec codes; GroupNorm moments stay exact

# (key, buffer name whose rule applies, local value): one array for `exchange_items`.
Item = tuple[Hashable, str, jax.Array]


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
    With a residual codec the coded buffers' `received` values also go to "stale" and their
    `local` ones to "recon": exact, the starting point of the coded changes.
    """
    target, values = (OUTBOX, local) if ctx.refresh_state else (STALE, received)
    if module.is_mutable_collection(target):
        for name, x in values.items():
            module.put_variable(target, name, x)
    if ctx.parallel.residual and module.is_mutable_collection(RECON):
        for name in sorted(set(local) & set(CODED)):
            module.put_variable(STALE, name, received[name])
            module.put_variable(RECON, name, local[name])


def send(module: nn.Module, ctx: PatchContext, **local: jax.Array) -> None:
    """Displaced step: park the layer's local values in "outbox" for step t+1 (`receive`
    exchanges them at its start); nothing is sent now, so nothing here waits on the link."""
    if ctx.refresh_state and module.is_mutable_collection(OUTBOX):
        for name, x in local.items():
            module.put_variable(OUTBOX, name, x)


def receive(
    outbox: Any, axis: str, n: int, fused: bool = False, codec: Codec | None = None
) -> dict:
    """Start of a displaced step: the previous step's outbox (nested dict of local values) ->
    the same tree as received ("stale"), one collective per buffer (each can finish while the
    layers before its reader compute), or, `fused`, a few concatenated ones (`flush`).
    `codec` (not residual): the coded buffers travel as its parts and are decoded on arrival."""
    flat = traverse_util.flatten_dict(outbox)
    if codec is None:
        got = exchange_items([(p, p[-1], x) for p, x in flat.items()], axis, n, fused)
        return traverse_util.unflatten_dict(got)
    coded = {p: codec.encode(x) for p, x in flat.items() if p[-1] in CODED}
    got = exchange_items(_items(flat, coded), axis, n, fused)
    received = {}
    for p, x in flat.items():
        if p in coded:
            parts = {k: got[p + (k,)] for k in coded[p]}
            received[p] = codec.decode(parts, x.shape[-1], x.dtype)
        else:
            received[p] = got[p]
    return traverse_util.unflatten_dict(received)


def receive_state(state: Any, ctx: PatchContext) -> tuple[dict, dict]:
    """Start of a displaced step: its input state -> (what its layers read as "stale", the
    collections it carries besides the outbox: with a residual codec the new "stale" of the
    coded buffers and "recon", else none), by `ctx.parallel`'s `compress` and `fused_exchange`.
    """
    pc = ctx.parallel
    codec = Codec.parse(pc.compress) if pc.compress is not None else None
    if not pc.residual:
        return receive(state[OUTBOX], ctx.axis, ctx.n, pc.fused_exchange, codec), {}
    received, recon = receive_residual(
        state[OUTBOX], state[STALE], state[RECON], ctx.axis, ctx.n, pc.fused_exchange, codec
    )
    flat = traverse_util.flatten_dict(received)
    kept = traverse_util.unflatten_dict({p: x for p, x in flat.items() if p[-1] in CODED})
    return received, {STALE: kept, RECON: recon}


def receive_residual(
    outbox: Any, stale: Any, recon: Any, axis: str, n: int, fused: bool, codec: Codec
) -> tuple[dict, dict]:
    """`receive` with error feedback: the coded buffers send `encode(x - r)`.

    Args:
      outbox: this device's local values of the previous step (nested dict).
      stale: what this device received in the last exchange, for the coded buffers (shapes as
        received: gathered K,V `[B, L, C]`, halo rows as sent).
      recon: what the peers have rebuilt of this device's coded buffers so far (`r`, local
        shapes): every receiver adds the same decoded changes, so `r` is the sender's slice of
        their "stale".

    Returns:
      (received: the whole tree, as `receive` gives it, with the coded buffers
      `stale + decode(change)`; the new recon, `r + decode(encode(x - r))`). The error of a
      received value is the last change's coding error alone: it does not accumulate.
    """
    flat = traverse_util.flatten_dict(outbox)
    old, r = traverse_util.flatten_dict(stale), traverse_util.flatten_dict(recon)
    coded = {
        p: codec.encode(x.astype(jnp.float32) - r[p].astype(jnp.float32))
        for p, x in flat.items()
        if p[-1] in CODED
    }
    got = exchange_items(_items(flat, coded), axis, n, fused)
    received, new_recon = {}, {}
    for p, x in flat.items():
        if p not in coded:
            received[p] = got[p]
            continue
        c, dt = x.shape[-1], x.dtype
        parts = {k: got[p + (k,)] for k in coded[p]}
        received[p] = (old[p].astype(jnp.float32) + codec.decode(parts, c)).astype(dt)
        new_recon[p] = (r[p].astype(jnp.float32) + codec.decode(coded[p], c)).astype(dt)
    return traverse_util.unflatten_dict(received), traverse_util.unflatten_dict(new_recon)


def _items(flat: dict, coded: dict) -> list[Item]:
    """The arrays to exchange: each coded buffer's parts (keys `path + (part,)`, the buffer's
    rule), the other buffers as they are."""
    items = []
    for p, x in flat.items():
        if p in coded:
            items += [(p + (k,), p[-1], a) for k, a in coded[p].items()]
        else:
            items.append((p, p[-1], x))
    return items


def flush(outbox: Any, axis: str, n: int) -> dict:
    """Exchange a step's whole outbox: nested dict of local values -> the same tree received.

    Buffers are flattened and concatenated per (collective, dtype), so a step issues at most
    one `ppermute` per direction and one `all_gather` per dtype.
    """
    flat = traverse_util.flatten_dict(outbox)
    got = exchange_items([(p, p[-1], x) for p, x in flat.items()], axis, n, fused=True)
    return traverse_util.unflatten_dict(got)


def exchange_items(items: list[Item], axis: str, n: int, fused: bool) -> dict:
    """`(key, name, x)` items -> {key: what this device receives of x under name's rule}: one
    collective per item, or (`fused`) one per (collective, dtype) over the concatenated items."""
    if not fused:
        return {key: exchange(name, x, axis, n) for key, name, x in items}
    groups: dict[tuple[str, Any], list[Item]] = {}
    for key, name, x in items:
        groups.setdefault((RULES[name][0], x.dtype), []).append((key, name, x))
    received = {}
    for (kind, _), group in groups.items():
        packed = jnp.concatenate([x.reshape(-1) for _, _, x in group])
        if kind == "gather":
            packed = jax.lax.all_gather(packed, axis)  # [n, total]
        else:
            packed = shift_rows(packed, axis, n, down=kind == "down")
        offset = 0
        for key, name, x in group:
            part = jax.lax.slice_in_dim(packed, offset, offset + x.size, axis=packed.ndim - 1)
            offset += x.size
            received[key] = _unpack(part, x.shape, name, n)
    return received


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
