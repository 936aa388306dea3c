"""`convert(src, dst)`: a diffusers folder, a component folder or a single file -> DST (orbax).

DST is written into a temporary folder beside it and renamed into place at the end, so a
failed or interrupted run leaves neither DST nor the temporary folder, and `force=True`
replaces an existing DST only once the new one is complete. Components are converted one at a
time, each tensor cast to the target dtype as it is read; peak memory is about the largest
component's converted params plus one tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from distrifusion_jax.io import checkpoint, components, single_file
from distrifusion_jax.io.weights import find_weights, open_weights

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class UsageError(ValueError):
    """Bad arguments (exit code 2): the message says which flag or path to change."""


@dataclasses.dataclass
class Report:
    """What a conversion did: per component (params, bytes, seconds), copied and skipped folders."""

    dst: str
    dtype: str
    converted: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    copied: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"{name}: {int(r['params']):,} params, {r['bytes'] / 1e9:.3f} GB {self.dtype}, "
            f"{r['seconds']:.1f} s"
            for name, r in self.converted.items()
        ]
        out += [f"{name}: copied" for name in self.copied]
        out += [f"{name}: skipped ({why})" for name, why in self.skipped.items()]
        return out + [f"wrote {self.dst}"]


@dataclasses.dataclass
class _Job:
    """One component to convert: its config and a way to open its tensors."""

    name: str
    raw: dict[str, Any]
    open: Callable[[], Any]  # -> context manager yielding a TensorSource


def _plan(
    src: Path, variant: str | None, allow_pickle: bool, single: dict[str, Any]
) -> tuple[list[_Job], dict[str, Path], dict[str, str], dict[str, Any] | None]:
    """(jobs, folders to copy, skipped -> why, source model_index) for `src`; opens nothing big."""

    def folder_job(name: str, folder: Path) -> _Job:
        raw = components.read_config(folder)
        find_weights(folder, variant)  # fail before any work if there are no weights
        return _Job(name, raw, lambda: open_weights(folder, variant, allow_pickle))

    if src.is_file():
        with single_file.open_single_file(src, allow_pickle=allow_pickle, **single) as parts:
            configs = {name: raw for name, (raw, _) in parts.items()}
        jobs = [
            _Job(name, raw, _single_file_opener(src, name, allow_pickle, single))
            for name, raw in configs.items()
            if name in components.COMPONENTS
        ]
        # Tokenizers and the scheduler config can come from the --config folder.
        where = Path(single["config"]) if single.get("config") else None
        copied = {n: where / n for n in components.COPIED_FOLDERS if where and (where / n).is_dir()}
        skipped = {
            n: "not in a single file; pass --config with a diffusers folder that has it"
            for n in components.COPIED_FOLDERS
            if n not in copied
        }
        index = {"_class_name": "StableDiffusionXLPipeline"} if "text_encoder_2" in configs else {}
        return jobs, copied, skipped, index
    if checkpoint.read_manifest(src) is not None:
        raise UsageError(f"{src} is already converted; load it directly (load_unet, pipeline)")
    index_path = src / "model_index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except ValueError as e:
            raise ValueError(f"{index_path} is not valid JSON ({e}); restore it") from None
        jobs, copied, skipped = [], {}, {}
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list):
                continue  # metadata and pipeline options
            if entry == [None, None] or not entry:
                continue  # optional component left out
            folder = src / name
            converted_or_copied = name in components.COMPONENTS or name in components.COPIED_FOLDERS
            if converted_or_copied and not folder.is_dir():
                raise FileNotFoundError(
                    f"{index_path} lists {name!r} but {folder} is missing; "
                    "download the whole model folder"
                )
            if name in components.COMPONENTS:
                jobs.append(folder_job(name, folder))
            elif name in components.COPIED_FOLDERS:
                copied[name] = folder
            else:
                skipped[name] = f"{'/'.join(map(str, entry))}: no converter"
        return jobs, copied, skipped, index
    raw = components.read_config(src)  # raises: no config.json
    name = components.name_for(src, raw)
    return [folder_job(name, src)], {}, {}, None


def _single_file_opener(
    src: Path, name: str, allow_pickle: bool, single: dict[str, Any]
) -> Callable[[], Any]:
    @contextlib.contextmanager
    def opener() -> Iterator[Any]:
        with single_file.open_single_file(
            src, names=(name,), allow_pickle=allow_pickle, **single
        ) as parts:
            yield parts[name][1]

    return opener


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so `finally` blocks clean up (SIGINT already is)."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str = "float32",
    *,
    force: bool = False,
    variant: str | None = None,
    allow_pickle: bool = False,
    config: str | None = None,
    original_config: str | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Report:
    """Convert `src` into a new folder `dst` (see the module docstring).

    Args:
      src: diffusers model root (`model_index.json`), component folder (`unet/`), or a
        single-file original-layout `.safetensors`.
      dst: output folder; must not exist unless `force`.
      dtype: "float32", "bfloat16" or "float16" (params are cast as they are converted).
      force: replace an existing `dst` (after the new one is complete).
      variant: diffusers weights variant, e.g. "fp16" for `*.fp16.safetensors`.
      allow_pickle: read `.bin`/`.ckpt` pickles (they can run code when loaded).
      config: single files only: a diffusers folder with the model's config.json files.
      original_config: single files only: the original YAML (needed unless SDXL base or config).
      log: called with one line per finished step.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not src.exists():
        raise UsageError(
            f"SRC {src} does not exist; pass a diffusers model folder, a component folder "
            "such as unet/, or a single-file .safetensors"
        )
    if dst.exists() and not force:
        raise UsageError(f"DST {dst} already exists; pass --force to replace it, or another DST")
    src_abs, dst_abs = src.resolve(), dst.resolve()
    if dst_abs == src_abs or dst_abs in src_abs.parents or src_abs in dst_abs.parents:
        raise UsageError(f"DST {dst} and SRC {src} overlap; write DST somewhere else")

    single = {"config": config, "original_config": original_config}
    if src.is_dir() and (config or original_config):
        raise UsageError("--config and --original-config are for single-file checkpoints only")
    jobs, copied, skipped, index = _plan(src, variant, allow_pickle, single)
    if not jobs:
        raise ValueError(
            f"{src} has no component we can convert (supported: {sorted(components.COMPONENTS)})"
        )
    report = Report(str(dst), dtype, skipped=skipped)
    target_dtype = DTYPES[dtype]
    dst_abs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst_abs.name}.tmp-", dir=dst_abs.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; DST should not be
    try:
        with _signals_raise():
            converted = {}
            for job in jobs:
                t0 = time.perf_counter()
                comp = components.get(job.name)
                module = comp.make(job.raw, target_dtype)
                with job.open() as source:
                    params = components.convert_params(source, comp, module)
                out = tmp / job.name
                out.mkdir()
                (out / "config.json").write_text(json.dumps(job.raw, indent=2) + "\n")
                checkpoint.save_params(out / checkpoint.PARAMS, params)
                leaves = [a for a in _leaves(params)]
                del params
                report.converted[job.name] = {
                    "params": sum(math.prod(a.shape) for a in leaves),
                    "bytes": sum(a.nbytes for a in leaves),
                    "seconds": time.perf_counter() - t0,
                }
                del leaves
                converted[job.name] = type(module).__name__
                log(report.lines()[len(report.converted) - 1])
            for name, folder in copied.items():
                shutil.copytree(folder, tmp / name)
                report.copied.append(name)
            manifest = checkpoint.manifest(target_dtype, converted, str(src_abs), index)
            (tmp / checkpoint.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _commit(tmp, dst_abs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _leaves(tree: Mapping[str, Any]) -> Iterator[Any]:
    for v in tree.values():
        if isinstance(v, Mapping):
            yield from _leaves(v)
        else:
            yield v


def _commit(tmp: Path, dst: Path) -> None:
    """Rename the finished `tmp` to `dst`, replacing an existing `dst` only now."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / "x")
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old / "x", dst)  # put the old one back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
