"""eval/launcher.py: result lines, and two local processes reporting back."""

import sys

import pytest

from distrifusion_jax.eval.launcher import RESULT_PREFIX, free_port, launch, parse_result

WORKER = (
    "import sys; from distrifusion_jax.eval.launcher import emit_result; "
    "print('noise'); emit_result({'id': int(sys.argv[1])})"
)


def test_parse_result_takes_the_last_line():
    log = f'x\n{RESULT_PREFIX}{{"a": 1}}\ny\n{RESULT_PREFIX}{{"a": 2}}\n'
    assert parse_result(log) == {"a": 2}
    assert parse_result("no result here") is None


def test_free_port_is_usable():
    assert 0 < free_port() < 65536


def test_launch_collects_each_process():
    results, wall = launch(lambda i: [sys.executable, "-c", WORKER, str(i)], 2, timeout=120)
    assert results == [{"id": 0}, {"id": 1}] and wall > 0


def test_launch_reports_a_failed_process():
    with pytest.raises(RuntimeError, match=r"process 1 \(rc 3\)"):
        launch(
            lambda i: [sys.executable, "-c", f"import sys; sys.exit({3 * i})"],
            2,
            timeout=120,
            name="demo",
        )
