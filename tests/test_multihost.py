"""Multi-host failures end cleanly (cli/supervise.py): a process that never joins, an unreachable
coordinator, and a peer killed mid-denoise each end every survivor within 60 s with the default
timeouts, one line on stderr naming what is missing, a non-zero exit, no stack trace on the
console and no PNG. Local processes on 127.0.0.1, one CPU device each, the shipped model."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrifusion_jax.cli import supervise
from distrifusion_jax.eval.launcher import free_port

REPO = Path(__file__).resolve().parents[1]
BOUND_S = 60.0  # the bound, default timeouts

NEVER_JOINED_LOG = """\
F1202 10:43:57.231401    2129 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded

RPC: /xla.coordination.CoordinationService/RegisterTask
*** Check failure stack trace: ***
"""
HEARTBEAT_LOG = """\
ValueError: UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] \
Connection closed by peer [127.0.0.1]:29057
F1202 10:45:25.221996    2768 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy \
(stopped sending heartbeats):
1, 3
The tasks have crashed. Check the task logs for an earlier error.
"""
LEADER_LOG = """\
F1202 10:51:04.476284    4759 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination \
service. Either the leader task was preempted/died/restarted unexpectedly or this task is \
experiencing network issues.
"""


def _peer(pid: int, n: int = 4) -> supervise.Peer:
    return supervise.Peer(f"127.0.0.1:{free_port()}", n, pid)


def test_diagnose_names_what_is_missing():
    joined = [{"event": "joined"}]
    gloo = {"event": "error", "message": "Gloo AllGather failed", "code": 1, "peer_failure": True}
    msg = supervise.diagnose(HEARTBEAT_LOG, [*joined, gloo], _peer(0), -6)
    assert "processes 1, 3 stopped responding" in msg and "process 0 of 4" in msg
    peer = _peer(2)
    msg = supervise.diagnose(LEADER_LOG, joined, peer, -6)
    assert f"lost the coordinator at {peer.coordinator}" in msg
    msg = supervise.diagnose(NEVER_JOINED_LOG, [], _peer(0), -6)
    assert "processes 1..3 did not join" in msg and "30 s" in msg
    peer = _peer(1)  # nothing listens on a fresh free port
    msg = supervise.diagnose(NEVER_JOINED_LOG, [], peer, None)
    assert f"nothing answers at the coordinator at {peer.coordinator}" in msg
    bad = {"event": "error", "message": "Unknown scheduler lms", "code": 2, "peer_failure": False}
    assert supervise.diagnose("", [*joined, bad], _peer(0), 2).endswith("Unknown scheduler lms")
    msg = supervise.diagnose("", [*joined, gloo], _peer(0), 1)
    assert "a collective failed" in msg
    assert "exit signal 9" in supervise.diagnose("", joined, _peer(0), -9)


def test_peer_failure_classification():
    assert supervise.looks_like_peer_failure(ValueError("UNKNOWN: Gloo AllGather failed: x"))
    assert supervise.looks_like_peer_failure(RuntimeError("UNAVAILABLE: Socket closed"))
    assert not supervise.looks_like_peer_failure(ValueError("Unknown scheduler lms"))
    assert not supervise.looks_like_peer_failure(MemoryError("RESOURCE_EXHAUSTED"))


def _start(port: int, pid: int, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "generate.py"),
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(pid),
        "--patches",
        "2",
        "--output",
        str(out),
        "--log-file",
        str(log),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device each
    with open(_stdout(out), "w") as stdout:
        return subprocess.Popen(
            cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
        )


def _stdout(out: Path) -> Path:
    return out.with_suffix(".stdout")


def _check_clean_failure(proc: subprocess.Popen, out: Path, log: Path, *expected: str) -> None:
    _, stderr = proc.communicate(timeout=BOUND_S)
    stdout = _stdout(out).read_text()
    assert proc.returncode == 1, (proc.returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in expected:
        assert text in lines[0], lines[0]
    for console in (stdout, stderr):
        assert "Traceback" not in console and "Check failure" not in console
    assert not out.exists() and not list(out.parent.glob("*.png*"))
    assert log.exists() and "Terminating process" in log.read_text()  # details in the log


@pytest.mark.slow
def test_missing_peer_and_unreachable_coordinator(tmp_path):
    """Process 0 whose peer never starts; process 1 whose coordinator never starts."""
    ports = free_port(), free_port()
    procs = [
        (
            _start(ports[pid], pid, tmp_path / f"p{pid}.png", tmp_path / f"p{pid}.log"),
            time.monotonic(),
        )
        for pid in (0, 1)
    ]
    expected = [
        ("process 1 did not join", f"127.0.0.1:{ports[0]}"),
        ("nothing answers", f"127.0.0.1:{ports[1]}"),
    ]
    for pid, (proc, started) in enumerate(procs):
        _check_clean_failure(
            proc, tmp_path / f"p{pid}.png", tmp_path / f"p{pid}.log", *expected[pid]
        )
        assert time.monotonic() - started <= BOUND_S


def _wait_for_steps(proc: subprocess.Popen, out: Path, timeout: float) -> None:
    """Read process 0's progress until a denoising step has finished."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = _stdout(out).read_text()
        if re.search(r"\| *[1-9]\d*/\d+ \[", seen):
            return
        assert proc.poll() is None, seen
        time.sleep(0.2)
    raise AssertionError(f"no denoising step within {timeout} s: {seen[-500:]}")


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_peer_killed_mid_denoise(tmp_path, victim):
    """kill -9 one process mid-denoise: the other names it (or the coordinator) and exits."""
    port = free_port()
    out = [tmp_path / f"k{pid}.png" for pid in (0, 1)]
    log = [tmp_path / f"k{pid}.log" for pid in (0, 1)]
    procs = [_start(port, pid, out[pid], log[pid], "--steps", "1000") for pid in (0, 1)]
    try:
        _wait_for_steps(procs[0], out[0], timeout=240)
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        survivor = procs[1 - victim]
        expected = (
            ("process 1 stopped responding",)
            if victim == 1
            else ("lost the coordinator", f"127.0.0.1:{port}")
        )
        _check_clean_failure(survivor, out[1 - victim], log[1 - victim], *expected)
        assert time.monotonic() - killed <= BOUND_S
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
