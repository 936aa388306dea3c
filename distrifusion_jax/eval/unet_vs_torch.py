"""Single-device UNet forward, ours (JAX) vs diffusers' PyTorch, on this machine's CPU.

Both sides get the same random weights (diffusers' `UNet2DConditionModel` built from a config
and randomized as in `eval/parity.py`, converted with the project's converter) and the same
inputs (`parity.make_inputs`, batch 1, a `hw` latent), fp32, in one process, with torch set to
as many threads as XLA's CPU client uses. Time is the best of `repeats` calls after one warm-up
call (which compiles ours). Configs: `parity.torch_config` "tiny", "mid" (SDXL widths, 2
transformer layers at the deepest level) and "full" (SDXL base, 2.57B params, ~10 GB a side:
torch runs first, and its weights are freed tensor by tensor as they are converted, so the two
copies are not held at once).

The per-op table times single layers at SDXL sizes, batch 2 (the CFG pair): self-attention at
4096 tokens x 10 heads and 1024 x 20 (head dim 64; ours through `attention_ops.attention`,
its "auto" choice and XLA's fused op, torch's `scaled_dot_product_attention`), GroupNorm
(640 ch, 64x64), a 3x3 conv (640 -> 640, 64x64) and a dense layer (1280 -> 10240, 1024 tokens).

Torch and ours run one after the other, not call by call in turns: both keep their thread
pools spinning for a while after a call, which slowed torch's UNet 5x when they alternated.

JSON: {"kind": "unet_vs_torch", "backend": str, "attention_impl": str, "threads": int,
"torch_threads": int, "cpu_count": int, "dtype": "float32", "batch": 1, "latent": [H, W],
"repeats": int, "op_repeats": int, "load_average_before" / "load_average_after": [float],
"unet": [{"config": str, "params": int, "latent": [H, W], "ours_s": float, "torch_s": float,
"ratio": float (ours / torch), "ours_first_call_s": float (compile + run), "rel_l2": float,
"max_abs": float}], "ops": [{"op": str, "ours_s", "torch_s", "ratio", "rel_l2": float}]}.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distrifusion_jax.eval import parity

SIZES = ("tiny", "mid", "full")


def cpu_threads() -> int:
    """Cores this process may run on: the size of XLA's CPU thread pool."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def best_of(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Seconds of the fastest of `repeats` calls of each fn after `warmup` calls, one fn after
    the other. (Not call by call in turns: torch's and XLA's thread pools keep spinning a while
    after a call, and taking turns slowed torch's UNet 5x here.) A fn returns something
    `jax.block_until_ready` accepts (a torch tensor is already computed)."""
    import jax

    best = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            jax.block_until_ready(fn())
        best[name] = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _rel_err(ours: Any, ref: Any) -> float:
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _convert(model: Any, module: Any) -> dict[str, Any]:
    """`model`'s weights onto `module`'s param tree, as jax arrays. Each torch tensor is dropped
    once converted (the model is left empty), so the peak is one model plus one tensor."""
    import jax.numpy as jnp

    from distrifusion_jax.io import components
    from distrifusion_jax.io.keys import convert_tensors

    target = components.get("unet").target(module)
    sd = dict(model.state_dict())
    for _, p in model.named_parameters():
        p.data = p.data.new_empty(0)  # the state dict now holds the only reference
    read = lambda key: sd.pop(key).numpy()
    return convert_tensors(list(sd), read, target, cast=lambda a, _: jnp.array(a, copy=True))


def _torch_runner(model: Any, x: dict[str, np.ndarray]) -> Callable[[], Any]:
    """The diffusers UNet's forward on one input dict (NCHW output tensor)."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in x.items()}
    cond = {k: t[k] for k in ("text_embeds", "time_ids") if k in t} or None

    def run() -> Any:
        with torch.inference_mode():
            ctx = t["encoder_hidden_states"]
            return model(t["sample"], t["timesteps"], ctx, added_cond_kwargs=cond).sample

    return run


def _ours_runner(module: Any, params: Any, x: dict[str, np.ndarray]) -> Callable[[], Any]:
    """Our UNet's jitted forward on one input dict (NHWC output)."""
    import jax
    import jax.numpy as jnp

    j = {k: jnp.asarray(v) for k, v in x.items()}
    cond = {k: j[k] for k in ("text_embeds", "time_ids") if k in j} or None
    sample = j["sample"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    apply = jax.jit(module.apply)
    return lambda: apply(
        {"params": params}, sample, j["timesteps"], j["encoder_hidden_states"], cond
    )


def unet_row(name: str, hw: tuple[int, int] = (32, 32), repeats: int = 3, seed: int = 0) -> dict:
    """Time one config's UNet forward, torch then ours (the torch model is emptied as it is
    converted: ~10 GB a side at full size); outputs compared."""
    from distrifusion_jax.models.unet import UNet2DConditionModel
    from distrifusion_jax.models.unet_config import UNetConfig

    config = parity.torch_config(name)
    x = parity.make_inputs(config, hw, 1, seed)[0]
    model = parity.build_torch_unet(config, seed)
    n_params = sum(p.numel() for p in model.parameters())
    run_torch = _torch_runner(model, x)
    times = best_of({"torch": run_torch}, repeats)
    ref = np.transpose(run_torch().numpy(), (0, 2, 3, 1))  # NHWC
    module = UNet2DConditionModel(UNetConfig.from_diffusers(config))
    params = _convert(model, module)  # empties `model`
    gc.collect()
    run_ours = _ours_runner(module, params, x)
    t = time.perf_counter()
    out = np.asarray(run_ours())
    first_s = time.perf_counter() - t
    times.update(best_of({"ours": run_ours}, repeats, warmup=0))
    del params, run_ours
    gc.collect()
    return {
        "config": name,
        "params": n_params,
        "latent": list(hw),
        "ours_s": times["ours"],
        "torch_s": times["torch"],
        "ratio": times["ours"] / times["torch"],
        "ours_first_call_s": first_s,
        "rel_l2": _rel_err(out, ref),
        "max_abs": float(np.max(np.abs(out - ref))),
    }


def _op_cases() -> list[tuple[str, Callable[[], tuple[Callable, Callable]]]]:
    """(label, builder) per op; a builder returns (ours, torch): calls with no arguments."""
    import jax
    import jax.numpy as jnp
    import torch

    from distrifusion_jax.models.attention_ops import attention
    from distrifusion_jax.models.layers import Dense
    from distrifusion_jax.parallel.conv import PatchConv
    from distrifusion_jax.parallel.groupnorm import PatchGroupNorm

    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)

    def attn(length: int, heads: int, impl: str) -> Callable:
        def build():
            q, k, v = (f32(2, length, heads, 64) for _ in range(3))  # [B, L, H, D]
            tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            fn = jax.jit(lambda q, k, v: attention(q, k, v, impl=impl))
            return lambda: fn(q, k, v), lambda: sdpa(tq, tk, tv).transpose(1, 2)

        return build

    def layer(module: Any, tmod: Any, x: np.ndarray, nchw: bool) -> Callable:
        def build():
            tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy() if nchw else x)
            sd = {k: v.detach().numpy() for k, v in tmod.state_dict().items()}
            params = _layer_params(sd)
            fn = jax.jit(lambda p, x: module.apply({"params": p}, x))
            run = (lambda: torch.movedim(tmod(tx), 1, -1)) if nchw else (lambda: tmod(tx))
            jx = jnp.asarray(x)
            return lambda: fn(params, jx), run

        return build

    gn = torch.nn.GroupNorm(32, 640)
    conv = torch.nn.Conv2d(640, 640, 3, padding=1)
    dense = torch.nn.Linear(1280, 10240)
    for m in (gn, conv, dense):
        parity.randomize_(m)
    return [
        ("attention 4096 tok x 10 heads", attn(4096, 10, "auto")),
        ("attention 4096 tok x 10 heads [xla]", attn(4096, 10, "xla")),
        ("attention 1024 tok x 20 heads", attn(1024, 20, "auto")),
        ("attention 1024 tok x 20 heads [xla]", attn(1024, 20, "xla")),
        ("GroupNorm 640 ch 64x64", layer(PatchGroupNorm(32), gn, f32(2, 64, 64, 640), True)),
        ("conv 3x3 640->640 64x64", layer(PatchConv(640), conv, f32(2, 64, 64, 640), True)),
        ("dense 1280->10240 1024 tok", layer(Dense(10240), dense, f32(2, 1024, 1280), False)),
    ]


def _layer_params(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A single torch layer's `weight`/`bias` in our layout (`scale` for a norm)."""
    w = sd["weight"]
    if w.ndim == 1:
        return {"scale": w, "bias": sd["bias"]}
    # OIHW -> HWIO; [out, in] -> [in, out]
    kernel = np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w.T
    return {"kernel": np.ascontiguousarray(kernel), "bias": sd["bias"]}


def op_rows(repeats: int = 5, select: Sequence[str] | None = None) -> list[dict]:
    """The per-op table: ours vs torch seconds (batch 2, fp32) and relative error; `select`:
    label prefixes of the ops to time (None: all)."""
    import torch

    rows = []
    for label, build in _op_cases():
        if select is not None and not label.startswith(tuple(select)):
            continue
        run_ours, run_torch = build()
        with torch.inference_mode():
            ref = run_torch().numpy()
            times = best_of({"ours": run_ours, "torch": run_torch}, repeats)
        ours_s, torch_s = times["ours"], times["torch"]
        rows.append({
            "op": label, "ours_s": ours_s, "torch_s": torch_s, "ratio": ours_s / torch_s,
            "rel_l2": _rel_err(run_ours(), ref),
        })  # fmt: skip
    return rows


def unet_vs_torch(
    sizes: Sequence[str] = ("tiny", "mid"),
    hw: tuple[int, int] = (32, 32),
    repeats: int = 3,
    op_repeats: int = 5,
    ops: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both tables as a JSON-ready dict (schema in `scripts/benchmark.py`). `ops`: prefixes
    of the op labels to time (None: all; empty: none). Torch's thread count is restored."""
    import jax
    import torch

    from distrifusion_jax.models import attention_ops

    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    threads, torch_threads = cpu_threads(), torch.get_num_threads()
    backend = jax.default_backend()
    res: dict[str, Any] = {
        "kind": "unet_vs_torch",
        "backend": backend,
        "attention_impl": os.environ.get(attention_ops.ENV)
        or attention_ops.choose_impl(backend, 0),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "dtype": "float32",
        "batch": 1,
        "latent": list(hw),
        "repeats": repeats,
        "op_repeats": op_repeats,
        "load_average_before": list(os.getloadavg()),
        "unet": [],
        "ops": [],
    }
    torch.set_num_threads(threads)
    try:
        res["torch_threads"] = torch.get_num_threads()
        for name in sizes:
            log(f"[unet_vs_torch] {name}: building, timing torch, converting, timing ours")
            res["unet"].append(unet_row(name, hw, repeats))
        if ops is None or ops:
            log("[unet_vs_torch] per-op table")
            res["ops"] = op_rows(op_repeats, ops)
    finally:
        torch.set_num_threads(torch_threads)
    res["load_average_after"] = list(os.getloadavg())
    return res


def print_unet_vs_torch(res: dict[str, Any]) -> None:
    print(
        f"UNet forward, fp32, batch {res['batch']}, latent {res['latent'][0]}x{res['latent'][1]}, "
        f"{res['threads']} threads each (best of {res['repeats']}; "
        f"attention: {res['attention_impl']})"
    )
    head = ("config", "params", "ours s", "torch s", "ratio", "rel L2")
    print("{:8s} {:>8s} {:>8s} {:>8s} {:>6s} {:>8s}".format(*head))
    for r in res["unet"]:
        print(
            f"{r['config']:8s} {r['params'] / 1e9:7.3f}B {r['ours_s']:8.3f} {r['torch_s']:8.3f} "
            f"{r['ratio']:6.2f} {r['rel_l2']:8.1e}"
        )
    if res["ops"]:
        print(f"\n{'op (batch 2, fp32)':38s} {'ours ms':>9s} {'torch ms':>9s} {'ratio':>6s}")
        for r in res["ops"]:
            print(
                f"{r['op']:38s} {r['ours_s'] * 1e3:9.2f} {r['torch_s'] * 1e3:9.2f} "
                f"{r['ratio']:6.2f}"
            )
