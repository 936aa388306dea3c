"""Parity of our Flax UNet with diffusers' PyTorch UNet on the same randomized weights.

The pieces `scripts/parity_fullsize.py` and `tests/test_fullsize.py` share:
  - `torch_config(name)`: the diffusers UNet configs compared ("tiny", "mid", "full");
  - `randomize_`: every torch parameter perturbed (norm scales and zero-initialised layers too);
  - `make_inputs`: seeded inputs (NCHW latent, timestep, text, SDXL micro-conditioning), one
    dict per sample;
  - `torch_forward` / `flax_forward`: per sample, the output and the outputs of named submodules
    (torch via forward hooks, ours via `capture_intermediates`), float32 numpy, NHWC images;
  - `compare`: relative L2 (pooled over the samples) and max |diff| per submodule, in execution
    order, and end to end;
  - `run_parity`: the staged run (torch, save, convert with the CLI, load, ours) behind both.

Submodules are named by their diffusers path (`down_blocks.1.attentions.0`); ours are the same
path with list indices joined by `_` (`down_blocks_1/attentions_0`). `depth` picks how deep:
1 = blocks (`down_blocks.i`, `mid_block`, `up_blocks.i`, `conv_in`, ...), 2 = resnets,
attentions, samplers, 3 = transformer blocks and the layers inside a Transformer2DModel.

bf16: both sides use the same bf16 weights (round to nearest even), and rounding the weights
alone moves the output about as much as all the activation roundings together, identically on
both sides. One sample's verdict then turns on how the activation error happens to line up
with that shared part (we saw cosines of -0.25 and +0.18 at full size), so the error is pooled
over several samples (`samples`), and the activation part alone is measured against a third
reference, torch fp32 run with the bf16-rounded weights ("torch fp32 w16").
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Sample k gets noise seed `seed + k` and timestep TIMESTEPS[k % 4].
TIMESTEPS = (500.0, 999.0, 250.0, 750.0)

# SDXL topology at toy widths (tests/tiny.py TINY_SDXL_UNET_CONFIG: 8 groups, head dim 16).
TINY = {
    "sample_size": 32,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 6 * 8 + 32 (pooled)
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

Outputs = tuple[np.ndarray, dict[str, np.ndarray]]  # (output NHWC, {submodule path: output})


def torch_config(name: str) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel` kwargs: "tiny", "mid" (SDXL widths, 2 transformer
    layers at the deepest level instead of 10; 0.87B params) or "full" (SDXL base, 2.57B)."""
    from distrifusion_jax.models.unet_config import sdxl_base

    if name == "tiny":
        return dict(TINY)
    full = sdxl_base().to_dict()
    if name == "full":
        return full
    if name == "mid":
        return dict(full, transformer_layers_per_block=[1, 2, 2])
    raise ValueError(f"unknown parity config {name!r}; use tiny, mid or full")


def pooled_dim(config: Mapping[str, Any]) -> int:
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def randomize_(module: Any, seed: int = 0, bias_std: float = 0.1) -> Any:
    """Overwrite every parameter with seeded random values, in place (as `tests/tiny.py`).

    Weights with a fan-in get N(0, 1/fan_in); norm scales 1 + N(0, 0.1^2); biases
    N(0, bias_std^2), so nothing is zero and activations stay O(1) through the UNet.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(bias_std * noise)
            del noise
    return module.eval()


def build_torch_unet(config: Mapping[str, Any], seed: int = 0) -> Any:
    """diffusers `UNet2DConditionModel(**config)`, fp32, every parameter randomized."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**config), seed)


def make_inputs(
    config: Mapping[str, Any], hw: tuple[int, int] = (32, 32), samples: int = 1, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """One dict of seeded float32 inputs per sample (batch 1): `sample` NCHW `[1, 4, H, W]`,
    `timesteps` `[1]`, `encoder_hidden_states` `[1, 77, D]`, and for SDXL `text_embeds`
    `[1, P]` and `time_ids` `[1, 6]` (a square crop of the latent's pixel size)."""
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    out = []
    for k in range(samples):
        rng = np.random.default_rng(seed + k)
        f32 = lambda *s, rng=rng: rng.standard_normal(s).astype(np.float32)
        x = {
            "sample": f32(1, config.get("in_channels", 4), *hw),
            "timesteps": np.full((1,), TIMESTEPS[k % len(TIMESTEPS)], np.float32),
            "encoder_hidden_states": f32(1, 77, cross),
        }
        if config.get("addition_embed_type") == "text_time":
            x["text_embeds"] = f32(1, pooled_dim(config))
            x["time_ids"] = np.array([[8 * hw[0], 8 * hw[1], 0, 0, 8 * hw[0], 8 * hw[1]]], "f4")
        out.append(x)
    return out


def _collapse(name: str) -> tuple[str, ...]:
    """`down_blocks.1.attentions.0` -> `("down_blocks_1", "attentions_0")`."""
    return tuple(re.sub(r"\.(\d+)", r"_\1", name).split("."))


def _to_numpy(value: Any) -> np.ndarray:
    """First tensor of a module output, float32 numpy, NCHW images as NHWC."""
    import torch

    while not isinstance(value, torch.Tensor):
        value = value[0]  # tuples (down blocks) and diffusers output classes
    a = value.detach().float().cpu().numpy()
    return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def torch_forward(
    model: Any, inputs: Sequence[Mapping[str, np.ndarray]], depth: int = 1
) -> list[Outputs]:
    """Run the torch UNet (in its parameters' dtype) on each sample: (output NHWC, {path:
    output}) with the collapsed diffusers paths of the submodules at most `depth` deep, in the
    order they finish (first call only), as float32 numpy."""
    import torch

    dtype = next(model.parameters()).dtype
    seen: dict[str, np.ndarray] = {}
    hooks = []
    for name, mod in model.named_modules():
        parts = _collapse(name) if name else ()
        if not parts or len(parts) > depth:
            continue
        key = "/".join(parts)

        def hook(_m, _args, out, key=key):
            if key not in seen:
                seen[key] = _to_numpy(out)

        hooks.append(mod.register_forward_hook(hook))
    results = []
    try:
        for x in inputs:
            t = lambda k, x=x: torch.from_numpy(np.asarray(x[k])).to(dtype)
            cond = None
            if "text_embeds" in x:
                cond = {"text_embeds": t("text_embeds"), "time_ids": t("time_ids")}
            seen.clear()
            with torch.no_grad():
                out = model(
                    t("sample"),
                    torch.from_numpy(np.asarray(x["timesteps"])),
                    t("encoder_hidden_states"),
                    added_cond_kwargs=cond,
                ).sample
            results.append((_to_numpy(out), dict(seen)))
    finally:
        for h in hooks:
            h.remove()
    return results


def flax_forward(
    module: Any, params: Any, inputs: Sequence[Mapping[str, np.ndarray]], depth: int = 1
) -> list[Outputs]:
    """Run our UNet (one jit) on each sample; as `torch_forward`."""
    import jax
    import jax.numpy as jnp

    def keep(mdl: Any, method: str) -> bool:
        return method == "__call__" and 0 < len(mdl.path) <= depth

    @jax.jit
    def run(params, sample, t, ctx, cond):
        return module.apply(
            {"params": params},
            sample,
            t,
            ctx,
            cond,
            capture_intermediates=keep,
            mutable=["intermediates"],
        )

    results = []
    for x in inputs:
        cast = lambda k, x=x: jnp.asarray(x[k], module.dtype)
        cond = None
        if "text_embeds" in x:
            cond = {"text_embeds": cast("text_embeds"), "time_ids": jnp.asarray(x["time_ids"])}
        sample = cast("sample").transpose(0, 2, 3, 1)
        out, state = run(
            params, sample, jnp.asarray(x["timesteps"]), cast("encoder_hidden_states"), cond
        )
        seen = {}
        for path, leaf in _call_outputs(state["intermediates"]):
            while isinstance(leaf, (tuple, list)):
                leaf = leaf[0]
            seen["/".join(path)] = np.asarray(leaf, np.float32)
        results.append((np.asarray(out, np.float32), seen))
    return results


def _call_outputs(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable:
    for k, v in tree.items():
        if k == "__call__":
            yield prefix, v
        elif isinstance(v, Mapping):
            yield from _call_outputs(v, prefix + (k,))


def errors(ours: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict[str, Any]:
    """Pooled over samples, in float64: rel_l2 `sqrt(sum ||ours - ref||^2 / sum ||ref||^2)`,
    max_abs `max |ours - ref|`, and each sample's relative L2 (`per_sample`)."""
    d2 = r2 = 0.0
    mx, per = 0.0, []
    for a, b in zip(ours, ref, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
        dd, bb = float(np.sum((a - b) ** 2)), float(np.sum(b**2))
        d2, r2 = d2 + dd, r2 + bb
        mx = max(mx, float(np.max(np.abs(a - b))))
        per.append(math.sqrt(dd / bb))
    return {"rel_l2": math.sqrt(d2 / r2), "max_abs": mx, "per_sample": per}


def compare(ours: Sequence[Outputs], ref: Sequence[Outputs]) -> dict[str, dict[str, Any]]:
    """{path: errors} for every submodule both ran (reference order), then "output"."""
    rows = {}
    for path in ref[0][1]:
        if path in ours[0][1]:
            rows[path] = errors([o[1][path] for o in ours], [r[1][path] for r in ref])
    rows["output"] = errors([o[0] for o in ours], [r[0] for r in ref])
    return rows


def worst(rows: Mapping[str, Mapping[str, float]]) -> tuple[str, float]:
    """The submodule (not the output) with the largest relative L2, and that error."""
    inner = {k: v["rel_l2"] for k, v in rows.items() if k != "output"}
    k = max(inner, key=inner.get)
    return k, inner[k]


def save_outputs(path: Any, results: Sequence[Outputs]) -> None:
    arrays = {}
    for k, (out, seen) in enumerate(results):
        arrays[f"{k}:output"] = out
        arrays.update({f"{k}:m:{p}": v for p, v in seen.items()})
    np.savez(path, **arrays)


def load_outputs(path: Any) -> list[Outputs]:
    with np.load(path) as z:
        n = 1 + max(int(f.split(":")[0]) for f in z.files)
        return [
            (
                z[f"{k}:output"],
                {f.split(":", 2)[2]: z[f] for f in z.files if f.startswith(f"{k}:m:")},
            )
            for k in range(n)
        ]


def _quiet_diffusers() -> Any:
    """Silence diffusers' warning on `.to(bf16)` (this UNet has nothing to keep in fp32)."""
    import contextlib

    from diffusers.utils import logging

    @contextlib.contextmanager
    def quiet():
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            yield
        finally:
            logging.set_verbosity(level)

    return quiet()


# ---- the staged run: torch -> save -> convert (CLI) -> ours ------------------------------------

# Torch runs, in this order (casts are in place): fp32; bf16; fp32 again, on the weights the bf16
# cast rounded ("w16": the reference that isolates activation rounding).
TORCH_RUNS = {"fp32": "float32", "bf16": "bfloat16", "fp32_w16": "float32"}
LABELS = {
    "ours fp32 vs torch fp32": ("ours_float32", "torch_fp32"),
    "ours bf16 vs torch fp32": ("ours_bfloat16", "torch_fp32"),
    "torch bf16 vs torch fp32": ("torch_bf16", "torch_fp32"),
    "ours bf16 vs torch fp32 w16": ("ours_bfloat16", "torch_fp32_w16"),
    "torch bf16 vs torch fp32 w16": ("torch_bf16", "torch_fp32_w16"),
}


def run_parity(
    name: str,
    workdir: Any,
    dtypes: Iterable[str] = ("float32", "bfloat16"),
    depth: int = 1,
    hw: tuple[int, int] = (32, 32),
    samples: int = 4,
    seed: int = 0,
    keep_weights: bool = False,
    redo_ours: bool = False,
    precision: str = "highest",
    log: Any = print,
) -> dict[str, Any]:
    """Compare our UNet with diffusers' on config `name` (see `torch_config`), fp32 and bf16.

    Stages, each skipped when its output is already in `workdir` (delete it to redo):
      1. torch: build and randomize the diffusers UNet (fp32), `save_pretrained` it to
         `workdir/unet` (safetensors), run it (`TORCH_RUNS`, `torch_*.npz`), free it;
      2. convert: `python -m distrifusion_jax.cli.convert workdir/unet workdir/flax`;
      3. ours: `load_unet(workdir/flax, dtype)` and run it, one dtype at a time
         (`ours_float32.npz`, `ours_bfloat16.npz`), freeing the params in between.
    The weights (`unet/`, `flax/`) are deleted at the end unless `keep_weights`; `redo_ours`
    reruns stage 3 (after a change to our model). Our matmuls and convs run at `precision`
    (`jax.default_matmul_precision`; "highest" is full fp32 on every backend).

    Returns the run's settings and "rows": {label: compare rows} for the `LABELS` whose runs
    were asked for (bf16 rows only with "bfloat16" in `dtypes`).
    """
    import gc
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    config = torch_config(name)
    inputs = make_inputs(config, hw, samples, seed)
    src, dst = work / "unet", work / "flax"
    dtypes = tuple(dtypes)
    key = {"config": name, "hw": list(hw), "samples": samples, "seed": seed, "depth": depth}
    key["precision"] = precision
    meta_path = work / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta and {k: meta.get(k) for k in key} != key:
        raise ValueError(f"{work} holds a run of {meta}, not {key}; use another workdir")
    files = {f"torch_{r}": work / f"torch_{r}.npz" for r in TORCH_RUNS}
    files.update({f"ours_{d}": work / f"ours_{d}.npz" for d in dtypes})
    for d in dtypes if redo_ours else ():
        files[f"ours_{d}"].unlink(missing_ok=True)
    runs = ["fp32"] + (["bf16", "fp32_w16"] if "bfloat16" in dtypes else [])
    torch_todo = [r for r in runs if not files[f"torch_{r}"].exists()]
    ours_todo = [d for d in dtypes if not files[f"ours_{d}"].exists()]
    need_src = bool(ours_todo) and not dst.is_dir() and not src.is_dir()
    if torch_todo or need_src:
        import torch

        log(f"[{name}] torch: building and randomizing the diffusers UNet")
        model = build_torch_unet(config, seed)
        meta = dict(key, params=sum(p.numel() for p in model.parameters()))
        meta_path.write_text(json.dumps(meta))
        if need_src:
            model.save_pretrained(src, safe_serialization=True)
            log(f"[{name}] torch: {meta['params']:,} params saved to {src}")
        for run in runs if torch_todo else ():
            with _quiet_diffusers():
                model.to(getattr(torch, TORCH_RUNS[run]))
            if run in torch_todo:
                log(f"[{name}] torch: running {run} on {samples} samples")
                save_outputs(files[f"torch_{run}"], torch_forward(model, inputs, depth))
        del model
        gc.collect()
    if ours_todo and not dst.is_dir():
        log(f"[{name}] convert: {src} -> {dst}")
        cmd = [sys.executable, "-m", "distrifusion_jax.cli.convert", str(src), str(dst)]
        subprocess.run(cmd, check=True)
    for dtype in ours_todo:
        import jax
        import jax.numpy as jnp

        from distrifusion_jax.io.checkpoint import load_unet

        log(f"[{name}] ours: loading and running {dtype} on {samples} samples")
        module, params = load_unet(dst, getattr(jnp, dtype))
        with jax.default_matmul_precision(precision):
            save_outputs(files[f"ours_{dtype}"], flax_forward(module, params, inputs, depth))
        del module, params
        jax.clear_caches()
        gc.collect()
    loaded = {k: load_outputs(f) for k, f in files.items() if f.exists()}
    rows = {}
    for label, (a, b) in LABELS.items():
        if a in loaded and b in loaded and (a.startswith("ours") or "bfloat16" in dtypes):
            rows[label] = compare(loaded[a], loaded[b])
    ours = next(iter(rows.values()))  # our submodules (torch has more, e.g. conv_act)
    rows = {label: {k: v for k, v in r.items() if k in ours} for label, r in rows.items()}
    if not keep_weights:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    return {**meta, "rows": rows}
