"""The shipped tiny model's recipe: four training phases, then the converted model folder.

1. classifier (`eval/classifier.py`, for the conditioning test) on real images;
2. AutoencoderKL (factor 1), then frozen; latents scaled to unit variance;
3. both CLIP text encoders pushed apart on the 11 prompts (`separate_prompts`), then frozen;
4. the UNet on frozen latents and conditioning; its EMA is shipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distrifusion_jax.eval.classifier import CLASSIFIER_FILE, save_classifier, train_classifier
from distrifusion_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from distrifusion_jax.models.unet import UNet2DConditionModel
from distrifusion_jax.models.unet_config import UNetConfig
from distrifusion_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from distrifusion_jax.tiny import configs
from distrifusion_jax.tiny.export import as_f16, count, save_model
from distrifusion_jax.tiny.fashion_mnist import PROMPTS, load_fashion_mnist
from distrifusion_jax.tiny.train import (
    TrainOptions,
    encode_all,
    separate_prompts,
    text_conditioning,
    train_unet,
    train_vae,
)

TRAINED = {
    "classifier": "real images, for the conditioning test",
    "vae": "autoencoder phase first, then frozen",
    "text_encoder, text_encoder_2": "pushed apart on the 11 prompts (separate_prompts), "
    "then frozen",
    "unet": "on frozen VAE latents and frozen text conditioning; EMA shipped",
}


def log(msg: str) -> None:
    """A progress line with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_tokenizers(model_dir: Path) -> tuple[Any, Any]:
    """The two CLIP tokenizers in `model_dir/tokenizer{,_2}` (no network)."""
    from distrifusion_jax.prompt import load_clip_tokenizer

    return tuple(load_clip_tokenizer(model_dir / n) for n in ("tokenizer", "tokenizer_2"))


def _vae_phase(x: np.ndarray, opts: TrainOptions):
    """Train the VAE, encode the UNet's images; (params, scaled f16 latents, stats)."""
    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(configs.VAE_CONFIG))
    params, stats = train_vae(vae, x, opts.vae_steps, 32, opts.seed, log)
    params = as_f16(params)  # the UNet learns the latents of the shipped VAE
    lat = encode_all(vae, params, x[: opts.encode_images])  # [N, 32, 32, 4]
    scaling = float(f"{1.0 / lat.std():.5f}")  # as SD: unit-variance latents for the UNet
    log(f"latents {lat.shape}: std {lat.std():.4f} -> scaling_factor {scaling}")
    lat = (lat * scaling).astype(np.float16)
    recon = vae.apply({"params": params}, lat[:500].astype(np.float32) / scaling, method="decode")
    mse = np.mean((np.asarray(recon) - np.repeat(x[:500], 3, -1)) ** 2)
    stats["psnr_db_500_train"] = float(10 * np.log10(4.0 / mse))  # range [-1, 1]: peak^2 = 4
    stats["scaling_factor"] = scaling
    log(f"vae: {count(params):,} params, recon PSNR {stats['psnr_db_500_train']:.2f} dB")
    return params, lat, stats


def _text_phase(out: Path, opts: TrainOptions):
    """Train both text encoders; (f16 params, context `[11, 77, 64]`, pooled `[11, 32]`, stats)."""
    modules = (
        CLIPTextModel(CLIPTextConfig.from_hf(configs.TE1_CONFIG)),
        CLIPTextModelWithProjection(CLIPTextConfig.from_hf(configs.TE2_CONFIG)),
    )
    ids0 = jnp.zeros((1, 77), jnp.int32)
    init = {
        "text_encoder": modules[0].init(jax.random.key(opts.seed + 11), ids0)["params"],
        "text_encoder_2": modules[1].init(jax.random.key(opts.seed + 12), ids0)["params"],
    }
    tokenizers, prompts = load_tokenizers(out), [*PROMPTS, ""]
    params, stats = separate_prompts(modules, tokenizers, init, prompts, opts.text_steps, log)
    params = as_f16(params)  # the UNet learns the conditioning of the shipped encoders
    embeds, pooled = text_conditioning(modules, tokenizers, params, prompts)
    return params, embeds, pooled, stats


def train_and_save(out: Path, opts: TrainOptions, smoke: bool = False) -> dict[str, Any]:
    """Run the four phases and write the model to `out` (which holds the tokenizers).

    Returns:
      the training report (training.json without "samples").
    """
    log(f"devices {jax.devices()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    x, y = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    cls_params, cls_stats = train_classifier(
        x, y, x_test, y_test, opts.classifier_epochs, opts.seed, log
    )
    save_classifier(out / CLASSIFIER_FILE, cls_params)

    vae_params, lat, vae_stats = _vae_phase(x, opts)
    te_params, embeds, pooled, te_stats = _text_phase(out, opts)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(configs.UNET_CONFIG))
    unet_params, unet_stats = train_unet(
        unet, embeds, pooled, lat, y[: opts.encode_images], opts, log
    )
    log(f"unet: {count(unet_params):,} params; {unet_stats}")

    cfgs = configs.component_configs()
    cfgs["vae"]["scaling_factor"] = vae_stats["scaling_factor"]
    trained = {"vae": vae_params, "unet": unet_params, **te_params}
    parts = {name: (cfgs[name], trained[name]) for name in trained}
    save_model(out, parts)
    return {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "seed": opts.seed,
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist), 60k train / 10k test, 28x28 "
        f"padded to 32x32, gray replicated to RGB; UNet on the first {opts.encode_images:,}",
        "prompts": list(PROMPTS),
        "resolution": configs.RES,
        "latent_shape": [configs.RES, configs.RES, 4],
        "time_ids": list(configs.TIME_IDS),
        "params": {name: count(p) for name, (_, p) in parts.items()}
        | {"classifier": count(cls_params)},
        "trained": TRAINED,
        "init_seeds": {
            "classifier": opts.seed,
            "vae": opts.seed,
            "unet": opts.seed,
            "text_encoder": opts.seed + 11,
            "text_encoder_2": opts.seed + 12,
        },
        "stored_dtype": "float16",
        "classifier": cls_stats,
        "vae": vae_stats,
        "text_encoders": te_stats,
        "unet": unet_stats,
        "smoke": smoke,
    }
