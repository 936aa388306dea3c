"""Count what a step exchanges, from its jaxpr (abstract shapes suffice: no weights needed).

Elements are counted as received by one interior device per step, the original's unit
(distrifuser Table 2): `all_gather` of s local elements over n devices receives (n-1)*s;
a `ppermute` receives its operand; `psum` over n devices moves 2(n-1)/n * s (ring).
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

    def add(kind, elements, nbytes, dtype):
        c = totals.setdefault(kind, Counter())
        c["elements"] += elements
        c["bytes"] += nbytes
        c["calls"] += 1
        dtypes.setdefault(kind, Counter())[str(dtype)] += nbytes

    def walk(jx):
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name in ("ppermute", "all_gather", "psum"):
                axes = eqn.params.get("axis_name", eqn.params.get("axes"))
                n = _axis_size(axes, axis_sizes)
                label = f"{name}@{'+'.join(axes) if isinstance(axes, (tuple, list)) else axes}"
                for v in eqn.invars:
                    size, nb = math.prod(v.aval.shape), _nbytes(v.aval)
                    factor = {"ppermute": 1, "all_gather": n - 1, "psum": 2 * (n - 1) / n}[name]
                    add(label, size * factor, nb * factor, v.aval.dtype)
            for sub in sub_jaxprs(eqn):
                walk(sub)

    walk(jaxpr)
    return {k: {**v, "by_dtype": dict(dtypes[k])} for k, v in totals.items()}


def bytes_by_dtype(kinds: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """`exchanged(...)` (or `compiled_exchange(...)["by_op"]`) -> bytes received per dtype,
    summed over the collective kinds."""
    total: Counter = Counter()
    for v in kinds.values():
        total.update(v.get("by_dtype", {}))
    return dict(total)
