"""The platform a program is traced for, which picks per-backend kernels (attention, conv).

Normally `jax.default_backend()`. Ahead-of-time compiles for accelerators that are not here
(`aot/compile.py`) trace on a CPU host: they wrap tracing in `traced_for("cuda")` (or "tpu") so
the program gets the kernels of its target, not the CPU's. Cost counting wraps tracing in
`attention_traced_as("xla")`: XLA's cost analysis counts a loop's body once, so the looped CPU
and long-sequence attention kernels would hide most attention FLOPs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)
_ATTENTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention", default=None)


def trace_platform() -> str:
    """ "cpu", "gpu"/"cuda", "tpu", ...: the target being traced for."""
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


def forced_attention() -> str | None:
    """The attention implementation `attention_traced_as` forces here (None: not forced)."""
    return _ATTENTION.get()


@contextlib.contextmanager
def attention_traced_as(impl: str) -> Iterator[None]:
    """Inside this block, attention with impl "auto" traces `impl` ("xla", "chunked",
    "blocked"; `models.attention_ops`), before the DISTRIFUSION_ATTENTION override."""
    token = _ATTENTION.set(impl)
    try:
        yield
    finally:
        _ATTENTION.reset(token)
