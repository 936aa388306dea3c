"""JAX's persistent compilation cache, on for the command line and one call away for library
users.

The first run of a program compiles it (tens of seconds for the shipped model's step programs on
CPU, minutes for full SDXL on GPUs); with the cache on, later runs with the same shapes, mesh and
flags load the executable from disk instead. `distrifusion-generate` turns it on by default in
`default_dir()` (`--compile-cache DIR` moves it, `--no-compile-cache` turns it off); in Python:

    from distrifusion_jax.compile_cache import enable_compile_cache
    enable_compile_cache()            # before the first compile; returns the folder
    pipe = DistriSDXLPipeline.from_pretrained(...)
"""

from __future__ import annotations

import os
from pathlib import Path


def default_dir() -> Path:
    """`$XDG_CACHE_HOME/distrifusion-jax/xla` (default `~/.cache/distrifusion-jax/xla`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distrifusion-jax" / "xla"


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Store every compiled program under `path` (default `default_dir()`) and reuse it.

    Every program is cached, however fast it compiled, so a repeated run compiles nothing.
    Returns the folder. Call before the programs are first compiled.
    """
    import jax

    folder = Path(path) if path is not None else default_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"compile cache folder {folder} cannot be created ({e.strerror}); pass "
            f"--compile-cache DIR with a writable folder or --no-compile-cache"
        ) from e
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
