"""Reading PyTorch-side tensors: safetensors (single, sharded, variants) and, on request, pickles.

Every source is a `TensorSource`: `keys()` and `read(key) -> np.ndarray`, one tensor at a time,
so a converter holds at most one source tensor besides what it has already converted.

Safetensors are read with `pread` into a fresh buffer rather than through an mmap: pages of a
mapping stay resident (and count in RSS) while the file is open, so converting a 5 GB file
through mmap peaks at file + params, while `pread` peaks at params + one tensor. The header is
validated by `safetensors.safe_open` (truncated or corrupt files fail there). numpy has no
bfloat16, so dtypes come from `ml_dtypes` (what JAX uses), which covers BF16 and the FP8 kinds.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    from typing_extensions import Self


class WeightsError(ValueError):
    """A weights file is missing, unreadable or not allowed; the message says how to fix it."""


class PickleRefused(WeightsError):
    """A pickle was found but `allow_pickle` is off (a usage error: the fix is a flag)."""


# safetensors dtype tag -> numpy dtype.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

# Weight file stems: diffusers models, then transformers models.
STEMS = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
PICKLE_NAMES = ("diffusion_pytorch_model", "pytorch_model", "model")

ALLOW_PICKLE_HINT = (
    "loading an untrusted pickle can run arbitrary code; convert it to .safetensors, "
    "or pass --allow-pickle if you trust the file"
)


class TensorSource:
    """Named tensors, read one at a time."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.read(key).shape)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile(TensorSource):
    """One `.safetensors` file; tensors are copied out with `pread` on `read`."""

    _fd = -1

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._header = _read_header(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key][1])

    def nbytes(self, key: str) -> int:
        begin, end = self._header[key][2]
        return end - begin

    def read(self, key: str) -> np.ndarray:
        dtype, shape, (begin, end) = self._header[key]
        buf = np.empty(end - begin, np.uint8)
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(self._fd, [view[done:]], begin + done)
            if got <= 0:
                raise WeightsError(
                    f"{self.path}: unexpected end of file reading {key!r}; "
                    "the file is truncated: download or save it again"
                )
            done += got
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def _read_header(path: Path) -> dict[str, tuple[np.dtype, list[int], tuple[int, int]]]:
    """Validated header: key -> (dtype, shape, absolute byte range)."""
    try:  # the reference parser validates header and sizes (it maps the file, reads nothing)
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise WeightsError(
            f"{path} is not a valid safetensors file ({e}); it is truncated or corrupt: "
            "download or save it again"
        ) from None
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out = {}
    for key, info in header.items():
        tag = info["dtype"]
        if tag not in DTYPES:
            raise WeightsError(f"{path}: tensor {key!r} has dtype {tag}, which we cannot read")
        begin, end = info["data_offsets"]
        out[key] = (DTYPES[tag], info["shape"], (8 + n + begin, 8 + n + end))
    return out


class ShardedSafetensors(TensorSource):
    """A `*.safetensors.index.json` and the shards its `weight_map` names."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = Path(index_path)
        try:
            weight_map = json.loads(self.path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(
                f"{self.path} is not a valid safetensors index ({type(e).__name__}: {e}); "
                "it needs a 'weight_map' of tensor name -> shard file"
            ) from None
        self._files: dict[str, SafetensorsFile] = {}
        missing = sorted({f for f in weight_map.values() if not (self.path.parent / f).is_file()})
        if missing:
            raise WeightsError(
                f"{self.path} names shard(s) that are not there: {', '.join(missing)}; "
                "download the missing shards"
            )
        for name in sorted(set(weight_map.values())):
            self._files[name] = SafetensorsFile(self.path.parent / name)
        held = {name: set(f.keys()) for name, f in self._files.items()}
        self._where: dict[str, SafetensorsFile] = {}
        for key, name in weight_map.items():
            if key not in held[name]:
                raise WeightsError(
                    f"{self.path}: {key!r} is mapped to {name}, which does not hold it; "
                    "the index and the shards do not match"
                )
            self._where[key] = self._files[name]

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


class PickleFile(TensorSource):
    """A torch pickle (`.bin`/`.ckpt`/`.pt`), loaded with `weights_only=True, mmap=True`."""

    def __init__(self, path: str | os.PathLike):
        import torch

        self.path = Path(path)
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds (UnpicklingError, ...)
            raise WeightsError(
                f"{self.path} could not be loaded as a torch checkpoint "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "it is corrupt or not a state dict"
            ) from None
        if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
            sd = sd["state_dict"]  # Lightning / original SD .ckpt
        self._sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def read(self, key: str) -> np.ndarray:
        return torch_to_numpy(self._sd[key])

    def close(self) -> None:
        self._sd = {}


class DictSource(TensorSource):
    """An in-memory `{key: array-like}` (numpy arrays or torch tensors)."""

    def __init__(self, tensors: Mapping[str, object]):
        self._d = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._d)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._d[key].shape)

    def read(self, key: str) -> np.ndarray:
        v = self._d[key]
        return v if isinstance(v, np.ndarray) else torch_to_numpy(v)


def torch_to_numpy(t: object) -> np.ndarray:
    """A CPU torch tensor as a numpy array (copied; bf16 via its bits, as numpy has none)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def open_file(path: str | os.PathLike, allow_pickle: bool = False) -> TensorSource:
    """One weights file by its suffix: `.safetensors`, `.safetensors.index.json`, or a pickle."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if name.endswith(".safetensors"):
        return SafetensorsFile(path)
    if _INDEX_RE.search(name):
        return ShardedSafetensors(path)
    if name.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise PickleRefused(f"{path} is a pickle: {ALLOW_PICKLE_HINT}")
        return PickleFile(path)
    raise WeightsError(
        f"{path}: unknown weights format; expected .safetensors, .safetensors.index.json, "
        f"or (with --allow-pickle) one of {', '.join(PICKLE_SUFFIXES)}"
    )


# `x.safetensors.index.json`, and a variant's index as diffusers/transformers name it
# (`x.safetensors.index.fp16.json`) or as some repos do (`x.fp16.safetensors.index.json`).
_INDEX_RE = re.compile(r"\.safetensors\.index(\.[^.]+)?\.json$")
_WEIGHTS_RE = re.compile(r"\.(safetensors|bin|ckpt|pt|pth)$|" + _INDEX_RE.pattern)
_VARIANT_RES = (
    # x.fp16.safetensors, x.fp16-00001-of-00002.safetensors
    re.compile(r"^[^.]+\.([^.]+?)(?:-\d+-of-\d+)?\.(?:safetensors|bin|ckpt|pt|pth)$"),
    re.compile(r"^[^.]+\.([^.]+)\.safetensors\.index\.json$"),  # x.fp16.safetensors.index.json
    re.compile(r"\.safetensors\.index\.([^.]+)\.json$"),  # x.safetensors.index.fp16.json
)


def _candidates(variant: str | None) -> Iterator[str]:
    """File names to try in a component folder, best first."""
    v = f".{variant}" if variant else ""
    for stem in STEMS:
        yield f"{stem}{v}.safetensors"
        yield f"{stem}.safetensors.index{v}.json"
        yield f"{stem}{v}.safetensors.index.json"
    for stem in PICKLE_NAMES:
        for suffix in PICKLE_SUFFIXES:
            yield f"{stem}{v}{suffix}"


def weight_files(folder: str | os.PathLike) -> list[str]:
    """Names of the files in `folder` that look like weights (for error messages)."""
    return sorted(p.name for p in Path(folder).iterdir() if _WEIGHTS_RE.search(p.name))


def variants(names: list[str]) -> list[str]:
    """The weights variants (`fp16`, ...) among file names."""
    return sorted({m.group(1) for n in names for r in _VARIANT_RES if (m := r.search(n))})


def find_weights(folder: str | os.PathLike, variant: str | None = None) -> Path:
    """The weights file of a diffusers/transformers component folder.

    Prefers safetensors over pickles and a single file over a sharded index. `variant="fp16"`
    selects `diffusion_pytorch_model.fp16.safetensors` and the like; without one, only the
    non-variant files count, and the error lists the variants that are there.
    """
    folder = Path(folder)
    for name in _candidates(variant):
        if (folder / name).is_file():
            return folder / name
    there = weight_files(folder)
    what = f"variant {variant!r} weights" if variant else "weights (without a variant)"
    hint = ""
    found_variants = [v for v in variants(there) if v != variant]
    if len(found_variants) == 1:
        hint = f"; pass --variant {found_variants[0]}"
    elif found_variants:
        hint = f"; pass --variant with one of {', '.join(found_variants)}"
    found = f"found: {', '.join(there)}" if there else "no weights files at all"
    raise WeightsError(f"no {what} in {folder} ({found}){hint}")


def open_weights(
    folder: str | os.PathLike, variant: str | None = None, allow_pickle: bool = False
) -> TensorSource:
    """Open the weights of a component folder (see `find_weights`)."""
    return open_file(find_weights(folder, variant), allow_pickle=allow_pickle)
