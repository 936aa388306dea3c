"""The device mesh `("data", "cfg", "patch")` and multi-host start-up."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from distrifusion_jax.parallel.config import ParallelConfig

# `patch` is innermost: consecutive devices (the fastest links, e.g. NVLink within a node)
# carry the per-layer halo and K,V exchange; `cfg` meets once per step, `data` never.
AXES = ("data", "cfg", "patch")


def make_mesh(parallel: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of shape `(data, cfg, patch)` over `devices` (default: all global devices).

    With fewer axis slots than devices the first `parallel.num_devices` devices are used
    (single process only: a multi-process mesh must cover every process's devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    need = parallel.num_devices
    if need > len(devices):
        raise ValueError(
            f"the parallel config needs {need} devices (data={parallel.data} x cfg="
            f"{parallel.cfg} x patch={parallel.patches}) but {len(devices)} are available; "
            f"lower --patches/--data or disable cfg split."
        )
    if need < len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"the parallel config uses {need} of {len(devices)} devices across "
            f"{jax.process_count()} processes; a multi-process mesh must use them all."
        )
    grid = np.array(devices[:need], dtype=object).reshape(parallel.data, parallel.cfg, parallel.patches)
    return Mesh(grid, AXES)


def shard(fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """`jax.shard_map` as every program of this package uses it.

    `check_vma=False`: the bodies return per-device values (each state leaf's own device slot,
    a band of eps) that JAX's varying-axes check cannot prove replicated or varying as the
    out_specs say (jax 0.10); the specs, written only in `parallel/step.py` and
    `sampling/sample.py`, are what we guarantee.
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# XLA options for programs that exchange bands (`exchange_compiler_options`). GPU: keep one
# collective per buffer (XLA's combiners would merge a step's exchanges into one that must
# finish before the first reader) and let all of them be in flight at once, so each finishes
# while the layers before its reader compute (measured in results/README.md, "Overlap").
_GPU_OPTIONS = {
    "xla_gpu_all_gather_combine_threshold_bytes": "0",
    "xla_gpu_collective_permute_combine_threshold_bytes": "0",
    "xla_gpu_experimental_parallel_collective_overlap_limit": "256",
}
# TPU: asynchronous, interleaved collectives (v5p/v6e otherwise run all-gathers synchronously).
_TPU_OPTIONS = {
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
    "xla_tpu_overlap_compute_collective_tc": "true",
    "xla_enable_async_all_gather": "true",
    "xla_enable_async_collective_permute": "true",
}


def exchange_compiler_options(mesh: Mesh) -> dict[str, str]:
    """The XLA options the library compiles its exchanging programs with, for the mesh's
    platform (none on CPU)."""
    platform = mesh.devices.flat[0].platform
    if platform in ("gpu", "cuda", "rocm"):
        return dict(_GPU_OPTIONS)
    if platform == "tpu":
        return dict(_TPU_OPTIONS)
    return {}


def initialize_distributed(
    coordinator: str,
    num_processes: int,
    process_id: int,
    *,
    init_timeout: int = 300,
    heartbeat_timeout: int = 100,
) -> None:
    """Join a multi-process run (`jax.distributed`); call before any other JAX use.

    JAX aborts the process (from C++) when the join or a heartbeat times out; `cli/supervise.py`
    turns that into a clean exit for the command line.

    Args:
      coordinator: `HOST:PORT` of process 0.
      num_processes: processes in the run.
      process_id: this process's index, 0 .. num_processes - 1.
      init_timeout: seconds to wait for every process to join.
      heartbeat_timeout: seconds without a heartbeat after which a process counts as dead.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"process id {process_id} is outside 0..{num_processes - 1}; give each process a "
            f"distinct --process-id below --num-processes."
        )
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=init_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )


def to_global(tree, mesh: Mesh, spec) -> object:
    """Place host values (identical on every process) as global arrays with `spec`.

    Works on one process and on many: each process materialises only its addressable shards.
    """
    from jax.sharding import NamedSharding

    sharding = NamedSharding(mesh, spec)

    def put(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(put, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array, on every process."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
