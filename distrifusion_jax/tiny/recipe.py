"""The shipped tiny model's recipe: four training phases, then the converted model folder.

1. classifier (`eval/classifier.py`, for the conditioning test) on real images;
2. AutoencoderKL (factor 2: 64x64 px -> 32x32x4), then frozen; latents scaled to unit variance;
3. both CLIP text encoders pushed apart on the 11 prompts (`separate_prompts`), then frozen;
4. the UNet on frozen latents and conditioning; its EMA is shipped.

`retrofit_and_save` gives a trained model a new VAE in the same latent space (and optionally
more UNet steps): how the shipped model got its two-level VAE (`scripts/train_tiny.py`).
"""

from __future__ import annotations

import json
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
from distrifusion_jax.tiny.fashion_mnist import PROMPTS, load_fashion_mnist, upscale
from distrifusion_jax.tiny.train import (
    TrainOptions,
    encode_all,
    separate_prompts,
    text_conditioning,
    train_unet,
    train_vae,
    tune_decoder,
)

TRAINED = {
    "classifier": "real images, for the conditioning test",
    "vae": "autoencoder phase first (half of each batch decoded from noisy latents), then frozen",
    "text_encoder, text_encoder_2": "pushed apart on the 11 prompts (separate_prompts), "
    "then frozen",
    "unet": "on frozen VAE latents and frozen text conditioning; EMA shipped",
    "vae decoder (last)": "fine-tuned on the UNet's own latents towards the gray, black-framed "
    "projection of its decode, half of each batch real reconstructions (tune_decoder)",
}

# Sampler settings of the decoder fine-tune's UNet latents: (steps, CFG scale, negative prompt),
# what the check, the README and generate.py's defaults use. Seeds from DECODER_SEED0 on:
# disjoint from the check's 1000.. and generate.py's 0..
DECODER_SAMPLING = ((25, 5.0, ""), (30, 5.0, None), (25, 3.0, ""), (40, 7.0, None))
DECODER_SEED0 = 5000


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
    params, stats = train_vae(vae, x, opts, log)
    params = as_f16(params)  # the UNet learns the latents of the shipped VAE
    lat = encode_all(vae, params, x[: opts.encode_images])  # [N, 32, 32, 4]
    scaling = float(f"{1.0 / lat.std():.5f}")  # as SD: unit-variance latents for the UNet
    log(f"latents {lat.shape}: std {lat.std():.4f} -> scaling_factor {scaling}")
    lat = (lat * scaling).astype(np.float16)
    recon = vae.apply({"params": params}, lat[:500].astype(np.float32) / scaling, method="decode")
    mse = np.mean((np.asarray(recon) - np.repeat(upscale(x[:500], configs.VAE_FACTOR), 3, -1)) ** 2)
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


def generated_latents(model_dir: Path, seeds_per_prompt: int) -> np.ndarray:
    """The saved model's own latents for the 10 class prompts, unscaled `[10 * S, h, w, 4]`.

    Seeds DECODER_SEED0.. (S per prompt), split over the DECODER_SAMPLING settings.
    """
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    pipe = DistriSDXLPipeline.from_pretrained(model_dir)
    shape = (pipe.default_size // pipe.vae_scale_factor,) * 2 + (pipe.unet.config.in_channels,)
    seeds = np.arange(DECODER_SEED0, DECODER_SEED0 + seeds_per_prompt)
    out = []
    for k, (steps, cfg, negative) in enumerate(DECODER_SAMPLING):
        part = seeds[k :: len(DECODER_SAMPLING)]
        noise = np.stack(
            [np.asarray(jax.random.normal(jax.random.key(int(s)), shape)) for s in part]
        )
        lat = pipe.generate_latents(
            [p for p in PROMPTS for _ in part],
            None if negative is None else [negative] * (len(PROMPTS) * len(part)),
            num_inference_steps=steps,
            guidance_scale=cfg,
            noise=np.tile(noise, (len(PROMPTS), 1, 1, 1)),
        )
        out.append(np.asarray(lat, np.float32) / pipe.vae.config.scaling_factor)
        log(
            f"generated {out[-1].shape[0]} latents ({steps} steps, CFG {cfg}, negative {negative!r})"
        )
    return np.concatenate(out)


def clean_decoder(out: Path, opts: TrainOptions) -> dict[str, Any]:
    """Phase 5: fine-tune the decoder of the model in `out` on its UNet's latents, in place.

    Returns:
      the decoder's stats (training.json "vae_decoder_tuned").
    """
    from distrifusion_jax.io import checkpoint

    x, _ = load_fashion_mnist("train")
    gen = generated_latents(out, opts.decoder_seeds)
    vae, params = checkpoint.load_component(out, "vae")
    params, stats = tune_decoder(vae, params, x, gen, opts, log)
    stats["sampling"] = [list(s) for s in DECODER_SAMPLING]
    stats["seeds"] = f"{DECODER_SEED0}..{DECODER_SEED0 + opts.decoder_seeds - 1} per prompt"
    cfg = json.loads((out / "vae" / "config.json").read_text())
    save_model(out, {"vae": (cfg, as_f16(params))})
    log(f"decoder tuned: {stats}")
    return stats


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
    tuned = clean_decoder(out, opts) if opts.decoder_steps else None
    return {
        "vae_decoder_tuned": tuned,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "seed": opts.seed,
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist), 60k train / 10k test, 28x28 "
        f"padded to 32x32 (black border), nearest-upscaled x{configs.VAE_FACTOR} to "
        f"{configs.RES}x{configs.RES}, gray replicated to RGB; UNet on the first "
        f"{opts.encode_images:,}",
        "prompts": list(PROMPTS),
        "resolution": configs.RES,
        "vae_factor": configs.VAE_FACTOR,
        "latent_shape": [configs.LATENT, configs.LATENT, 4],
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


def retrofit_and_save(out: Path, prev: Path, opts: TrainOptions) -> dict[str, Any]:
    """A new VAE for a trained model `prev` (same latent space), and optionally more UNet steps.

    The classifier, both text encoders and the UNet's starting point come from `prev`; its
    VAE is the teacher (`train_vae(teacher=...)`): the new one encodes the upscaled images into
    the teacher's latents and decodes them (and noisy ones) into clean images, so `prev`'s
    UNet works unchanged. With `opts.unet_steps > 0` the UNet then continues training on the
    teacher's latents (`train_unet(init=...)`).

    Returns:
      the training report: `prev`'s, with "vae" and "unet_continued" replaced or added.
    """
    import shutil

    from distrifusion_jax.io import checkpoint

    log(f"devices {jax.devices()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    report = json.loads((prev / "training.json").read_text())
    report.pop("samples", None)
    x, y = load_fashion_mnist("train")
    shutil.copy(prev / CLASSIFIER_FILE, out / CLASSIFIER_FILE)
    teacher, t_params = checkpoint.load_component(prev, "vae")
    cfgs = configs.component_configs()
    cfgs["vae"]["scaling_factor"] = scaling = teacher.config.scaling_factor
    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(configs.VAE_CONFIG))
    vae_params, vae_stats = train_vae(vae, x, opts, log, teacher=(teacher, t_params))
    vae_params = as_f16(vae_params)
    enc = jax.jit(lambda p, xb: teacher.apply({"params": p}, xb, method="encode")[0])
    lat = np.concatenate(
        [
            np.asarray(enc(t_params, np.repeat(x[i : i + 500], 3, -1)))
            for i in range(0, opts.encode_images, 500)
        ]
    )  # [N, 32, 32, 4]: the teacher's posterior means, as the UNet was trained on
    own = encode_all(vae, vae_params, x[:500])
    dec = vae.apply({"params": vae_params}, lat[:500], method="decode")
    mse = np.mean((np.asarray(dec) - np.repeat(upscale(x[:500], configs.VAE_FACTOR), 3, -1)) ** 2)
    vae_stats["psnr_db_500_train"] = float(10 * np.log10(4.0 / mse))
    vae_stats["latent_rmse_vs_teacher_in_stds"] = float(
        np.sqrt(np.mean((own - lat[:500]) ** 2)) / lat.std()
    )
    vae_stats["scaling_factor"] = scaling
    vae_stats["teacher"] = f"{prev.name}'s VAE (factor {teacher.config.downsample_factor})"
    log(f"vae: {count(vae_params):,} params; {vae_stats}")

    names = ("unet", "text_encoder", "text_encoder_2")
    loaded = {n: checkpoint.load_component(prev, n) for n in names}
    trained = {n: loaded[n][1] for n in names}
    if opts.unet_steps:
        tokenizers = load_tokenizers(out)
        modules = (loaded["text_encoder"][0], loaded["text_encoder_2"][0])
        embeds, pooled = text_conditioning(modules, tokenizers, trained, [*PROMPTS, ""])
        lat = (lat * scaling).astype(np.float16)
        unet = UNet2DConditionModel(UNetConfig.from_diffusers(configs.UNET_CONFIG))
        trained["unet"], report["unet_continued"] = train_unet(
            unet, embeds, pooled, lat, y[: opts.encode_images], opts, log, init=trained["unet"]
        )
        log(f"unet continued: {report['unet_continued']}")
    trained["vae"] = vae_params
    parts = {name: (cfgs[name], trained[name]) for name in trained}
    save_model(out, parts)
    report["vae_decoder_tuned"] = clean_decoder(out, opts) if opts.decoder_steps else None
    report.update(
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        data=report["data"] + f"; VAE on the same images nearest-upscaled x{configs.VAE_FACTOR}",
        resolution=configs.RES,
        vae_factor=configs.VAE_FACTOR,
        latent_shape=[configs.LATENT, configs.LATENT, 4],
        time_ids=list(configs.TIME_IDS),
        vae=vae_stats,
    )
    report["params"]["vae"] = count(vae_params)
    report["trained"] = dict(report["trained"], vae=RETROFIT_VAE)
    if opts.unet_steps:
        report["trained"]["unet"] += (
            f"; then {opts.unet_steps} more steps on the same latents at the new time ids "
            "(unet_continued)"
        )
    report["first_run_wall_seconds"] = report.pop("wall_seconds", None)
    return report


RETROFIT_VAE = (
    "retrofitted: a two-level VAE trained to the first model's one-level VAE latent space "
    "(its encoder regresses the old posterior; its decoder reconstructs 64x64 images from old "
    "latents, half of each batch noisy), so the UNet trained on those latents is kept"
)
