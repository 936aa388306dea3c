"""Per-device cost of one displaced step from abstract shapes (no weights, no device memory).

FLOPs come from XLA's cost analysis of the lowered program (per device under shard_map),
exchanged elements from the step's jaxpr (`comm.exchanged`), stale-state bytes from
`jax.eval_shape` of the synchronous step that creates the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.parallel.comm import exchanged
from distrifusion_jax.parallel.config import ParallelConfig
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.step import make_step, state_bytes


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One device, one displaced step."""

    flops: float
    exchanged_elements: float  # received by an interior device
    exchanged_bytes: float
    state_bytes: int  # stale buffers held by one device (not the cached text K,V)
    by_kind: dict[str, dict[str, float]]


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
) -> StepCost:
    """Cost of the displaced step of `parallel` (the synchronous step when n = 1).

    Args:
      model: the UNet module.
      params: param tree (arrays or `jax.ShapeDtypeStruct`s).
      latents: `[B, H, W, C]` shape.
      cond: conditioning shapes with a leading `[G, B]`.
      devices: devices for the mesh (fake CPU devices suffice: nothing is executed).
    """
    mesh = make_mesh(parallel, devices)
    t = jax.ShapeDtypeStruct((), jnp.float32)
    g = jax.ShapeDtypeStruct((), jnp.float32)
    sync = make_step(model, parallel, mesh, displaced=False)
    _, state = jax.eval_shape(sync, params, {}, latents, t, cond, g)
    displaced = parallel.patches > 1 and parallel.mode != "naive_patch"
    step = make_step(model, parallel, mesh, displaced=displaced) if displaced else sync
    args = (params, state if displaced else {}, latents, t, cond, g)
    flops = _flops(step.lower(*args))
    kinds = exchanged(jax.make_jaxpr(step)(*args).jaxpr, dict(mesh.shape))
    return StepCost(
        flops=flops,
        exchanged_elements=sum(k["elements"] for k in kinds.values()),
        exchanged_bytes=sum(k["bytes"] for k in kinds.values()),
        state_bytes=state_bytes(state.get("stale", {})) if displaced else 0,
        by_kind=kinds,
    )
