"""Mode labels of the benchmarks: `MODE` or `MODE+fused` -> `ParallelConfig` fields (no JAX)."""

from __future__ import annotations

from distrifusion_jax.parallel.config import MODES

FUSED = "fused"  # last step's parked values exchanged in a few concatenated collectives


def mode_fields(label: str) -> dict[str, str | bool]:
    """`{"mode": MODE, "fused_exchange": bool}` of a label such as `corrected_async_gn+fused`.

    Raises:
      ValueError: an unknown mode or option; the message names the fix.
    """
    mode, _, option = label.partition("+")
    if mode not in MODES or option not in ("", FUSED):
        raise ValueError(
            f"unknown mode {label!r}: use one of {list(MODES)}, optionally with "
            f"'+{FUSED}' (e.g. corrected_async_gn+{FUSED})"
        )
    return {"mode": mode, "fused_exchange": option == FUSED}
