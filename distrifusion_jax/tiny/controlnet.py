"""The shipped tiny Canny ControlNet: its config, its init from the UNet, its training.

As the ControlNet paper (Zhang et al. 2023) and diffusers' `ControlNetModel.from_unet`: the
trunk (conv_in, embeddings, down and mid blocks) starts as a copy of the frozen UNet's encoder,
the zero convs and the conditioning embedding's last conv start at zero (so at step 0 the
controlled UNet is the UNet), and only the ControlNet trains, on the UNet's own epsilon
objective with the conditioning image beside the noisy latent. Data: Canny edges
(`eval/edges.py`) of the Fashion-MNIST training images, white on black at 64x64.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distrifusion_jax.eval.edges import SIGMA, edge_image
from distrifusion_jax.models.controlled_unet import ControlledUNet, controlled_params
from distrifusion_jax.models.controlnet import ControlNetModel
from distrifusion_jax.models.controlnet_config import ControlNetConfig
from distrifusion_jax.models.unet_config import UNetConfig
from distrifusion_jax.tiny.configs import (
    DIFFUSERS_VERSION,
    RES,
    SCHEDULER_CONFIG,
    TIME_IDS,
    UNET_CONFIG,
)
from distrifusion_jax.tiny.fashion_mnist import CLASSES
from distrifusion_jax.tiny.train import noised, training_alphas_cumprod, update_with_ema

Log = Callable[[str], None]

# The UNet's trunk (diffusers `ControlNetModel.from_unet`); the conditioning embedding
# downsamples 2x, the tiny VAE's factor (published SD/SDXL: 8x).
CONTROLNET_CONFIG: dict[str, Any] = ControlNetConfig.from_unet(
    UNetConfig.from_diffusers(UNET_CONFIG),
    conditioning_channels=3,
    conditioning_embedding_out_channels=(8, 16),
).to_diffusers()
# UNet param subtrees the ControlNet copies; those it zero-initialises.
TRUNK = ("conv_in", "time_embedding", "add_embedding", "down_blocks_", "mid_block")
ZEROED = ("controlnet_down_blocks_", "controlnet_mid_block")


@dataclasses.dataclass(frozen=True)
class ControlNetTrainOptions:
    """`scripts/train_tiny_controlnet.py` flags of the same names."""

    seed: int = 0
    steps: int = 1000
    batch: int = 32
    lr: float = 5e-4
    ema: float = 0.995
    empty_prompt: float = 0.3  # share of samples trained with the empty prompt (edges only)
    images: int = 40000  # training images used (the UNet's)
    minutes: float = float("inf")  # wall-clock guard (off)


def controlnet_config_json() -> dict[str, Any]:
    """The shipped ControlNet's `config.json` (diffusers `ControlNetModel` kwargs)."""
    cfg = ControlNetConfig.from_diffusers(CONTROLNET_CONFIG).to_diffusers()
    return {**cfg, "_diffusers_version": DIFFUSERS_VERSION}


def init_from_unet(module: ControlNetModel, unet_params: dict, seed: int = 0) -> dict:
    """ControlNet params: the trunk copied from `unet_params`, zero convs and the conditioning
    embedding's `conv_out` zero, the rest of the conditioning embedding random (`seed`)."""
    cfg = module.config
    f = cfg.conditioning_factor
    x = jnp.zeros((1, 8, 8, cfg.in_channels))
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, 6))}
    params = module.init(
        jax.random.key(seed),
        x,
        jnp.zeros((1,)),
        jnp.zeros((1, 77, cfg.cross_attention_dim)),
        jnp.zeros((1, 8 * f, 8 * f, cfg.conditioning_channels)),
        added,
    )["params"]
    params = dict(params)
    for name in params:
        if name.startswith(TRUNK):
            params[name] = jax.tree.map(jnp.array, unet_params[name])  # copies
        elif name.startswith(ZEROED):
            params[name] = jax.tree.map(jnp.zeros_like, params[name])
    emb = dict(params["controlnet_cond_embedding"])
    emb["conv_out"] = jax.tree.map(jnp.zeros_like, emb["conv_out"])
    params["controlnet_cond_embedding"] = emb
    return params


def train_controlnet(
    unet,
    unet_params: dict,
    embeds: np.ndarray,
    pooled: np.ndarray,
    latents: np.ndarray,
    edges: np.ndarray,
    labels: np.ndarray,
    opts: ControlNetTrainOptions,
    log: Log = print,
) -> tuple[dict, dict]:
    """Epsilon objective of the controlled UNet (UNet frozen), min-SNR-5, AdamW, EMA.

    Args:
      unet, unet_params: the shipped UNet (frozen).
      embeds, pooled: conditioning of the 10 class prompts and "" (row 10): `[11, 77, 64]`,
        `[11, 32]`.
      latents: scaled VAE latents `[N, 32, 32, 4]`; edges: bool `[N, 32, 32]` (`canny_edges`
        of the same images at 32 px); labels: class ids `[N]`.
    Returns:
      (EMA params of the ControlNet, stats)
    """
    b, seed = opts.batch, opts.seed
    cn = ControlNetModel(ControlNetConfig.from_diffusers(CONTROLNET_CONFIG))
    model = ControlledUNet(unet.config, (cn.config,))
    params = init_from_unet(cn, unet_params, seed)
    frozen = jax.tree.map(jnp.asarray, unet_params)
    ac = jnp.asarray(training_alphas_cumprod(SCHEDULER_CONFIG), jnp.float32)
    time_ids = jnp.broadcast_to(jnp.asarray(TIME_IDS, jnp.float32), (b, 6))
    embeds, pooled = jnp.asarray(embeds), jnp.asarray(pooled)
    warmup = min(100, opts.steps // 5)
    lr = optax.warmup_cosine_decay_schedule(0.0, opts.lr, warmup, opts.steps, opts.lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    state = opt.init(params)
    ema = jax.tree.map(jnp.copy, params)

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, state, ema, xb, cb, yb, i):
        key = jax.random.fold_in(jax.random.key(seed + 2), i)
        k_noise, k_t, k_drop = jax.random.split(key, 3)
        t, noise, xt, w = noised(k_noise, k_t, xb, ac)
        cond = jnp.where(jax.random.uniform(k_drop, (b,)) < opts.empty_prompt, len(CLASSES), yb)
        added = {"text_embeds": pooled[cond], "time_ids": time_ids}
        control = {"images": (cb,), "scales": jnp.ones((b, 1))}

        def loss_fn(p):
            variables = {"params": controlled_params(frozen, [p])}
            eps = model.apply(variables, xt, t.astype(jnp.float32), embeds[cond], added, control)
            per = jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))  # [b]
            return jnp.mean(w * per), jnp.mean(per)

        (loss, mse), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params, state, ema = update_with_ema(opt, g, state, params, ema, opts.ema, i)
        return params, state, ema, loss, mse

    rng = np.random.default_rng(seed + 3)
    n = min(opts.images, len(latents))
    t0, losses, mses, done = time.time(), [], [], 0
    for i in range(opts.steps):
        idx = rng.integers(0, n, b)
        xb = latents[idx].astype(np.float32)
        cb = edge_image(edges[idx], RES).astype(np.float32) / 255.0  # [b, 64, 64, 3]
        params, state, ema, loss, mse = step(params, state, ema, xb, cb, labels[idx], i)
        losses.append(float(loss))
        mses.append(float(mse))
        done = i + 1
        if done % 50 == 0 or done == opts.steps:
            el = time.time() - t0
            log(
                f"controlnet step {done}/{opts.steps}: loss {np.mean(losses[-50:]):.4f} "
                f"mse {np.mean(mses[-50:]):.4f} ({el / done:.2f} s/step, {el / 60:.1f} min)"
            )
        if time.time() - t0 > 60 * opts.minutes:
            log(f"controlnet: wall-clock guard ({opts.minutes} min) stopped training at {done}")
            break
    stats = {
        **dataclasses.asdict(opts),
        "steps_done": done,
        "final_loss_min_snr": float(np.mean(losses[-100:])),
        "final_mse_eps": float(np.mean(mses[-100:])),
        "seconds": time.time() - t0,
    }
    stats["minutes"] = None if opts.minutes == float("inf") else opts.minutes
    return ema, stats


def train_and_save(model_dir: Path, out: Path, opts: ControlNetTrainOptions, log: Log = print):
    """Train the Canny ControlNet of the model in `model_dir` and write it to `out`.

    `out` becomes a converted ControlNet folder (`config.json`, float16 `params/`), loadable by
    `pipe.load_controlnets([out])` and `generate.py --controlnet out`, with `training.json`
    (options and losses) and `example_edges.png` (the edges of a Fashion-MNIST test image).

    Returns:
      the training report (what training.json holds).
    """
    from PIL import Image

    from distrifusion_jax.eval.edges import canny_edges
    from distrifusion_jax.io import checkpoint
    from distrifusion_jax.tiny.export import as_f16, count
    from distrifusion_jax.tiny.fashion_mnist import PROMPTS, class_test_images, load_fashion_mnist
    from distrifusion_jax.tiny.recipe import load_tokenizers
    from distrifusion_jax.tiny.train import encode_all, text_conditioning

    t0 = time.time()
    x, y = load_fashion_mnist("train")
    x, y = x[: opts.images], y[: opts.images]
    unet, unet_params = checkpoint.load_component(model_dir, "unet")
    vae, vae_params = checkpoint.load_component(model_dir, "vae")
    latents = (encode_all(vae, vae_params, x) * vae.config.scaling_factor).astype(np.float16)
    edges = canny_edges((x[..., 0] + 1.0) / 2.0)  # [N, 32, 32]
    log(f"{len(x)} latents and edge maps ({edges.mean():.3f} of the pixels are edges)")
    names = ("text_encoder", "text_encoder_2")
    loaded = [checkpoint.load_component(model_dir, n) for n in names]
    embeds, pooled = text_conditioning(
        tuple(m for m, _ in loaded),
        load_tokenizers(model_dir),
        {n: p for n, (_, p) in zip(names, loaded)},
        [*PROMPTS, ""],
    )
    params, stats = train_controlnet(
        unet, unet_params, embeds, pooled, latents, edges, y, opts, log
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(controlnet_config_json(), indent=2) + "\n")
    params = jax.tree.map(lambda a: np.asarray(a, np.float16), as_f16(params))
    if (out / checkpoint.PARAMS).exists():
        shutil.rmtree(out / checkpoint.PARAMS)
    checkpoint.save_params(out / checkpoint.PARAMS, params)
    example = canny_edges(class_test_images([(EXAMPLE_CLASS, 0)], RES))
    Image.fromarray(edge_image(example, RES)[0]).save(out / EXAMPLE_EDGES)
    report = {
        "base_model": model_dir.name,
        "data": f"Canny edges (sigma {SIGMA} at 32x32, scikit-image) of the first "
        f"{len(x):,} Fashion-MNIST training images, white on black, nearest-upscaled to "
        f"{RES}x{RES}; prompts as the base model's, {opts.empty_prompt:.0%} empty",
        "init": "trunk copied from the base UNet's encoder; zero convs and the conditioning "
        "embedding's conv_out zero (diffusers ControlNetModel.from_unet); EMA shipped",
        "params": count(params),
        "stored_dtype": "float16",
        "example_edges": f"{EXAMPLE_EDGES}: test image 0 of class {CLASSES[EXAMPLE_CLASS]!r}",
        "training": stats,
        "wall_seconds": round(time.time() - t0, 1),
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"controlnet: {count(params):,} params -> {out} in {report['wall_seconds'] / 60:.1f} min")
    return report


EXAMPLE_EDGES = "example_edges.png"
EXAMPLE_CLASS = 7  # sneaker
