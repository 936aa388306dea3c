"""The step's state: variable collections carried from one denoising step to the next.

- `STALE`: what patch-aware layers read from step t-1 (conv halo rows, self-attention K,V,
  GroupNorm moments): received at the start of a displaced step (`no_sync` carries it, frozen);
- `OUTBOX`: each step's local values for its peers, carried to the next step, which exchanges
  them at its start (`exchange.receive`);
- `TEXT_KV`: the cross-attention K,V of the text, computed in the first step and read after;
- `RECON`: with a residual codec (`ParallelConfig.compress="residual+..."`), what the peers
  have rebuilt of this device's sends so far (local shape, as the outbox); `STALE` is then
  carried too (the receiver adds the decoded change to it).

Outside `shard_map` every leaf has a leading axis with one slot per device.
"""

from __future__ import annotations

from typing import Any

import jax

STALE = "stale"
OUTBOX = "outbox"
TEXT_KV = "text_kv"
RECON = "recon"

State = dict[str, Any]


def state_bytes(state: State) -> int:
    """Bytes held by ONE device (leaves carry a leading device axis)."""
    return sum(a.size // a.shape[0] * a.dtype.itemsize for a in jax.tree.leaves(state))


def carried_bytes(state: State) -> int:
    """Bytes ONE device carries between steps for the exchange (outbox or frozen stale
    buffers, and with a residual codec the received and rebuilt ones; not the cached text
    K,V)."""
    return state_bytes({k: v for k, v in state.items() if k != TEXT_KV})


def state_shapes(step, *args) -> State:
    """The state `step(*args) -> (eps, state)` returns, as shapes (`jax.ShapeDtypeStruct`):
    traced abstractly, nothing runs (e.g. the input of a displaced step)."""
    return jax.eval_shape(step, *args)[1]
