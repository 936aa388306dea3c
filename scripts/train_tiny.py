"""Train the tiny SDXL-architecture text-to-image model in distrifusion_jax/assets/tiny-sdxl.

    apt-get install -y dataset-fashion-mnist          # once (root; `apt-get update` first)
    python scripts/make_clip_tokenizer.py             # once: tokenizer/, tokenizer_2/
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        taskset -c 1 python scripts/train_tiny.py     # ~57 min on one CPU core

Data: Fashion-MNIST (Debian `dataset-fashion-mnist`, MIT), 28x28 padded to 32x32 (black
border), gray replicated to RGB, prompts "a photo of a <class>". Everything is JAX + optax on
the project's own Flax models, in four phases:
  1. classifier (a small CNN, for the conditioning test) on real images;
  2. AutoencoderKL with one level (downsampling factor 1: 32x32 image -> 32x32x4 latent, so the
     latent has 32 rows and n = 8 row bands are possible), then frozen;
  3. both CLIP text encoders (real 49,408-token vocabulary, hidden 32): a short phase pushes the
     11 prompts' conditioning apart (`separate_prompts`), then they are frozen. (Random text
     encoders give the prompts cosine similarity 0.97-0.99 and a UNet that ignores the class:
     21% classifier accuracy; training them jointly with the UNet for 1000 steps: 19%.)
  4. the UNet (SDXL block layout, text_time conditioning) on frozen VAE latents and the frozen
     conditioning: epsilon objective on SDXL's scaled_linear schedule, min-SNR-5 weighting, 10%
     condition dropout (half the empty prompt "", half zero embeddings as diffusers'
     force_zeros_for_empty_prompt), EMA shipped.
Then it writes the model in the converted format (`python -m convert` layout, float16 params),
samples a grid with `generate_images` (Euler, CFG) into results/tiny_model_samples.png, and
classifies the samples. Seeded: the same flags give the same weights, unless the wall-clock guard
(--unet-minutes) stops the UNet early, which training.json records; `--unet-stop K` replays such
a run (the shipped model: the guard stopped it at step 1564 of 1700, so
`--unet-stop 1564 --unet-minutes 1e9` reproduces it on any machine). `--sample-only` redraws the
grid and the accuracy from the saved model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make `convert` and `distrifusion_jax` importable
    sys.path.insert(0, str(ROOT))

from distrifusion_jax import checkpoint  # noqa: E402
from distrifusion_jax.models.clip import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)
from distrifusion_jax.models.unet import UNet2DConditionModel  # noqa: E402
from distrifusion_jax.models.unet_config import UNetConfig  # noqa: E402
from distrifusion_jax.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
PROMPTS = tuple(f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}" for c in CLASSES)
RES = 32  # default image size; the VAE factor is 1, so the latent is 32x32 too
TIME_IDS = (RES, RES, 0, 0, RES, RES)  # SDXL micro-conditioning: original size, crop, target
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.23.0"

UNET_CONFIG = dict(
    sample_size=RES,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[16, 32, 64],
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=64,  # te1 hidden 32 + te2 hidden 32
    transformer_layers_per_block=[1, 1, 1],
    attention_head_dim=[1, 1, 2],  # head COUNTS (diffusers' naming): head dim 16 / 32 / 32
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=6 * 16 + 32,  # time_ids + te2 projection
    flip_sin_to_cos=True,
    freq_shift=0,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D"],
    block_out_channels=[16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=RES,
    mid_block_add_attention=False,  # attention over 1024 pixels would triple the VAE's cost
    force_upcast=False,
)
_TE_COMMON = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
TE1_CONFIG = dict(_TE_COMMON, hidden_act="quick_gelu")  # as SDXL's CLIP ViT-L text tower
TE2_CONFIG = dict(_TE_COMMON, hidden_act="gelu")  # as SDXL's OpenCLIP bigG text tower
SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
CLASS_NAMES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def count(params: Any) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(params)))


def as_f16(params: Any) -> Any:
    """Round to the float16 that is shipped, kept as float32 for compute."""
    return jax.tree.map(lambda a: np.asarray(a, np.float16).astype(np.float32), params)


# ---- data -------------------------------------------------------------------------------


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images `[N, 32, 32, 1]` float32 in [-1, 1] (28x28 padded with black), labels `[N]`)."""
    prefix = "train" if split == "train" else "t10k"
    path = DATA / f"{prefix}-images-idx3-ubyte.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: apt-get install -y dataset-fashion-mnist")
    raw = np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=16)
    labels = np.frombuffer(
        gzip.decompress((DATA / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8
    )
    x = raw.reshape(-1, 28, 28).astype(np.float32) / 127.5 - 1.0
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)[..., None]  # [N, 32, 32, 1]
    return x, labels.astype(np.int32)


def to_gray(images: np.ndarray) -> np.ndarray:
    """uint8 `[..., H, W, 3]` or float RGB in [-1, 1] -> float `[..., H, W, 1]` in [-1, 1]."""
    x = np.asarray(images, np.float32)
    if np.asarray(images).dtype == np.uint8:
        x = x / 127.5 - 1.0
    return x.mean(-1, keepdims=True)


# ---- classifier (for the conditioning test) ---------------------------------------------


class Classifier(nn.Module):
    """Three conv/pool stages and a linear head: gray `[B, 32, 32, 1]` in [-1, 1] -> logits."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for c in (16, 32, 64):
            x = nn.relu(nn.Conv(c, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))  # 32 -> 16 -> 8 -> 4
        return nn.Dense(len(CLASSES))(x.reshape(x.shape[0], -1))


def train_classifier(x, y, x_test, y_test, epochs: int, seed: int) -> tuple[dict, dict]:
    """Adam on real images (random 2-pixel shifts); returns (params, stats)."""
    model, rng = Classifier(), np.random.default_rng(seed)
    params = model.init(jax.random.key(seed), x[:1])["params"]
    opt = optax.adam(2e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, state = opt.update(g, state)
        return optax.apply_updates(params, u), state, loss

    t0, batch, losses = time.time(), 128, []
    for epoch in range(epochs):
        perm = rng.permutation(len(x))
        for i in range(len(x) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            dy, dx = rng.integers(-2, 3, 2)
            xb = np.roll(x[idx], (dy, dx), axis=(1, 2))
            params, state, loss = step(params, state, xb, y[idx])
            losses.append(float(loss))
        log(f"classifier epoch {epoch}: loss {np.mean(losses[-200:]):.4f}")
    acc = float((classify(params, x_test) == y_test).mean())
    stats = {
        "epochs": epochs,
        "final_loss": float(np.mean(losses[-100:])),
        "test_accuracy": acc,
        "seconds": time.time() - t0,
    }
    log(f"classifier: test accuracy {acc:.4f} ({stats['seconds']:.0f} s)")
    return params, stats


def classify(params: dict, gray: np.ndarray) -> np.ndarray:
    """Predicted class ids for gray images `[N, 32, 32, 1]` in [-1, 1]."""
    apply = jax.jit(lambda p, x: Classifier().apply({"params": p}, x).argmax(-1))
    return np.concatenate(
        [np.asarray(apply(params, gray[i : i + 500])) for i in range(0, len(gray), 500)]
    )


def save_classifier(path: Path, params: dict) -> None:
    flat = {"/".join(k): np.asarray(v) for k, v in _flatten(params).items()}
    np.savez(path, **flat)


def load_classifier(path: str | os.PathLike) -> dict:
    with np.load(path) as f:
        flat = {tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files}
    return _unflatten(flat)


def _flatten(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


# ---- noise schedule (SDXL's EulerDiscreteScheduler config) ------------------------------


def alphas_cumprod(config: dict) -> np.ndarray:
    """`[1000]` alpha-bar of the scaled_linear schedule in `config` (float64)."""
    if config["beta_schedule"] != "scaled_linear" or config["prediction_type"] != "epsilon":
        raise ValueError(f"only scaled_linear/epsilon is implemented here, got {config}")
    n = config["num_train_timesteps"]
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    return np.cumprod(1.0 - betas)


def euler_sigmas(config: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps `[steps]`, sigmas `[steps + 1]`) of diffusers' EulerDiscreteScheduler."""
    if config["timestep_spacing"] != "leading":
        raise ValueError(f"only 'leading' spacing is implemented here, got {config}")
    ac = alphas_cumprod(config)
    ratio = config["num_train_timesteps"] // steps
    t = (np.arange(steps) * ratio).round()[::-1].astype(np.float64) + config["steps_offset"]
    train_sigmas = ((1 - ac) / ac) ** 0.5
    sigmas = np.interp(t, np.arange(len(ac)), train_sigmas)
    return t, np.append(sigmas, 0.0)


# ---- text conditioning ------------------------------------------------------------------


def token_ids(tokenizers, prompts) -> list[jax.Array]:
    """Token ids `[N, 77]` of `prompts` for each tokenizer."""
    return [
        jnp.asarray(
            tok(list(prompts), padding="max_length", max_length=77, truncation=True).input_ids,
            jnp.int32,
        )
        for tok in tokenizers
    ]


def encode_prompts(te1, p1, te2, p2, tokenizers, prompts) -> tuple[np.ndarray, np.ndarray]:
    """SDXL conditioning: (concat of both `hidden_states[-2]` `[N, 77, 64]`, pooled `[N, 32]`)."""
    params = {"text_encoder": p1, "text_encoder_2": p2}
    embeds, pooled = encode_text(te1, te2, *token_ids(tokenizers, prompts), params)
    return np.asarray(embeds, np.float32), np.asarray(pooled, np.float32)


def load_tokenizers(model_dir: Path) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer

    return tuple(
        CLIPTokenizer.from_pretrained(model_dir / n, local_files_only=True)
        for n in ("tokenizer", "tokenizer_2")
    )


# ---- VAE --------------------------------------------------------------------------------


def train_vae(vae, x, steps: int, batch: int, seed: int) -> tuple[dict, dict]:
    """L1 + L2 reconstruction of posterior samples, KL weight 1e-4; Adam 2e-3 -> cosine."""
    rng = np.random.default_rng(seed)
    params = vae.init(jax.random.key(seed), np.repeat(x[:1], 3, -1))["params"]
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adam(optax.warmup_cosine_decay_schedule(0, 2e-3, min(50, steps // 5), steps, 1e-4)),
    )
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, key):
        def loss_fn(p):
            mean, logvar = vae.apply({"params": p}, xb, method="encode")
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
            rec = vae.apply({"params": p}, z, method="decode")
            kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
            err = rec - xb
            return jnp.mean(jnp.abs(err)) + jnp.mean(err**2) + 1e-4 * kl, jnp.mean(err**2)

        (loss, mse), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, state = opt.update(g, state)
        return optax.apply_updates(params, u), state, loss, mse

    t0, mses = time.time(), []
    for i in range(steps):
        idx = rng.integers(0, len(x), batch)
        xb = np.repeat(x[idx], 3, axis=-1)
        params, state, loss, mse = step(params, state, xb, jax.random.key(seed * 7919 + i))
        mses.append(float(mse))
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log(f"vae step {i + 1}/{steps}: loss {float(loss):.4f} mse {np.mean(mses[-50:]):.5f}")
    return params, {
        "steps": steps,
        "batch": batch,
        "final_mse": float(np.mean(mses[-50:])),
        "seconds": time.time() - t0,
    }


def encode_all(vae, params, x) -> np.ndarray:
    """Posterior means `[N, 32, 32, 4]` (unscaled) of gray images replicated to RGB."""
    enc = jax.jit(lambda p, xb: vae.apply({"params": p}, xb, method="encode")[0])
    out = [np.asarray(enc(params, np.repeat(x[i : i + 500], 3, -1))) for i in range(0, len(x), 500)]
    return np.concatenate(out)


# ---- UNet -------------------------------------------------------------------------------


def separate_prompts(text, steps: int) -> tuple[dict, dict]:
    """Train both text encoders so the 11 prompts' conditioning vectors point apart.

    At a random init "a photo of a coat" and "a photo of a bag" differ in one token and their
    SDXL conditioning has cosine similarity 0.97-0.99: a UNet trained on them ignores the class
    (21% classifier accuracy, first run); trained jointly with the UNet for 1000 steps they only
    fell to ~0.95 (19%, second run). So, before the UNet, Adam minimises the mean squared cosine
    similarity between different prompts of (a) the pooled `text_embeds [11, 32]` and (b) the
    cross-attention context `[11, 77, 64]` (both penultimate states, positions 1..76 flattened;
    position 0, BOS, is the same for all). A CLIP-like stand-in for text pre-training: it only
    makes the prompts distinguishable; what they draw is learnt by the UNet.

    Args:
      text: (te1, te2, ids1 `[11, 77]`, ids2 `[11, 77]`, {"text_encoder", "text_encoder_2"}).
    Returns:
      (trained params of both encoders, stats with the cosine similarities before and after)
    """
    te1, te2, ids1, ids2, params = text
    opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps, 0.1))
    state = opt.init(params)
    off = ~np.eye(len(ids1), dtype=bool)

    def cosines(p):
        embeds, pooled = encode_text(te1, te2, ids1, ids2, p)
        out = []
        for v in (pooled, embeds[:, 1:].reshape(len(embeds), -1)):
            v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
            out.append((v @ v.T)[off])
        return out

    @jax.jit
    def step(p, state):
        def loss_fn(p):
            return sum(jnp.mean(c**2) for c in cosines(p))

        loss, g = jax.value_and_grad(loss_fn)(p)
        u, state = opt.update(g, state)
        return optax.apply_updates(p, u), state, loss

    before = [float(jnp.max(c)) for c in cosines(params)]
    t0 = time.time()
    for i in range(steps):
        params, state, loss = step(params, state)
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log(f"text encoders step {i + 1}/{steps}: mean squared cosine {float(loss):.4f}")
    after = [float(jnp.max(c)) for c in cosines(params)]
    stats = {
        "steps": steps,
        "max_cosine_pooled_before_after": [before[0], after[0]],
        "max_cosine_context_before_after": [before[1], after[1]],
        "seconds": time.time() - t0,
    }
    log(f"text encoders: {stats}")
    return params, stats


def encode_text(te1, te2, ids1, ids2, p) -> tuple[jax.Array, jax.Array]:
    """SDXL conditioning of token ids: (context `[N, 77, 64]`, pooled `[N, 32]`)."""
    o1 = te1.apply({"params": p["text_encoder"]}, ids1)
    o2 = te2.apply({"params": p["text_encoder_2"]}, ids2)
    embeds = jnp.concatenate([o1.hidden_states[-2], o2.hidden_states[-2]], axis=-1)
    return embeds, o2.text_embeds


def train_unet(unet, embeds, pooled, latents, labels, args) -> tuple[dict, dict]:
    """Epsilon objective, min-SNR-5 weights, 10% condition dropout, AdamW, EMA of the weights.

    Args:
      embeds, pooled: the frozen text encoders' conditioning of the 10 class prompts and then
        the empty prompt "" (row 10): `[11, 77, 64]`, `[11, 32]`.
      latents: scaled VAE latents `[N, 32, 32, 4]`; labels: class ids `[N]`.
    Returns:
      (EMA params of the UNet, stats)
    """
    b, seed = args.unet_batch, args.seed
    ac = jnp.asarray(alphas_cumprod(SCHEDULER_CONFIG), jnp.float32)
    time_ids = jnp.broadcast_to(jnp.asarray(TIME_IDS, jnp.float32), (b, 6))
    embeds, pooled = jnp.asarray(embeds), jnp.asarray(pooled)
    params = unet.init(
        jax.random.key(seed),
        latents[:1].astype(np.float32),
        jnp.zeros((1,)),
        embeds[:1],
        {"text_embeds": pooled[:1], "time_ids": time_ids[:1]},
    )["params"]
    warmup = min(100, args.unet_steps // 5)
    lr = optax.warmup_cosine_decay_schedule(
        0.0, args.unet_lr, warmup, args.unet_steps, args.unet_lr * 0.1
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    state = opt.init(params)
    ema = jax.tree.map(jnp.copy, params)  # its own buffers: the step donates both

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, state, ema, xb, yb, i):
        key = jax.random.fold_in(jax.random.key(seed + 1), i)
        k_noise, k_t, k_drop = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (b,), 0, len(ac))
        noise = jax.random.normal(k_noise, xb.shape)
        a = ac[t][:, None, None, None]
        xt = jnp.sqrt(a) * xb + jnp.sqrt(1 - a) * noise
        u = jax.random.uniform(k_drop, (b,))
        cond = jnp.where(u < 0.05, len(CLASSES), yb)  # 5%: the empty prompt ""
        keep = (u >= 0.05) & (u < 0.10)  # 5%: zero embeddings (force_zeros_for_empty_prompt)
        scale = jnp.where(keep, 0.0, 1.0)
        snr = a[:, 0, 0, 0] / (1 - a[:, 0, 0, 0])
        w = jnp.minimum(snr, 5.0) / snr  # min-SNR-5 for epsilon (Hang et al. 2023)

        ctx = embeds[cond] * scale[:, None, None]
        added = {"text_embeds": pooled[cond] * scale[:, None], "time_ids": time_ids}

        def loss_fn(p):
            eps = unet.apply({"params": p}, xt, t.astype(jnp.float32), ctx, added)
            per = jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))
            return jnp.mean(w * per), jnp.mean(per)

        (loss, mse), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u_, state = opt.update(g, state, params)
        params = optax.apply_updates(params, u_)
        d = jnp.minimum(args.ema, (1.0 + i) / (10.0 + i))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return params, state, ema, loss, mse

    rng = np.random.default_rng(seed)
    perm, pos = rng.permutation(len(latents)), 0
    t0, losses, mses, done, stopped = time.time(), [], [], 0, False
    for i in range(args.unet_steps):
        if pos + b > len(perm):
            perm, pos = rng.permutation(len(latents)), 0
        idx = perm[pos : pos + b]
        pos += b
        xb = latents[idx].astype(np.float32)
        params, state, ema, loss, mse = step(params, state, ema, xb, labels[idx], i)
        losses.append(float(loss))
        mses.append(float(mse))
        done = i + 1
        if done % 50 == 0 or done == args.unet_steps:
            el = time.time() - t0
            log(
                f"unet step {done}/{args.unet_steps}: loss {np.mean(losses[-50:]):.4f} "
                f"mse {np.mean(mses[-50:]):.4f} ({el / done:.2f} s/step, {el / 60:.1f} min)"
            )
        if args.unet_stop and done >= args.unet_stop:
            break  # replays a run that the guard stopped here (same schedule, same weights)
        if time.time() - t0 > 60 * args.unet_minutes:
            stopped = True
            log(f"unet: wall-clock guard ({args.unet_minutes} min) stopped training at {done}")
            break
    stats = {
        "steps": done,
        "steps_planned": args.unet_steps,
        "stopped_by_time_guard": stopped,
        "batch": b,
        "lr": args.unet_lr,
        "ema_decay": args.ema,
        "samples_seen": done * b,
        "final_loss_min_snr": float(np.mean(losses[-100:])),
        "final_mse_eps": float(np.mean(mses[-100:])),
        "seconds": time.time() - t0,
    }
    return ema, stats


# ---- writing the model (the converter's layout) -----------------------------------------


def save_model(out: Path, parts: dict[str, tuple[dict, dict]]) -> None:
    """Write `parts` (name -> (config.json dict, params)) as `python -m convert` writes a DST.

    Params are saved in float16; tokenizer/ and tokenizer_2/ must already be in `out`.
    """
    for name, (config, params) in parts.items():
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        p16 = jax.tree.map(lambda a: np.asarray(a, np.float16), params)
        checkpoint.save_params(folder / checkpoint.PARAMS, p16)
    sched = out / "scheduler"
    sched.mkdir(exist_ok=True)
    (sched / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }
    source = "scripts/train_tiny.py (trained from scratch on Fashion-MNIST)"
    manifest = checkpoint.manifest(jnp.float16, CLASS_NAMES, source, index)
    (out / checkpoint.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def component_configs() -> dict[str, dict]:
    """config.json of each component, as diffusers / transformers write them."""
    unet = UNetConfig.from_diffusers(UNET_CONFIG).to_diffusers()
    unet["_diffusers_version"] = DIFFUSERS_VERSION
    vae = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        **AutoencoderKLConfig.from_diffusers(VAE_CONFIG).to_dict(),
    }
    te = {}
    for name, cfg, arch in (
        ("text_encoder", TE1_CONFIG, "CLIPTextModel"),
        ("text_encoder_2", TE2_CONFIG, "CLIPTextModelWithProjection"),
    ):
        te[name] = {
            "architectures": [arch],
            **CLIPTextConfig.from_hf(cfg).to_dict(),
            "transformers_version": TRANSFORMERS_VERSION,
        }
    return {"unet": unet, "vae": vae, **te}


# ---- generation (what tests/test_tiny_model.py calls) -----------------------------------


def generate_images(
    model_dir: str | os.PathLike,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance_scale: float = 5.0,
) -> np.ndarray:
    """Text -> images with the converted model in `model_dir`; our own Euler + CFG loop.

    Loads every component with `checkpoint.load_component`, encodes the prompts like SDXL
    (negative = the empty prompt ""), runs diffusers' EulerDiscreteScheduler arithmetic for the
    shipped scheduler config at the default resolution, and decodes with the VAE.

    Returns:
      uint8 `[len(prompts), len(seeds), H, W, 3]`; image (p, s) starts from `PRNGKey(s)` noise.
    """
    model_dir = Path(model_dir)
    unet, pu = checkpoint.load_component(model_dir, "unet")
    vae, pv = checkpoint.load_component(model_dir, "vae")
    te1, p1 = checkpoint.load_component(model_dir, "text_encoder")
    te2, p2 = checkpoint.load_component(model_dir, "text_encoder_2")
    sched = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    f = vae.config.downsample_factor
    h = w = unet.config.sample_size  # latent size; the image is f times larger
    embeds, pooled = encode_prompts(te1, p1, te2, p2, load_tokenizers(model_dir), [*prompts, ""])
    n_p, n_s = len(prompts), len(seeds)
    cond = np.repeat(embeds[:n_p], n_s, 0)  # [P*S, 77, D], prompt-major
    cond_pooled = np.repeat(pooled[:n_p], n_s, 0)
    n = n_p * n_s
    ctx = jnp.concatenate([jnp.broadcast_to(embeds[n_p], cond.shape), cond])  # [uncond; cond]
    txt = jnp.concatenate([jnp.broadcast_to(pooled[n_p], cond_pooled.shape), cond_pooled])
    tids = jnp.asarray([[h * f, w * f, 0, 0, h * f, w * f]] * 2 * n, jnp.float32)
    timesteps, sigmas = euler_sigmas(sched, steps)

    @jax.jit
    def eps_fn(x, t, sigma):
        xin = jnp.concatenate([x, x]) / jnp.sqrt(sigma**2 + 1)
        e = unet.apply({"params": pu}, xin, t, ctx, {"text_embeds": txt, "time_ids": tids})
        e_u, e_c = jnp.split(e, 2)
        return e_u + guidance_scale * (e_c - e_u)

    noise = jnp.stack(
        [jax.random.normal(jax.random.key(s), (h, w, unet.config.in_channels)) for s in seeds]
    )
    x = jnp.tile(noise, (n_p, 1, 1, 1)) * np.sqrt(sigmas.max() ** 2 + 1)  # init_noise_sigma
    for i, t in enumerate(timesteps):
        eps = eps_fn(x, jnp.float32(t), jnp.float32(sigmas[i]))
        x = x + (sigmas[i + 1] - sigmas[i]) * eps  # Euler: dx/dsigma = eps
    decode = jax.jit(lambda z: vae.apply({"params": pv}, z, method="decode"))
    img = decode(x / vae.config.scaling_factor)
    img = np.asarray(jnp.clip((img + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
    return img.reshape(n_p, n_s, *img.shape[1:])


def conditioning_accuracy(images: np.ndarray, classifier_path: str | os.PathLike) -> np.ndarray:
    """Per prompted class, the fraction of `images [P, S, H, W, 3]` classified as that class."""
    params = load_classifier(classifier_path)
    p, s = images.shape[:2]
    pred = classify(params, to_gray(images.reshape(p * s, *images.shape[2:]))).reshape(p, s)
    return (pred == np.arange(p)[:, None]).mean(1)


def save_grid(images: np.ndarray, path: Path, scale: int = 3) -> None:
    """`[P, S, H, W, 3]` uint8 -> one row per prompt, nearest-upscaled, class name on the left."""
    from PIL import Image, ImageDraw

    p, s, h, w, _ = images.shape
    label_w, pad = 90, 2
    grid = Image.new("RGB", (label_w + s * (w * scale + pad), p * (h * scale + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(p):
        y = i * (h * scale + pad)
        draw.text((4, y + h * scale // 2 - 6), CLASSES[i], fill="black")
        for j in range(s):
            tile = Image.fromarray(images[i, j]).resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(tile, (label_w + j * (w * scale + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ---- main -------------------------------------------------------------------------------


def sample_and_report(out: Path, args: argparse.Namespace, report: dict) -> dict:
    """Sample the grid from the saved model, classify it, write training.json; returns report."""
    t0 = time.time()
    seeds = list(range(1000, 1000 + args.grid_seeds))
    images = generate_images(out, list(PROMPTS), seeds, args.sample_steps, args.guidance)
    save_grid(images, Path(args.grid))
    acc = conditioning_accuracy(images, out / "classifier.npz")
    log(
        f"generated {images.shape[:2]} in {time.time() - t0:.0f} s; accuracy per class "
        f"{np.round(acc, 2).tolist()}, mean {acc.mean():.3f}"
    )
    report["samples"] = {
        "sampler": "Euler (EulerDiscreteScheduler config), CFG against the empty prompt",
        "steps": args.sample_steps,
        "guidance_scale": args.guidance,
        "seeds": seeds,
        "grid": str(Path(args.grid).resolve().relative_to(ROOT))
        if ROOT in Path(args.grid).resolve().parents
        else args.grid,
        "classifier_accuracy_per_class": dict(zip(CLASSES, acc.round(3).tolist())),
        "classifier_accuracy_mean": float(acc.mean()),
    }
    files = [f for f in out.rglob("*") if f.is_file() and f.name != "training.json"]
    report["model_dir_bytes"] = sum(f.stat().st_size for f in files)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "distrifusion_jax/assets/tiny-sdxl"))
    p.add_argument("--grid", default=str(ROOT / "results/tiny_model_samples.png"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier-epochs", type=int, default=1)
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--encode-images", type=int, default=40000, help="train images encoded")
    p.add_argument("--text-steps", type=int, default=300)
    p.add_argument("--unet-steps", type=int, default=1700)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--unet-minutes", type=float, default=48.0, help="wall-clock guard")
    p.add_argument("--unet-stop", type=int, default=None,
                   help="stop after this step, the schedule still planned for --unet-steps "
                   "(replay a guard-stopped run: the shipped model is --unet-stop 1564)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--grid-seeds", type=int, default=8)
    p.add_argument("--sample-only", action="store_true", help="skip training: resample the grid")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything (~4 min)")
    args = p.parse_args()
    if args.smoke:
        args.classifier_epochs, args.vae_steps, args.encode_images = 0, 20, 2000
        args.unet_steps, args.sample_steps, args.grid_seeds = 20, 4, 2
        args.text_steps = 20
    out = Path(args.out)
    if not (out / "tokenizer" / "vocab.json").is_file():
        raise FileNotFoundError(f"{out}/tokenizer missing: run scripts/make_clip_tokenizer.py")
    if args.sample_only:
        report = json.loads((out / "training.json").read_text())
        sample_and_report(out, args, report)
        return
    t_start = time.time()
    log(f"devices {jax.devices()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    x, y = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    cls_params, cls_stats = train_classifier(
        x, y, x_test, y_test, args.classifier_epochs, args.seed
    )
    save_classifier(out / "classifier.npz", cls_params)

    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(VAE_CONFIG))
    vae_params, vae_stats = train_vae(vae, x, args.vae_steps, 32, args.seed)
    vae_params = as_f16(vae_params)  # the UNet learns the latents of the shipped VAE
    lat = encode_all(vae, vae_params, x[: args.encode_images])
    scaling = float(f"{1.0 / lat.std():.5f}")  # as SD: unit-variance latents for the UNet
    log(f"latents {lat.shape}: std {lat.std():.4f} -> scaling_factor {scaling}")
    lat = (lat * scaling).astype(np.float16)
    recon = vae.apply(
        {"params": vae_params}, lat[:500].astype(np.float32) / scaling, method="decode"
    )
    vae_stats["psnr_db_500_train"] = float(
        10 * np.log10(4.0 / np.mean((np.asarray(recon) - np.repeat(x[:500], 3, -1)) ** 2))
    )
    vae_stats["scaling_factor"] = scaling
    log(f"vae: {count(vae_params):,} params, recon PSNR {vae_stats['psnr_db_500_train']:.2f} dB")

    te1 = CLIPTextModel(CLIPTextConfig.from_hf(TE1_CONFIG))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_hf(TE2_CONFIG))
    ids0 = jnp.zeros((1, 77), jnp.int32)
    te_init = {
        "text_encoder": te1.init(jax.random.key(args.seed + 11), ids0)["params"],
        "text_encoder_2": te2.init(jax.random.key(args.seed + 12), ids0)["params"],
    }
    ids = token_ids(load_tokenizers(out), [*PROMPTS, ""])  # [11, 77] each
    te_params, te_stats = separate_prompts((te1, te2, *ids, te_init), args.text_steps)
    te_params = as_f16(te_params)  # the UNet learns the conditioning of the shipped encoders
    embeds, pooled = encode_text(te1, te2, *ids, te_params)

    unet = UNet2DConditionModel(UNetConfig.from_diffusers(UNET_CONFIG))
    unet_params, unet_stats = train_unet(unet, embeds, pooled, lat, y[: args.encode_images], args)
    log(f"unet: {count(unet_params):,} params; {unet_stats}")
    trained = {"unet": unet_params, **te_params}

    configs = component_configs()
    configs["vae"]["scaling_factor"] = scaling
    parts = {"vae": (configs["vae"], vae_params)}
    parts.update({name: (configs[name], trained[name]) for name in trained})
    save_model(out, parts)

    report = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "seed": args.seed,
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist), 60k train / 10k test, 28x28 "
        f"padded to 32x32, gray replicated to RGB; UNet on the first {args.encode_images:,}",
        "prompts": list(PROMPTS),
        "resolution": RES,
        "latent_shape": [RES, RES, 4],
        "time_ids": list(TIME_IDS),
        "params": {name: count(params) for name, (_, params) in parts.items()}
        | {"classifier": count(cls_params)},
        "trained": {
            "classifier": "real images, for the conditioning test",
            "vae": "autoencoder phase first, then frozen",
            "text_encoder, text_encoder_2": "pushed apart on the 11 prompts (separate_prompts), "
            "then frozen",
            "unet": "on frozen VAE latents and frozen text conditioning; EMA shipped",
        },
        "init_seeds": {
            "classifier": args.seed,
            "vae": args.seed,
            "unet": args.seed,
            "text_encoder": args.seed + 11,
            "text_encoder_2": args.seed + 12,
        },
        "stored_dtype": "float16",
        "classifier": cls_stats,
        "vae": vae_stats,
        "text_encoders": te_stats,
        "unet": unet_stats,
        "smoke": args.smoke,
    }
    report = sample_and_report(out, args, report)
    report["wall_seconds"] = round(time.time() - t_start, 1)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(
        f"done in {report['wall_seconds'] / 60:.1f} min; {out}: {report['model_dir_bytes'] / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
