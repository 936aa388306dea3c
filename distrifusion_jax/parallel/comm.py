"""Count what a step exchanges, from its jaxpr (abstract shapes suffice: no weights needed).

Elements are counted as received by one interior device per step, the original's unit
(distrifuser Table 2): `all_gather` of s local elements over n devices receives (n-1)*s;
a `ppermute` receives its operand; `psum` over n devices moves 2(n-1)/n * s (ring).

A collective that repeats an earlier one (same primitive and parameters on a structurally equal
operand) counts once: XLA's common-subexpression elimination merges the two before they run.
That happens to the latent's halo rows, which the UNet's and every ControlNet's exact `conv_in`
each exchange in a `ControlledUNet`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from jax.extend import core


def sub_jaxprs(eqn):
    """The jaxprs nested in an equation (calls, shard_map, loops, conds)."""
    for v in eqn.params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item


def _axis_size(names, sizes: Mapping[str, int]) -> int:
    names = names if isinstance(names, (tuple, list)) else (names,)
    return math.prod(sizes[a] for a in names)


def _nbytes(aval) -> int:
    return math.prod(aval.shape) * aval.dtype.itemsize


def exchanged(jaxpr, axis_sizes: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Per collective kind and mesh axis: `{"all_gather@patch": {"elements": .., "bytes": ..,
    "calls": .., "by_dtype": {"float32": bytes, "int8": bytes, ..}}}` (the bytes split by the
    dtype moved: what a `compress` codec saves, measured).

    Args:
      jaxpr: a `jax.make_jaxpr(step)(...).jaxpr` (nested calls and shard_map are followed;
        loop bodies are counted once).
      axis_sizes: mesh axis name -> size.
    """
    totals: dict[str, Counter] = {}
    dtypes: dict[str, Counter] = {}
    ids: dict = {}  # `_cse_key` -> a small int (so keys of keys stay shallow to hash)

    def add(kind, elements, nbytes, dtype):
        c = totals.setdefault(kind, Counter())
        c["elements"] += elements
        c["bytes"] += nbytes
        c["calls"] += 1
        dtypes.setdefault(kind, Counter())[str(dtype)] += nbytes

    def ref(keys, v):  # what an equation reads: a value's key, an input, or a literal
        return keys.get(v, v) if isinstance(v, core.Var) else ("literal", repr(v))

    def walk(jx, keys):
        for eqn in jx.eqns:
            key = _cse_key(eqn, [ref(keys, v) for v in eqn.invars])
            if key is not None:
                repeat = key in ids
                k = ids.setdefault(key, len(ids))
                keys.update({v: (k, i) for i, v in enumerate(eqn.outvars)})
                if repeat:  # XLA merges it with the first one: nothing more runs
                    continue
            name = eqn.primitive.name
            if name in ("ppermute", "all_gather", "psum"):
                axes = eqn.params.get("axis_name", eqn.params.get("axes"))
                n = _axis_size(axes, axis_sizes)
                label = f"{name}@{'+'.join(axes) if isinstance(axes, (tuple, list)) else axes}"
                for v in eqn.invars:
                    size, nb = math.prod(v.aval.shape), _nbytes(v.aval)
                    factor = {"ppermute": 1, "all_gather": n - 1, "psum": 2 * (n - 1) / n}[name]
                    add(label, size * factor, nb * factor, v.aval.dtype)
            subs = list(sub_jaxprs(eqn))
            for sub in subs:
                inner = {}
                if name in _CALLS and len(subs) == 1 and len(sub.invars) == len(eqn.invars):
                    inner = {a: ref(keys, b) for a, b in zip(sub.invars, eqn.invars)}
                walk(sub, inner)
                if inner and len(sub.outvars) == len(eqn.outvars):  # the call's results
                    keys.update({a: ref(inner, b) for a, b in zip(eqn.outvars, sub.outvars)})

    walk(jaxpr, {})
    return {k: {**v, "by_dtype": dict(dtypes[k])} for k, v in totals.items()}


# Call-like primitives whose body's inputs are the equation's inputs, one to one (unlike loops).
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "shard_map", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint"})  # fmt: skip


def _cse_key(eqn, in_keys: list) -> tuple | None:
    """A hashable key equal for equations that compute the same values (same primitive,
    parameters and input keys); None where a parameter is not hashable or the equation has
    effects (never merged)."""
    if eqn.effects:
        return None
    try:
        params = tuple(sorted(eqn.params.items(), key=lambda kv: kv[0]))
        key = (eqn.primitive.name, params, tuple(in_keys))
        hash(key)
    except TypeError:
        return None
    return key


def bytes_by_dtype(kinds: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """`exchanged(...)` (or `compiled_exchange(...)["by_op"]`) -> bytes received per dtype,
    summed over the collective kinds."""
    total: Counter = Counter()
    for v in kinds.values():
        total.update(v.get("by_dtype", {}))
    return dict(total)
