"""A component's expected parameter tree, remembered on disk between runs.

Loading a converted component checks the saved tree against the module's own
(`Component.target`: `jax.eval_shape` of `module.init`), which traces the whole model: about a
second of every `generate.py` start on the shipped model. The tree depends only on the
component's config, the dtype, this package's source and the JAX/Flax versions, so it is kept
in `$XDG_CACHE_HOME/distrifusion-jax/param-shapes/` under a hash of all of those; a change to any
of them, an unreadable entry or an unwritable folder just traces again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from distrifusion_jax.io.keys import flatten, unflatten

PACKAGE = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/distrifusion-jax/param-shapes` (default under `~/.cache`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distrifusion-jax" / "param-shapes"


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """Hash of every Python file of the package (the modules define the parameter names)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _key(name: str, raw: Mapping[str, Any], dtype: Any) -> str:
    import flax

    config = json.dumps(raw, sort_keys=True, default=str)
    parts = [name, config, jnp.dtype(dtype).name, jax.__version__, flax.__version__]
    parts.append(_source_digest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def expected_params(comp: Any, module: Any, raw: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """`comp.target(module)` (the param tree as `jax.ShapeDtypeStruct` leaves), from the cache
    when this config, dtype and source were seen before.

    Args:
      comp: the `components.Component` that built `module`.
      module: the Flax module.
      raw: the component's config.json, as read.
      dtype: the dtype the module was built with.
    """
    path = cache_dir() / f"{comp.name}-{_key(comp.name, raw, dtype)}.json"
    try:
        saved = json.loads(path.read_text())
        return unflatten(
            {
                tuple(k.split("/")): jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d))
                for k, (s, d) in saved.items()
            }
        )
    except (OSError, ValueError, TypeError, KeyError):
        pass
    target = comp.target(module)
    entry = {
        "/".join(p): [list(a.shape), jnp.dtype(a.dtype).name] for p, a in flatten(target).items()
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(entry, f)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only cache only costs the trace
    return target
