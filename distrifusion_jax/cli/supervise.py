"""Multi-host runs that end cleanly: a supervisor process around each worker.

`jax.distributed` ends a run it considers broken (a peer that never joins, an unreachable
coordinator, a peer that stops sending heartbeats) by aborting the whole process from C++: exit
134 and a native stack trace, after `initialization_timeout` (300 s by default) or
`heartbeat_timeout_seconds` (100 s). That cannot be caught in Python. So with `--coordinator`,
the command runs itself as a *worker* child process and waits for it:

- the worker's stderr (JAX's and XLA's logs, tracebacks) goes to a log file; its stdout (progress,
  "wrote ...") is the console's;
- the worker reports events on a pipe: `joined` once `jax.distributed` is up, `error` with a
  one-line message for failures it can name itself, `done`;
- the supervisor turns the worker's end into one line on stderr naming what is missing (which
  process, which address) and an exit code: 0 done, 1 run failure, 2 bad input; it kills a worker
  that has not joined `init_timeout + JOIN_GRACE_S` seconds after it started;
- the worker dies with its supervisor (Linux `PR_SET_PDEATHSIG`), so killing either ends both.

Output files are written atomically by the worker (temporary file, then rename), so a failure
never leaves a partial PNG.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STATUS_FD_ENV = "DISTRIFUSION_STATUS_FD"  # set in a worker: the pipe it reports events on
SUPERVISOR_PID_ENV = "DISTRIFUSION_SUPERVISOR_PID"
JOIN_GRACE_S = 20.0  # worker start-up (imports) before its join deadline counts
PEER_GRACE_S = 10.0  # after a collective fails: time for the heartbeat check to name the peer
DEFAULT_INIT_TIMEOUT_S = 30
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


@dataclass(frozen=True)
class Peer:
    """This process's place in a multi-process run.

    coordinator: `HOST:PORT` of process 0's coordination service.
    init_timeout: seconds every process has to join (after its start-up).
    heartbeat_timeout: seconds without a heartbeat after which a process counts as dead.
    """

    coordinator: str
    num_processes: int
    process_id: int
    init_timeout: int = DEFAULT_INIT_TIMEOUT_S
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S

    def others(self) -> str:
        """The other processes, as words: "process 1", "processes 1..3"."""
        ids = [i for i in range(self.num_processes) if i != self.process_id]
        return _processes(ids)


def _processes(ids: Sequence[int]) -> str:
    ids = sorted(ids)
    if len(ids) == 1:
        return f"process {ids[0]}"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"processes {ids[0]}..{ids[-1]}"
    return "processes " + ", ".join(map(str, ids))


# --- worker side -------------------------------------------------------------------------------


def is_worker() -> bool:
    """True in a worker started by `supervise`."""
    return STATUS_FD_ENV in os.environ


def report(event: str, **fields: object) -> None:
    """Send an event to the supervisor (no-op outside a worker)."""
    fd = os.environ.get(STATUS_FD_ENV)
    if fd is None:
        return
    line = json.dumps({"event": event, **fields}) + "\n"
    with contextlib.suppress(OSError):
        os.write(int(fd), line.encode())


def die_with_supervisor() -> None:
    """Have the kernel kill this worker when its supervisor dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ.get(SUPERVISOR_PID_ENV, os.getppid())):
        os._exit(1)  # the supervisor died before the request took effect


def looks_like_peer_failure(error: BaseException) -> bool:
    """Whether an exception is a collective or coordination failure (a peer may be gone)."""
    text = f"{type(error).__name__}: {error}"
    return bool(
        re.search(r"Gloo|NCCL|MPI|Connection (closed|reset|refused)|UNAVAILABLE|DEADLINE", text)
    )


def exit_worker(code: int, message: str, *, peer_failure: bool, peer: Peer) -> None:
    """End a worker after a failure without JAX's exit-time shutdown barrier (which would wait for
    or abort on the missing peer). `message` goes to the supervisor; after a suspected peer failure
    the worker first waits for the heartbeat check to name the dead process (it aborts the worker,
    and the supervisor reads the name from the log)."""
    report("error", message=message, code=code, peer_failure=peer_failure)
    sys.stdout.flush()
    sys.stderr.flush()
    if peer_failure:
        time.sleep(peer.heartbeat_timeout + PEER_GRACE_S)
    os._exit(code)


# --- supervisor side ---------------------------------------------------------------------------


def default_log_path(peer: Peer) -> Path:
    """Where a worker's log goes unless `--log-file` says otherwise."""
    import tempfile

    port = peer.coordinator.rsplit(":", 1)[-1]
    return Path(tempfile.gettempdir()) / f"distrifusion-{port}-process{peer.process_id}.log"


def coordinator_reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to `HOST:PORT` opens."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def diagnose(log: str, events: Sequence[dict], peer: Peer, returncode: int | None) -> str:
    """One line saying why a worker ended without `done`.

    Args:
      log: the worker's log (its stderr).
      events: the events it reported, in order.
      peer: its place in the run.
      returncode: its exit status (negative: killed by that signal; None: killed by the
        supervisor after the join deadline).
    """
    joined = any(e.get("event") == "joined" for e in events)
    errors = [e for e in events if e.get("event") == "error"]
    where = f"the coordinator at {peer.coordinator}"
    me = f"process {peer.process_id} of {peer.num_processes}"
    unhealthy = re.search(r"stopped sending heartbeats\):\s*\n?\s*([\d,\s]+?)\s*\n", log)
    if unhealthy:
        ids = [int(i) for i in re.findall(r"\d+", unhealthy.group(1))]
        return (
            f"{me}: {_processes(ids)} stopped responding (heartbeats stopped: it died or its "
            f"host is unreachable); run stopped"
        )
    if re.search(r"leader task was preempted|Failed to send RPC to coordination service", log):
        return f"{me}: lost {where} (process 0 died or its host became unreachable); run stopped"
    if errors and not errors[-1].get("peer_failure"):
        return f"{me}: {errors[-1]['message']}"
    if not joined:
        if peer.process_id == 0:
            return (
                f"{me}: {peer.others()} did not join {where} within {peer.init_timeout} s; start "
                f"every process with --coordinator {peer.coordinator} --num-processes "
                f"{peer.num_processes} and a distinct --process-id (or raise --init-timeout)"
            )
        if not coordinator_reachable(peer.coordinator):
            return (
                f"{me}: nothing answers at {where} (process 0 not started, wrong address, or a "
                f"firewall) after {peer.init_timeout} s; start process 0 first or fix "
                f"--coordinator"
            )
        return (
            f"{me}: {where} answers but the run did not start within {peer.init_timeout} s; "
            f"some other process is missing, or --num-processes / --process-id disagree"
        )
    if errors:
        return f"{me}: a collective failed ({errors[-1]['message']}); a peer may have died"
    how = f"signal {-returncode}" if returncode is not None and returncode < 0 else returncode
    return f"{me}: the worker ended unexpectedly (exit {how})"


def _read_events(fd: int, events: list[dict]) -> None:
    with os.fdopen(fd, "rb") as pipe:
        for line in pipe:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))


def supervise(argv: Sequence[str], peer: Peer, log_path: Path, *, keep_log: bool) -> int:
    """Run `python -m distrifusion_jax.cli.generate ARGV` as a worker and return its exit code,
    printing one line on stderr if it failed (see the module docstring).

    Args:
      argv: the command's arguments (the same the supervisor got).
      peer: this process's place in the run.
      log_path: the worker's log; removed after a successful run unless `keep_log`.
    """
    read_fd, write_fd = os.pipe()
    env = {
        **os.environ,
        STATUS_FD_ENV: str(write_fd),
        SUPERVISOR_PID_ENV: str(os.getpid()),
        "PYTHONUNBUFFERED": "1",
    }
    events: list[dict] = []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distrifusion_jax.cli.generate", *argv],
            stderr=log,
            env=env,
            pass_fds=(write_fd,),
        )
    os.close(write_fd)
    reader = threading.Thread(target=_read_events, args=(read_fd, events), daemon=True)
    reader.start()
    deadline = time.monotonic() + peer.init_timeout + JOIN_GRACE_S
    returncode: int | None = None
    try:
        while True:
            try:
                returncode = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                joined = any(e.get("event") == "joined" for e in events)
                if not joined and time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    break
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        proc.kill()
        print("interrupted", file=sys.stderr)
        return 130
    reader.join(timeout=5)
    if returncode == 0 and any(e.get("event") == "done" for e in events):
        if not keep_log:
            log_path.unlink(missing_ok=True)
        return 0
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    print(f"error: {diagnose(text, events, peer, returncode)} (log: {log_path})", file=sys.stderr)
    errors = [e for e in events if e.get("event") == "error"]
    return 2 if errors and errors[-1].get("code") == 2 else 1
