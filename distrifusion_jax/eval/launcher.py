"""Local multi-process runs: a free port for the `jax.distributed` coordinator, worker processes
pinned to cores, and the JSON result each worker prints.

A worker ends with `emit_result({...})`; the launcher reads the last such line of each process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

RESULT_PREFIX = "WORKER_RESULT "


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def coordinator_address() -> str:
    """`127.0.0.1:PORT` with a free port."""
    return f"127.0.0.1:{free_port()}"


def emit_result(result: Mapping[str, Any]) -> None:
    """Print this worker's result as the one line the launcher collects."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(log: str) -> dict[str, Any] | None:
    """The last result line of a worker's output, or None if it printed none."""
    lines = [ln for ln in log.splitlines() if ln.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else None


def pinned(argv: Sequence[str], core: int | None) -> list[str]:
    """`argv` under `taskset -c core` where taskset exists and a core is given."""
    pin = shutil.which("taskset")
    return [pin, "-c", str(core), *argv] if pin and core is not None else list(argv)


def launch(
    argv: Callable[[int], Sequence[str]],
    processes: int,
    *,
    env: Mapping[str, str] | None = None,
    cores: Sequence[int] | None = None,
    timeout: float = 600.0,
    cwd: str | os.PathLike | None = None,
    name: str = "run",
) -> tuple[list[dict[str, Any]], float]:
    """Start `processes` local processes at once and wait for all of them.

    Args:
      argv: process id -> its command line (e.g. with `--process-id i` and a shared
        `coordinator_address()`).
      processes: how many.
      env: their environment (default: this process's).
      cores: core of each process (pinned with `taskset -c` when available); None: not pinned.
      timeout: seconds to wait for each process.
      cwd: their working directory.
      name: the run's name in errors.
    Returns:
      (each process's `emit_result` dict in process order, wall seconds)
    Raises:
      RuntimeError: a process failed or printed no result; the message holds each one's log tail.
      subprocess.TimeoutExpired: a process ran past `timeout` (all of them are killed).
    """
    procs = []
    for i in range(processes):
        cmd = pinned(argv(i), cores[i] if cores is not None else None)
        procs.append(
            subprocess.Popen(
                cmd,
                env=dict(env) if env is not None else None,
                cwd=None if cwd is None else str(cwd),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    t0 = time.perf_counter()
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:  # a worker waiting on a dead peer would wait forever
            p.kill()
        raise
    wall = time.perf_counter() - t0
    results = [parse_result(log) for log in logs]
    if any(p.returncode != 0 or r is None for p, r in zip(procs, results)):
        tails = "\n".join(
            f"--- process {i} (rc {p.returncode}):\n{log[-2500:]}"
            for i, (p, log) in enumerate(zip(procs, logs))
        )
        raise RuntimeError(f"{name} failed:\n{tails}")
    return results, wall
