"""Mode labels of the benchmarks: `MODE[+fused][:CODEC]` -> `ParallelConfig` fields (no JAX)."""

from __future__ import annotations

from distrifusion_jax.parallel.config import MODES, parse_compress

FUSED = "fused"  # last step's parked values exchanged in a few concatenated collectives


def mode_fields(label: str) -> dict[str, str | bool | None]:
    """`{"mode": MODE, "fused_exchange": bool, "compress": CODEC | None}` of a label such as
    `corrected_async_gn+fused` or `corrected_async_gn+fused:residual+int4` (the displaced
    exchange coded with `parallel/codec.py`'s CODEC).

    Raises:
      ValueError: an unknown mode, option or codec; the message names the fix.
    """
    head, colon, codec = label.partition(":")
    mode, _, option = head.partition("+")
    if mode not in MODES or option not in ("", FUSED) or (colon and not codec):
        raise ValueError(
            f"unknown mode {label!r}: use one of {list(MODES)}, optionally with "
            f"'+{FUSED}' and ':CODEC' (e.g. corrected_async_gn+{FUSED}:residual+int4)"
        )
    if codec:
        parse_compress(codec)  # names the codecs
    return {"mode": mode, "fused_exchange": option == FUSED, "compress": codec or None}
