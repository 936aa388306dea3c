"""Parity of our Flax UNet with diffusers' PyTorch UNet on the same randomized weights.

The pieces `scripts/parity_fullsize.py` and `tests/test_fullsize.py` share:
  - `torch_config(name)`: the diffusers UNet configs compared ("tiny", "mid", "full");
  - `randomize_`: every torch parameter perturbed (norm scales and zero-initialised layers too);
  - `make_inputs`: seeded inputs (NCHW latent, timestep, text, SDXL micro-conditioning);
  - `torch_forward` / `flax_forward`: the output and the outputs of named submodules (torch via
    forward hooks, ours via `capture_intermediates`), both as float32 numpy, NHWC for images;
  - `compare`: relative L2 and max |diff| per submodule (execution order) and end to end.

Submodules are named by their diffusers path (`down_blocks.1.attentions.0`); ours are the same
path with list indices joined by `_` (`down_blocks_1/attentions_0`). `depth` picks how deep:
1 = blocks (`down_blocks.i`, `mid_block`, `up_blocks.i`, `conv_in`, ...), 2 = resnets,
attentions, samplers, 3 = transformer blocks and the layers inside a Transformer2DModel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

TIMESTEP = 500.0
POOLED_DIM = 1280  # SDXL's pooled text embedding (projection input 2816 = 1280 + 6 * 256)

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


def randomize_(
    module: Any, seed: int = 0, bias_std: float = 0.1, bias_mean: float = 0.0
) -> Any:
    """Overwrite every parameter with seeded random values, in place (as `tests/tiny.py`).

    Weights with a fan-in get N(0, 1/fan_in); norm scales 1 + N(0, 0.1^2); biases
    N(bias_mean, bias_std^2), so nothing is zero and activations stay O(1) through the UNet.
    `bias_mean` > 0 shifts every channel the same way, so that means build up along the
    residual streams, as in trained models: GroupNorm then sees groups whose mean is large
    against their spread.
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
                p.copy_(bias_mean + bias_std * noise)
            del noise
    return module.eval()


def build_torch_unet(config: Mapping[str, Any], seed: int = 0, bias_mean: float = 0.0) -> Any:
    """diffusers `UNet2DConditionModel(**config)`, fp32, every parameter randomized."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**config), seed, bias_mean=bias_mean)


def make_inputs(
    config: Mapping[str, Any], hw: tuple[int, int] = (32, 32), batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded float32 inputs: `sample` NCHW, `timesteps` [B], `encoder_hidden_states`
    [B, 77, D], and for SDXL `text_embeds` [B, P], `time_ids` [B, 6]."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    out = {
        "sample": f32(batch, config.get("in_channels", 4), *hw),
        "timesteps": np.full((batch,), TIMESTEP, np.float32),
        "encoder_hidden_states": f32(batch, 77, cross),
    }
    if config.get("addition_embed_type") == "text_time":
        out["text_embeds"] = f32(batch, pooled_dim(config))
        ids = [8 * hw[0], 8 * hw[1], 0, 0, 8 * hw[0], 8 * hw[1]]
        out["time_ids"] = np.tile(np.array(ids, np.float32), (batch, 1))
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
    model: Any, inputs: Mapping[str, np.ndarray], depth: int = 1, dtype: Any = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run the torch UNet (in `dtype`, default its own); (output NHWC, {path: output}).

    Paths are the collapsed diffusers names (`down_blocks_1/attentions_0`) of every submodule
    at most `depth` deep, in execution order (first call only), as float32 numpy.
    """
    import torch

    dtype = dtype or next(model.parameters()).dtype
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
    t = lambda k: torch.from_numpy(np.asarray(inputs[k])).to(dtype)
    cond = None
    if "text_embeds" in inputs:
        cond = {"text_embeds": t("text_embeds"), "time_ids": t("time_ids")}
    try:
        with torch.no_grad():
            out = model(
                t("sample"),
                torch.from_numpy(np.asarray(inputs["timesteps"])),
                t("encoder_hidden_states"),
                added_cond_kwargs=cond,
            ).sample
    finally:
        for h in hooks:
            h.remove()
    return _to_numpy(out), seen


def flax_forward(
    module: Any, params: Any, inputs: Mapping[str, np.ndarray], depth: int = 1
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run our UNet (jit); (output NHWC, {path: output}) as `torch_forward`, float32 numpy."""
    import jax
    import jax.numpy as jnp

    def keep(mdl: Any, method: str) -> bool:
        return method == "__call__" and 0 < len(mdl.path) <= depth

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

    cast = lambda k: jnp.asarray(inputs[k], module.dtype)
    sample = cast("sample").transpose(0, 2, 3, 1)
    cond = None
    if "text_embeds" in inputs:
        cond = {"text_embeds": cast("text_embeds"), "time_ids": jnp.asarray(inputs["time_ids"])}
    out, state = jax.jit(run)(
        params, sample, jnp.asarray(inputs["timesteps"]), cast("encoder_hidden_states"), cond
    )
    seen = {}
    for path, leaf in _call_outputs(state["intermediates"]):
        while isinstance(leaf, (tuple, list)):
            leaf = leaf[0]
        seen["/".join(path)] = np.asarray(leaf, np.float32)
    return np.asarray(out, np.float32), seen


def _call_outputs(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable:
    for k, v in tree.items():
        if k == "__call__":
            yield prefix, v
        elif isinstance(v, Mapping):
            yield from _call_outputs(v, prefix + (k,))


def errors(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(relative L2 ||ours - ref|| / ||ref||, max |ours - ref|), in float64."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    d = a - b
    return float(np.linalg.norm(d) / np.linalg.norm(b)), float(np.max(np.abs(d)))


def compare(
    ours: tuple[np.ndarray, Mapping[str, np.ndarray]],
    ref: tuple[np.ndarray, Mapping[str, np.ndarray]],
) -> dict[str, dict[str, float]]:
    """{path: {"rel_l2", "max_abs"}} for every submodule both ran (reference order), then
    "output" (end to end)."""
    rows = {}
    for path, r in ref[1].items():
        if path in ours[1]:
            rel, mx = errors(ours[1][path], r)
            rows[path] = {"rel_l2": rel, "max_abs": mx}
    rel, mx = errors(ours[0], ref[0])
    rows["output"] = {"rel_l2": rel, "max_abs": mx}
    return rows


def worst(rows: Mapping[str, Mapping[str, float]]) -> tuple[str, float]:
    """The submodule (not the output) with the largest relative L2, and that error."""
    inner = {k: v["rel_l2"] for k, v in rows.items() if k != "output"}
    k = max(inner, key=inner.get)
    return k, inner[k]


def save_outputs(path: Any, result: tuple[np.ndarray, Mapping[str, np.ndarray]]) -> None:
    np.savez(path, output=result[0], **{f"m:{k}": v for k, v in result[1].items()})


def load_outputs(path: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with np.load(path) as z:
        return z["output"], {k[2:]: z[k] for k in z.files if k.startswith("m:")}


def _quiet_diffusers() -> Any:
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


# ---- the staged run: torch (fp32, bf16) -> save -> convert (CLI) -> ours (fp32, bf16) ----------


def run_parity(
    name: str,
    workdir: Any,
    dtypes: Iterable[str] = ("float32", "bfloat16"),
    depth: int = 1,
    hw: tuple[int, int] = (32, 32),
    seed: int = 0,
    keep_weights: bool = False,
    redo_ours: bool = False,
    precision: str = "highest",
    log: Any = print,
) -> dict[str, Any]:
    """Compare our UNet with diffusers' on config `name` (see `torch_config`), fp32 and bf16.

    Stages, each skipped when its output is already in `workdir` (delete it to redo):
      1. torch: build and randomize the diffusers UNet (fp32), `save_pretrained` it to
         `workdir/unet` (safetensors), run it fp32 and then bf16 (`torch_fp32.npz`,
         `torch_bf16.npz`), and free it;
      2. convert: `python -m distrifusion_jax.cli.convert workdir/unet workdir/flax`;
      3. ours: `load_unet(workdir/flax, dtype)` and run it, one dtype at a time
         (`ours_float32.npz`, `ours_bfloat16.npz`), freeing the params in between.
    The weights (`unet/`, `flax/`) are deleted at the end unless `keep_weights`; `redo_ours`
    reruns stage 3 (after a change to our model). Our matmuls and convs run at `precision`
    (`jax.default_matmul_precision`; "highest" is full fp32 on every backend).

    Returns {"config", "params", "rows": {label: compare rows}} with labels
    "ours fp32 vs torch fp32", "ours bf16 vs torch fp32", "torch bf16 vs torch fp32".
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
    inputs = make_inputs(config, hw, 1, seed)
    src, dst = work / "unet", work / "flax"
    dtypes = tuple(dtypes)
    key = {"config": name, "hw": list(hw), "seed": seed, "depth": depth, "precision": precision}
    meta_path = work / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta and {k: meta.get(k) for k in key} != key:
        raise ValueError(f"{work} holds a run of {meta}, not {key}; use another workdir")
    torch_files = {"float32": work / "torch_fp32.npz", "bfloat16": work / "torch_bf16.npz"}
    ours_files = {d: work / f"ours_{d}.npz" for d in dtypes}
    for f in ours_files.values() if redo_ours else ():
        f.unlink(missing_ok=True)
    torch_todo = [d for d in ("float32", "bfloat16") if d in dtypes or d == "float32"]
    torch_todo = [d for d in torch_todo if not torch_files[d].exists()]
    ours_todo = [d for d in dtypes if not ours_files[d].exists()]
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
        for dtype in torch_todo:  # float32 first: the bf16 cast is in place
            log(f"[{name}] torch: running {dtype}")
            with _quiet_diffusers():  # its warning on `.to(bf16)` (nothing to keep in fp32)
                model.to(getattr(torch, dtype))
            save_outputs(torch_files[dtype], torch_forward(model, inputs, depth))
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

        log(f"[{name}] ours: loading and running {dtype}")
        module, params = load_unet(dst, getattr(jnp, dtype))
        with jax.default_matmul_precision(precision):
            save_outputs(ours_files[dtype], flax_forward(module, params, inputs, depth))
        del module, params
        jax.clear_caches()
        gc.collect()
    ref = load_outputs(torch_files["float32"])
    short = {"float32": "fp32", "bfloat16": "bf16"}
    rows = {}
    for dtype in dtypes:
        label = f"ours {short[dtype]} vs torch fp32"
        rows[label] = compare(load_outputs(ours_files[dtype]), ref)
    if "bfloat16" in dtypes:
        torch_bf16 = compare(load_outputs(torch_files["bfloat16"]), ref)
        ours = next(iter(rows.values()))  # the submodules we have (torch has more: conv_act)
        rows["torch bf16 vs torch fp32"] = {k: v for k, v in torch_bf16.items() if k in ours}
    if not keep_weights:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    return {**meta, "rows": rows}
