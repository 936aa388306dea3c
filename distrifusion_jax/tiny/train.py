"""The tiny model's training phases after the classifier: VAE, text encoders, UNet (JAX + optax).

Each phase trains one component and returns (params, stats); `recipe.py` runs them in order,
freezing each before the next. optax is the `test` extra.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distrifusion_jax.prompt import TextEncoder, encode_prompts
from distrifusion_jax.tiny.configs import SCHEDULER_CONFIG, TIME_IDS
from distrifusion_jax.tiny.fashion_mnist import CLASSES, upscale

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The recipe's knobs (`scripts/train_tiny.py` flags of the same names)."""

    seed: int = 0
    classifier_epochs: int = 1
    vae_steps: int = 600
    vae_batch: int = 16
    vae_latent_noise: float = 0.5  # half of each VAE batch: latent noise up to this many stds
    encode_images: int = 40000  # train images encoded for the UNet
    text_steps: int = 300
    unet_steps: int = 1700  # the learning-rate schedule is planned for this many
    unet_batch: int = 32
    unet_lr: float = 1e-3
    ema: float = 0.998
    unet_minutes: float = float("inf")  # wall-clock guard (off)
    unet_stop: int | None = None  # stop after this step (replays a guard-stopped run)
    unet_stop_file: str | None = None  # stop once this file exists (a manual guard)
    decoder_steps: int = 4000  # decoder fine-tune on UNet latents (tune_decoder); 0: none
    decoder_seeds: int = 48  # generated latents per class prompt for it


def training_alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    """`[1000]` alpha-bar of the scaled_linear schedule, float64.

    The shipped model was trained on this float64 product; the library's schedulers compute
    it in float32 as diffusers does (up to 5e-7 apart), so replaying a run keeps this one.
    """
    if config["beta_schedule"] != "scaled_linear" or config["prediction_type"] != "epsilon":
        raise ValueError(f"only scaled_linear/epsilon is implemented here, got {config}")
    n = config["num_train_timesteps"]
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    return np.cumprod(1.0 - betas)


# ---- VAE --------------------------------------------------------------------------------


def train_vae(vae, x: np.ndarray, opts: TrainOptions, log: Log = print, teacher=None):
    """L1 + L2 reconstruction of posterior samples, L1 channel spread, KL weight 1e-4; Adam
    2e-3 -> cosine.

    Half of each batch is decoded from a posterior sample plus Gaussian noise (per pixel, and
    half as much as a per-channel offset) of a random scale up to `opts.vae_latent_noise`
    latent standard deviations, so that the decoder maps latents near the data's (what a UNet
    generates) to clean gray images: the first shipped VAE, 300 steps on clean latents only,
    turned the UNet's latent errors into colour speckle and grey borders, and every decoded
    corner pixel was ~32/255 brighter than its neighbours.

    With a `teacher` (module, params), another VAE's latent space is kept (a UNet trained on
    it works unchanged): the decoder reconstructs from the teacher's posterior samples, and the
    encoder regresses the teacher's posterior (mean MSE / its variance + 0.01 logvar MSE)
    instead of the KL term.

    Args:
      vae: an `AutoencoderKL`; x: gray images `[N, 32, 32, 1]` in [-1, 1], shown to the VAE
        (and the teacher) nearest-upscaled by its factor and replicated to RGB.
      opts: seed, vae_steps, vae_batch, vae_latent_noise.
      teacher: None, or (AutoencoderKL, params) whose latent has the same shape.
    Returns:
      (params, stats: steps, batch, latent_noise, final_mse, final_mse_noisy_half, seconds)
    """
    f, steps, batch, seed = vae.config.downsample_factor, opts.vae_steps, opts.vae_batch, opts.seed
    f_t = None if teacher is None else teacher[0].config.downsample_factor
    rng = np.random.default_rng(seed)
    params = vae.init(jax.random.key(seed), np.repeat(upscale(x[:1], f), 3, -1))["params"]
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adam(optax.warmup_cosine_decay_schedule(0, 2e-3, min(50, steps // 5), steps, 1e-4)),
    )
    state = opt.init(params)
    half = batch // 2

    @jax.jit
    def step(params, state, xb, xt, key):
        k_post, k_noise, k_scale = jax.random.split(key, 3)
        if teacher is not None:
            t_mean, t_logvar = teacher[0].apply({"params": teacher[1]}, xt, method="encode")

        def loss_fn(p):
            mean, logvar = vae.apply({"params": p}, xb, method="encode")
            if teacher is None:
                kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
                latent_loss = 1e-4 * kl
            else:
                latent_loss = jnp.mean((mean - t_mean) ** 2) / jnp.var(t_mean)
                latent_loss += 0.01 * jnp.mean((logvar - t_logvar) ** 2)
                mean, logvar = t_mean, t_logvar  # decode the teacher's latents
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_post, mean.shape)
            m = batch - half
            scale = jax.random.uniform(k_scale, (m, 1, 1, 1)) * opts.vae_latent_noise
            k_pix, k_off = jax.random.split(k_noise)
            # per-pixel noise plus half as much per-channel offset, in latent stds
            noise = jax.random.normal(k_pix, z[half:].shape)
            noise = noise + 0.5 * jax.random.normal(k_off, (m, 1, 1, z.shape[-1]))
            noise = scale * jax.lax.stop_gradient(jnp.std(mean)) * noise
            z = jnp.concatenate([z[:half], z[half:] + noise])  # [batch, h, w, 4]
            rec = vae.apply({"params": p}, z, method="decode")
            err = rec - xb
            mse = jnp.mean(err**2, axis=(1, 2, 3))  # [batch]
            colour = jnp.mean(jnp.abs(rec - rec.mean(-1, keepdims=True)))  # the targets are gray
            loss = jnp.mean(jnp.abs(err)) + jnp.mean(mse) + colour + latent_loss
            return loss, (jnp.mean(mse[:half]), jnp.mean(mse[half:]))

        (loss, mses), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, state = opt.update(g, state)
        return optax.apply_updates(params, u), state, loss, mses

    t0, mses = time.time(), []
    for i in range(steps):
        idx = rng.integers(0, len(x), batch)
        xb = np.repeat(upscale(x[idx], f), 3, axis=-1)  # [batch, 32f, 32f, 3]
        xt = None if teacher is None else np.repeat(upscale(x[idx], f_t), 3, axis=-1)
        params, state, loss, mse = step(params, state, xb, xt, jax.random.key(seed * 7919 + i))
        mses.append([float(m) for m in mse])
        if (i + 1) % 100 == 0 or i + 1 == steps:
            m = np.mean(mses[-50:], axis=0)
            el = time.time() - t0
            log(
                f"vae step {i + 1}/{steps}: loss {float(loss):.4f} mse {m[0]:.5f} "
                f"(noisy latents {m[1]:.5f}) ({el / (i + 1):.2f} s/step, {el / 60:.1f} min)"
            )
    m = np.mean(mses[-50:], axis=0)
    stats = {
        "steps": steps,
        "batch": batch,
        "latent_noise": opts.vae_latent_noise,
        "latent_space": "its own (KL 1e-4)" if teacher is None else "the teacher VAE's",
        "final_mse": float(m[0]),
        "final_mse_noisy_half": float(m[1]),
    }
    return params, {**stats, "seconds": time.time() - t0}


def encode_all(vae, params, x: np.ndarray) -> np.ndarray:
    """Posterior means `[N, 32, 32, 4]` (unscaled) of gray 32x32 images, shown to the VAE
    upscaled by its factor and replicated to RGB."""
    f = vae.config.downsample_factor
    enc = jax.jit(lambda p, xb: vae.apply({"params": p}, xb, method="encode")[0])
    out = [
        np.asarray(enc(params, np.repeat(upscale(x[i : i + 500], f), 3, -1)))
        for i in range(0, len(x), 500)
    ]
    return np.concatenate(out)


def clean_target(images: np.ndarray) -> np.ndarray:
    """What the data says an image must be: gray (R = G = B = channel mean) with a black frame.

    Args:
      images: `[N, H, W, 3]` in [-1, 1], H = W a multiple of 16 (the 28x28 images padded to
        32x32 leave a frame of H / 16 pixels).
    Returns:
      `[N, H, W, 3]`: the gray projection, clipped to [-1, 1], frame set to -1.
    """
    gray = np.clip(images.mean(-1, keepdims=True), -1.0, 1.0)
    b = images.shape[1] // 16
    frame = np.ones(images.shape[1:3], bool)
    frame[b:-b, b:-b] = False
    gray[:, frame] = -1.0
    return np.repeat(gray, 3, axis=-1)


CHROMA_WEIGHT = 3.0  # tune_decoder: extra weight on an output's colour (R, G, B apart)


def frame_weights(size: int, frame: float = 8.0, corner: float = 1000.0) -> np.ndarray:
    """Per-pixel loss weights `[size, size, 1]`: 1 inside, `frame` on the padding frame
    (width b = size / 16), `corner` on its four b/2 x b/2 corner blocks.

    Corners are 4 of 4096 pixels at 64 px, so an unweighted loss leaves the conv padding's
    bright corner pixels alone; the frame is 23% of the pixels but must be exactly black.
    """
    b = size // 16
    w = np.ones((size, size, 1), np.float32)
    w[:b], w[-b:], w[:, :b], w[:, -b:] = frame, frame, frame, frame
    c = max(1, b // 2)
    for rows in (slice(0, c), slice(size - c, size)):
        for cols in (slice(0, c), slice(size - c, size)):
            w[rows, cols] = corner
    return w / w.mean()


def tune_decoder(
    vae,
    params,
    x: np.ndarray,
    generated: np.ndarray,
    opts: TrainOptions,
    log: Log = print,
):
    """Fine-tune the VAE decoder on the latents the UNet actually draws; encoder kept.

    The shipped model's images carried colour speckle, grey frames and bright corner pixels
    because the decoder only ever saw encoder latents (plus noise): the UNet's latents lie off
    that distribution, and the decoder turns the difference into colour. Here each batch is half
    real latents -> their images (posterior means of `x`; what keeps the decoder a decoder) and
    half UNet latents -> `clean_target` of the frozen decoder's own output (gray, black frame:
    what every training image is). The encoder, `quant_conv` and the latent space are
    untouched, so the UNet needs no retraining. L1 + L2, weighted up on the frame and its
    corners (`frame_weights`), plus `CHROMA_WEIGHT` on colour; Adam 1e-3 -> cosine.

    Args:
      vae, params: the trained `AutoencoderKL` and its params.
      x: gray images `[N, 32, 32, 1]` in [-1, 1] (upscaled by the VAE factor, RGB).
      generated: unscaled UNet latents `[M, h, w, 4]` (sampled with seeds disjoint from any
        check's).
      opts: seed, decoder_steps, vae_batch.
    Returns:
      (params with the new decoder, stats)
    """
    f, steps, seed = vae.config.downsample_factor, opts.decoder_steps, opts.seed
    half = opts.vae_batch // 2
    rng = np.random.default_rng(seed + 19)
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
    targets = np.concatenate(
        [
            clean_target(np.asarray(dec(params, generated[i : i + 64])))
            for i in range(0, len(generated), 64)
        ]
    )  # [M, H, W, 3]
    trained = {k: v for k, v in params.items() if k in ("decoder", "post_quant_conv")}
    frozen = {k: v for k, v in params.items() if k not in trained}
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adam(optax.warmup_cosine_decay_schedule(0, 1e-3, min(50, steps // 5), steps, 2e-5)),
    )
    state = opt.init(trained)
    weights = jnp.asarray(frame_weights(targets.shape[1]))  # [H, W, 1], mean 1

    @jax.jit
    def step(trained, state, xb, zg, tg):
        mean, _ = vae.apply({"params": frozen | trained}, xb, method="encode")

        def loss_fn(t):
            rec = vae.apply({"params": frozen | t}, jnp.concatenate([mean, zg]), method="decode")
            err = rec - jnp.concatenate([xb, tg])
            mse = jnp.mean(err**2, axis=(1, 2, 3))  # [batch], unweighted: what is logged
            chroma = err - err.mean(-1, keepdims=True)  # colour error: the target is gray
            loss = jnp.mean(weights * (jnp.abs(err) + err**2)) + CHROMA_WEIGHT * jnp.mean(
                jnp.abs(chroma) + chroma**2
            )
            return loss, (mse[:half].mean(), mse[half:].mean())

        (loss, mses), g = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        u, state = opt.update(g, state)
        return optax.apply_updates(trained, u), state, loss, mses

    t0, mses = time.time(), []
    for i in range(steps):
        idx, gdx = rng.integers(0, len(x), half), rng.integers(0, len(generated), half)
        xb = np.repeat(upscale(x[idx], f), 3, axis=-1)
        trained, state, loss, mse = step(trained, state, xb, generated[gdx], targets[gdx])
        mses.append([float(m) for m in mse])
        if (i + 1) % 100 == 0 or i + 1 == steps:
            m, el = np.mean(mses[-50:], axis=0), time.time() - t0
            log(
                f"decoder step {i + 1}/{steps}: loss {float(loss):.4f} mse real {m[0]:.5f} "
                f"generated {m[1]:.5f} ({el / (i + 1):.2f} s/step, {el / 60:.1f} min)"
            )
    m = np.mean(mses[-50:], axis=0)
    stats = {
        "steps": steps,
        "batch": 2 * half,
        "generated_latents": len(generated),
        "final_mse_real": float(m[0]),
        "final_mse_generated": float(m[1]),
        "seconds": time.time() - t0,
    }
    return frozen | trained, stats


# ---- text encoders ----------------------------------------------------------------------


def text_conditioning(modules, tokenizers, params: dict, prompts: Sequence[str]):
    """SDXL conditioning through `distrifusion_jax.prompt` (differentiable in `params`).

    Args:
      modules, tokenizers: (te1, te2) and their tokenizers.
      params: {"text_encoder": ..., "text_encoder_2": ...}.
    Returns:
      (context `[N, 77, 64]`, pooled `text_embeds` `[N, 32]`)
    """
    names = ("text_encoder", "text_encoder_2")
    encoders = [TextEncoder(t, m, params[n]) for t, m, n in zip(tokenizers, modules, names)]
    cond = encode_prompts(encoders, prompts, None, False, True, TIME_IDS)  # [1, N, ...]
    return cond["encoder_hidden_states"][0], cond["text_embeds"][0]


def separate_prompts(
    modules, tokenizers, params: dict, prompts: Sequence[str], steps: int, log: Log = print
) -> tuple[dict, dict]:
    """Train both text encoders so the prompts' conditioning vectors point apart.

    At a random init "a photo of a coat" and "a photo of a bag" differ in one token and their
    SDXL conditioning has cosine similarity 0.97-0.99: a UNet trained on them ignores the class
    (21% classifier accuracy, first run); trained jointly with the UNet for 1000 steps they only
    fell to ~0.95 (19%, second run). So, before the UNet, Adam minimises the mean squared cosine
    similarity between different prompts of (a) the pooled `text_embeds [11, 32]` and (b) the
    cross-attention context `[11, 77, 64]` (positions 1..76 flattened; position 0, BOS, is the
    same for all). A CLIP-like stand-in for text pre-training: it only makes the prompts
    distinguishable; what they draw is learnt by the UNet.

    Returns:
      (trained params of both encoders, stats with the cosine similarities before and after)
    """
    opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps, 0.1))
    state = opt.init(params)
    off = ~np.eye(len(prompts), dtype=bool)

    def cosines(p):
        embeds, pooled = text_conditioning(modules, tokenizers, p, prompts)
        out = []
        for v in (pooled, embeds[:, 1:].reshape(len(embeds), -1)):
            v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
            out.append((v @ v.T)[off])
        return out

    @jax.jit
    def step(p, state):
        loss, g = jax.value_and_grad(lambda p: sum(jnp.mean(c**2) for c in cosines(p)))(p)
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


# ---- UNet -------------------------------------------------------------------------------


def noised(k_noise: jax.Array, k_t: jax.Array, x0: jax.Array, ac: jax.Array):
    """One batch of the epsilon objective: timesteps t ~ U{0, T-1} `[b]`, Gaussian noise like
    `x0` `[b, h, w, c]`, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, and min-SNR-5 loss weights
    `[b]` (Hang et al. 2023, epsilon form: min(SNR, 5) / SNR). `ac`: alpha-bar `[T]`."""
    t = jax.random.randint(k_t, (x0.shape[0],), 0, len(ac))
    noise = jax.random.normal(k_noise, x0.shape)
    a = ac[t][:, None, None, None]
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
    snr = a[:, 0, 0, 0] / (1 - a[:, 0, 0, 0])
    return t, noise, xt, jnp.minimum(snr, 5.0) / snr


def update_with_ema(opt, grads, state, params, ema, decay: float, i: jax.Array):
    """An optax step, then the EMA of the weights (decay warmed up as (1 + i) / (10 + i))."""
    u, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, u)
    d = jnp.minimum(decay, (1.0 + i) / (10.0 + i))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
    return params, state, ema


def train_unet(
    unet,
    embeds,
    pooled,
    latents: np.ndarray,
    labels: np.ndarray,
    opts: TrainOptions,
    log: Log = print,
    init: dict | None = None,
) -> tuple[dict, dict]:
    """Epsilon objective, min-SNR-5 weights, 10% condition dropout, AdamW, EMA of the weights.

    Args:
      embeds, pooled: the frozen text encoders' conditioning of the 10 class prompts and then
        the empty prompt "" (row 10): `[11, 77, 64]`, `[11, 32]`.
      latents: scaled VAE latents `[N, 32, 32, 4]`; labels: class ids `[N]`.
      opts: steps, batch, learning rate, EMA decay, wall-clock guard, replay stop.
      init: params to continue training from (default: a fresh init from `opts.seed`).
    Returns:
      (EMA params of the UNet, stats)
    """
    b, seed = opts.unet_batch, opts.seed
    ac = jnp.asarray(training_alphas_cumprod(SCHEDULER_CONFIG), jnp.float32)
    time_ids = jnp.broadcast_to(jnp.asarray(TIME_IDS, jnp.float32), (b, 6))
    embeds, pooled = jnp.asarray(embeds), jnp.asarray(pooled)
    added0 = {"text_embeds": pooled[:1], "time_ids": time_ids[:1]}
    x0 = latents[:1].astype(np.float32)
    if init is not None:
        params = jax.tree.map(jnp.array, init)  # a copy: the step donates its params
    else:
        params = unet.init(jax.random.key(seed), x0, jnp.zeros((1,)), embeds[:1], added0)["params"]
    warmup = min(100, opts.unet_steps // 5)
    lr = optax.warmup_cosine_decay_schedule(
        0.0, opts.unet_lr, warmup, opts.unet_steps, opts.unet_lr * 0.1
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    state = opt.init(params)
    ema = jax.tree.map(jnp.copy, params)  # its own buffers: the step donates both

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, state, ema, xb, yb, i):
        key = jax.random.fold_in(jax.random.key(seed + 1), i)
        k_noise, k_t, k_drop = jax.random.split(key, 3)
        t, noise, xt, w = noised(k_noise, k_t, xb, ac)
        u = jax.random.uniform(k_drop, (b,))
        cond = jnp.where(u < 0.05, len(CLASSES), yb)  # 5%: the empty prompt ""
        keep = (u >= 0.05) & (u < 0.10)  # 5%: zero embeddings (force_zeros_for_empty_prompt)
        scale = jnp.where(keep, 0.0, 1.0)

        ctx = embeds[cond] * scale[:, None, None]  # [b, 77, 64]
        added = {"text_embeds": pooled[cond] * scale[:, None], "time_ids": time_ids}

        def loss_fn(p):
            eps = unet.apply({"params": p}, xt, t.astype(jnp.float32), ctx, added)
            per = jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))  # [b]
            return jnp.mean(w * per), jnp.mean(per)

        (loss, mse), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params, state, ema = update_with_ema(opt, g, state, params, ema, opts.ema, i)
        return params, state, ema, loss, mse

    rng = np.random.default_rng(seed)
    perm, pos = rng.permutation(len(latents)), 0
    t0, losses, mses, done, stopped = time.time(), [], [], 0, False
    for i in range(opts.unet_steps):
        if pos + b > len(perm):
            perm, pos = rng.permutation(len(latents)), 0
        idx = perm[pos : pos + b]
        pos += b
        xb = latents[idx].astype(np.float32)
        params, state, ema, loss, mse = step(params, state, ema, xb, labels[idx], i)
        losses.append(float(loss))
        mses.append(float(mse))
        done = i + 1
        if done % 50 == 0 or done == opts.unet_steps:
            el = time.time() - t0
            log(
                f"unet step {done}/{opts.unet_steps}: loss {np.mean(losses[-50:]):.4f} "
                f"mse {np.mean(mses[-50:]):.4f} ({el / done:.2f} s/step, {el / 60:.1f} min)"
            )
        if opts.unet_stop and done >= opts.unet_stop:
            break  # replays a run that the guard stopped here (same schedule, same weights)
        if time.time() - t0 > 60 * opts.unet_minutes:
            stopped = True
            log(f"unet: wall-clock guard ({opts.unet_minutes} min) stopped training at {done}")
            break
        if opts.unet_stop_file and os.path.exists(opts.unet_stop_file):
            stopped = True
            log(f"unet: {opts.unet_stop_file} exists: stopped training at {done}")
            break
    stats = {
        "steps": done,
        "steps_planned": opts.unet_steps,
        "stopped_early": stopped,  # by the time guard or the stop file: replay with unet_stop
        "batch": b,
        "lr": opts.unet_lr,
        "ema_decay": opts.ema,
        "samples_seen": done * b,
        "final_loss_min_snr": float(np.mean(losses[-100:])),
        "final_mse_eps": float(np.mean(mses[-100:])),
        "seconds": time.time() - t0,
    }
    return ema, stats
