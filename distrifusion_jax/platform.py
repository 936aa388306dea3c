"""The platform a program is traced for, which picks per-backend kernels (attention, conv).

Normally `jax.default_backend()`. Ahead-of-time compiles for accelerators that are not here
(`aot/compile.py`) trace on a CPU host: they wrap tracing in `traced_for("cuda")` (or "tpu") so
the program gets the kernels of its target, not the CPU's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)


def trace_platform() -> str:
    """"cpu", "gpu"/"cuda", "tpu", ...: the target being traced for."""
    import jax

    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def traced_for(platform: str) -> Iterator[None]:
    """Trace (and lower) for `platform` inside this block."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
