"""Per-device cost of one displaced step from abstract shapes (no weights, no device memory).

FLOPs come from XLA's cost analysis of the lowered program (per device under shard_map),
exchanged elements from the step's jaxpr (`comm.exchanged`), stale-state bytes from
`jax.eval_shape` of the synchronous step that creates the state. Optionally (`compile=True`)
the step is compiled too: the collectives XLA actually emits are counted from the compiled HLO
(`compiled_exchange`) and its memory analysis gives the peak bytes per device. Beside them,
`analytic_exchange` applies the algorithm's formulas to the shapes each parallel layer sees.
A `ControlledUNet`'s step is costed with its ControlNets (`step_cost(..., control=images)`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.parallel.attention import KVExchange, pcpp_tokens
from distrifusion_jax.parallel.comm import exchanged
from distrifusion_jax.parallel.config import ParallelConfig
from distrifusion_jax.parallel.conv import PatchConv, halo_rows
from distrifusion_jax.parallel.groupnorm import PatchGroupNorm
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.state import carried_bytes, state_shapes
from distrifusion_jax.parallel.step import make_decode, make_encode, make_step
from distrifusion_jax.platform import attention_traced_as


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One device, one displaced step."""

    flops: float
    exchanged_elements: float  # received by an interior device
    exchanged_bytes: float
    state_bytes: int  # carried between steps by one device (not the cached text K,V)
    by_kind: dict[str, dict[str, float]]
    analytic_elements: dict[str, float] = dataclasses.field(default_factory=dict)
    compiled: dict[str, Any] | None = None  # compiled_exchange(...) and "peak_bytes"


def _flops(lowered) -> float:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def step_cost(
    model: nn.Module,
    params: Any,
    parallel: ParallelConfig,
    latents: jax.ShapeDtypeStruct,
    cond: dict[str, jax.ShapeDtypeStruct],
    devices=None,
    compile: bool = False,
    control: tuple[jax.ShapeDtypeStruct, ...] | None = None,
) -> StepCost:
    """Cost of the displaced step of `parallel` (the synchronous step when n = 1).

    Args:
      model: the UNet module (a `ControlledUNet` when `control` is given).
      params: param tree (arrays or `jax.ShapeDtypeStruct`s).
      latents: `[B, H, W, C]` shape.
      cond: conditioning shapes with a leading `[G, B]`; with `control`, `control_scales`
        `[G, B, K]` is added (fp32) unless given.
      devices: devices for the mesh (fake CPU devices suffice: nothing is executed).
      compile: also compile the step, for `compiled_exchange` and the peak bytes (slow at
        full SDXL size).
      control: the K ControlNets' conditioning images, one `[B, H*f, W*f, C_k]` each (split by
        rows like the latents): their ControlNets run in the step and are costed with it.
    """
    mesh = make_mesh(parallel, devices)
    t = jax.ShapeDtypeStruct((), jnp.float32)
    g = jax.ShapeDtypeStruct((), jnp.float32)
    if control is not None:
        control = tuple(control)
        scales = jax.ShapeDtypeStruct(
            cond["encoder_hidden_states"].shape[:2] + (len(control),), jnp.float32
        )  # [G, B, K]
        cond = {"control_scales": scales, **cond}
    sync = make_step(model, parallel, mesh, displaced=False)
    state = state_shapes(sync, params, {}, latents, t, cond, g, control)
    displaced = parallel.context(displaced=True) is not None
    step = make_step(model, parallel, mesh, displaced=displaced) if displaced else sync
    args = (params, state if displaced else {}, latents, t, cond, g, control)
    with attention_traced_as("xla"):  # every attention FLOP counted (no loop body once)
        flops = _flops(make_step(model, parallel, mesh, displaced=displaced).lower(*args))
    lowered = step.lower(*args)
    kinds = exchanged(jax.make_jaxpr(step)(*args).jaxpr, dict(mesh.shape))
    compiled_stats = None
    if compile:
        compiled = lowered.compile()
        compiled_stats = compiled_exchange(compiled.as_text())
        compiled_stats["peak_bytes"] = peak_bytes(compiled)
    return StepCost(
        flops=flops,
        exchanged_elements=sum(k["elements"] for k in kinds.values()),
        exchanged_bytes=sum(k["bytes"] for k in kinds.values()),
        state_bytes=carried_bytes(state) if displaced else 0,
        by_kind=kinds,
        analytic_elements=analytic_exchange(step, args),
        compiled=compiled_stats,
    )


def vae_cost(
    vae: nn.Module,
    params: Any,
    parallel: ParallelConfig,
    x: jax.ShapeDtypeStruct,
    method: str,
    devices=None,
) -> dict[str, Any]:
    """Exchange of the band-parallel VAE `encode` or `decode` (exact, once per image).

    Args:
      vae: the AutoencoderKL module.
      params: its param tree (arrays or `jax.ShapeDtypeStruct`s).
      x: `encode`: pixels `[B, H, W, 3]`; `decode`: latents `[B, H/f, W/f, C]`.
      method: "encode" (`make_encode`: img2img, inpainting) or "decode" (`make_decode`).

    Returns:
      {"exchanged_elements", "exchanged_bytes" (from the jaxpr), "by_kind", "analytic_elements"
      (the formulas of `analytic_exchange`), "compiled_exchange" (from the compiled HLO)}: what
      one interior device receives in one call.
    """
    if method not in ("encode", "decode"):
        raise ValueError(f"method must be 'encode' or 'decode'; got {method!r}")
    mesh = make_mesh(parallel, devices)
    fn = (make_encode if method == "encode" else make_decode)(vae, parallel, mesh)
    args = (params, x)
    kinds = exchanged(jax.make_jaxpr(fn)(*args).jaxpr, dict(mesh.shape))
    compiled = compiled_exchange(fn.lower(*args).compile().as_text())
    return {
        "exchanged_elements": sum(k["elements"] for k in kinds.values()),
        "exchanged_bytes": sum(k["bytes"] for k in kinds.values()),
        "by_kind": kinds,
        "analytic_elements": analytic_exchange(fn, args),
        "compiled_exchange": compiled,
    }


def analytic_exchange(step, args) -> dict[str, float]:
    """Elements one interior device receives per step, by layer kind, from the formulas.

    Traces `step(*args)` abstractly and, for every parallel layer it calls with its local input
    shape: a conv with kernel k > 1 on a band `[B, h, W, C]` receives its halo rows from the
    two neighbours, `(above + below) * B * W * C` (`halo_rows`: 1 + 1 for a 3x3 conv, 1 + 0 for
    a 3x3 stride-2 conv); self-attention receives the other n - 1 bands' K and V, `(n - 1) *
    (|k| + |v|)` for local `k, v` `[B, L/n, C]` (under PCPP, in a displaced step, r tokens of K
    and V from each of the two neighbours, `2 * r * B * 2C`); GroupNorm receives the other
    bands' moments `(n - 1) * 2 * B * G`. A layer that exchanges nothing in this step's mode
    counts zero. Exact convs that read the same input (the latent, in the `conv_in` of a UNet
    and of each of its ControlNets) send the same rows: they count once, as XLA merges them.
    """
    counts: Counter = Counter()
    exact_inputs: dict[tuple, Any] = {}  # (id of the input, halo rows, dtype) -> the input

    def record(next_fun, fargs, kwargs, context):
        m = context.module
        ctx = getattr(m, "patch", None)
        if context.method_name != "__call__" or ctx is None or ctx.n == 1:
            return next_fun(*fargs, **kwargs)
        sends = ctx.sync_exchange or ctx.refresh_state
        if isinstance(m, PatchConv) and m.kernel_size > 1 and (sends or m.exact):
            b, h, w, c = fargs[0].shape
            above, below = halo_rows(m.kernel_size, m.stride, m.padding, h)
            key = (id(fargs[0]), above, below, m.dtype)
            if not (m.exact and key in exact_inputs):
                counts["conv halo rows"] += (above + below) * b * w * c
            if m.exact:
                exact_inputs[key] = fargs[0]  # kept alive: its id stays its own
        elif isinstance(m, KVExchange) and sends:
            k, v = fargs[:2]
            if ctx.pcpp is not None and not ctx.sync_exchange:  # r tokens from each neighbour
                r = pcpp_tokens(ctx.pcpp, k.shape[1])
                counts["self-attention K,V"] += 2 * r * k.shape[0] * (k.shape[2] + v.shape[2])
            else:
                counts["self-attention K,V"] += (ctx.n - 1) * (
                    math.prod(k.shape) + math.prod(v.shape)
                )
        elif isinstance(m, PatchGroupNorm) and (
            ctx.sync_groupnorm or ctx.rule.groupnorm != "local"
        ):
            counts["groupnorm moments"] += (ctx.n - 1) * 2 * fargs[0].shape[0] * m.num_groups
        return next_fun(*fargs, **kwargs)

    with jax.disable_jit(), nn.intercept_methods(record):  # a cached trace would not call us
        jax.eval_shape(step, *args)
    return dict(counts)


_COLLECTIVE = re.compile(
    r"= (?P<type>\(?[^=]*?\)?) (?P<op>all-gather|collective-permute|all-reduce|all-to-all|"
    r"reduce-scatter)(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(?P<dtype>pred|bf16|f8e\d+m\d+\w*|[suf]\d+)\[(?P<dims>[\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=(?:\{\{(?P<list>[\d,]+)\}|\[\d+,(?P<iota>\d+)\])")


def compiled_exchange(hlo_text: str) -> dict[str, Any]:
    """Collectives in compiled HLO text and what one interior device receives per call.

    all-gather to a result of s elements over groups of n: (n-1)/n * s; collective-permute:
    its result; all-reduce of s: 2(n-1)/n * s (ring); all-to-all, reduce-scatter: (n-1)/n * s.
    Async `-start` ops count their last array (the output buffer). Loop bodies count once.

    Returns:
      {"elements": float, "bytes": float, "calls": int, "by_op": {op: {"elements", "bytes",
      "calls", "by_dtype": {numpy dtype name: bytes}}}} (dtype names as `comm.exchanged`'s)
    """
    by_op: dict[str, Counter] = {}
    by_dtype: dict[str, Counter] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        arrays = list(_ARRAY.finditer(m["type"]))
        if m["start"]:
            arrays = arrays[-1:]
        groups = _GROUPS.search(line)
        n = 1
        if groups:
            n = len(groups["list"].split(",")) if groups["list"] else int(groups["iota"])
        factor = {
            "all-gather": (n - 1) / n,
            "collective-permute": 1.0,
            "all-reduce": 2 * (n - 1) / n,
        }.get(m["op"], (n - 1) / n)
        c = by_op.setdefault(m["op"], Counter())
        for a in arrays:
            size = math.prod(int(d) for d in a["dims"].split(",") if d)
            name, bits = _hlo_dtype(a["dtype"])
            c["elements"] += factor * size
            c["bytes"] += factor * size * bits / 8
            by_dtype.setdefault(m["op"], Counter())[name] += factor * size * bits / 8
        c["calls"] += 1
    return {
        "elements": float(sum(c["elements"] for c in by_op.values())),
        "bytes": float(sum(c["bytes"] for c in by_op.values())),
        "calls": int(sum(c["calls"] for c in by_op.values())),
        "by_op": {k: {**v, "by_dtype": dict(by_dtype.get(k, {}))} for k, v in by_op.items()},
    }


def _hlo_dtype(name: str) -> tuple[str, int]:
    """HLO element type -> (numpy dtype name, bits): `f32` -> ("float32", 32), `s8` ->
    ("int8", 8), `bf16` -> ("bfloat16", 16), `f8e4m3fn` -> ("float8_e4m3fn", 8)."""
    if name == "pred":
        return "bool", 8
    if name == "bf16":
        return "bfloat16", 16
    if name.startswith("f8"):
        return "float8_" + name[2:], 8
    bits = int(name[1:])
    return {"s": "int", "u": "uint", "f": "float"}[name[0]] + str(bits), bits


def peak_bytes(compiled) -> int | None:
    """Peak bytes per device from XLA's memory analysis: arguments + outputs + temporaries -
    aliased (donated) buffers; None where the backend gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without the analysis
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
