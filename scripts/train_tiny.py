"""Train the tiny SDXL-architecture text-to-image model in distrifusion_jax/assets/tiny-sdxl.

    apt-get install -y dataset-fashion-mnist          # once (root; `apt-get update` first)
    python scripts/make_clip_tokenizer.py             # once: tokenizer/, tokenizer_2/
    python scripts/train_tiny.py                      # from scratch (see below)
    python scripts/train_tiny.py --from-model PREV --unet-steps 600 --unet-lr 3e-4
                                                      # the shipped model (~70 min, loaded CPU)

Data: Fashion-MNIST (Debian `dataset-fashion-mnist`, MIT), 28x28 padded to 32x32 (black
border), nearest-upscaled to 64x64 (each pixel a 2x2 block) for the VAE, gray replicated to RGB,
prompts "a photo of a <class>". Everything is JAX + optax on the project's own Flax models.
From scratch, four phases (`distrifusion_jax/tiny/recipe.py:train_and_save`):
  1. classifier (a small CNN on 32x32, for the conditioning test; 64x64 images are 2x2-pooled)
     on real images;
  2. AutoencoderKL with two levels (downsampling factor 2, as SDXL's 8: 64x64 image -> 32x32x4
     latent, so the latent has 32 rows, n = 8 row bands are possible and band-parallel decoding
     runs the upsampler), half of each batch decoded from noisy latents (`train_vae`: what makes
     the decoder draw clean gray images from imperfect UNet latents), then frozen;
  3. both CLIP text encoders (real 49,408-token vocabulary, hidden 32): a short phase pushes the
     11 prompts' conditioning apart (`separate_prompts`), then they are frozen. (Random text
     encoders give the prompts cosine similarity 0.97-0.99 and a UNet that ignores the class:
     21% classifier accuracy; training them jointly with the UNet for 1000 steps: 19%.)
  4. the UNet (SDXL block layout, text_time conditioning) on frozen VAE latents and the frozen
     conditioning: epsilon objective on SDXL's scaled_linear schedule, min-SNR-5 weighting, 10%
     condition dropout (half the empty prompt "", half zero embeddings as diffusers'
     force_zeros_for_empty_prompt), EMA shipped.
The from-scratch path with the two-level VAE has not been run to the end (the shipped model's
first run, commit 7ea2f96, used a one-level VAE: ~57 min, `--unet-stop 1564`). The shipped
model is that run retrofitted (`--from-model`, `recipe.retrofit_and_save`): its classifier,
text encoders and UNet are kept, a two-level VAE is trained into its VAE's latent space (the
teacher), and the UNet continues `--unet-steps` steps on the teacher's latents at the new
64 px time ids.
Then it writes the model in the converted format (`distrifusion-convert` layout, float16 params),
samples a grid with `distrifusion_jax.tiny.samples.generate_images` (the library pipeline:
Euler, CFG) into results/tiny_model_samples.png, classifies the samples and measures how clean
they are (`tiny/check.py`, as `scripts/check_tiny.py`). Seeded: the same flags give the
same weights on the same machine and XLA thread settings. The wall-clock guard `--unet-minutes`
and `--unet-stop-file` (both off by default) would stop the UNet early, which training.json
records; `--unet-stop K` replays such a run. `--sample-only` redraws the grid, the accuracy and
the checks from the saved model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from distrifusion_jax.tiny import MODEL_DIR
from distrifusion_jax.tiny.recipe import (
    TRAINED,
    clean_decoder,
    log,
    retrofit_and_save,
    train_and_save,
)
from distrifusion_jax.tiny.samples import sample_and_report
from distrifusion_jax.tiny.train import TrainOptions

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {  # a few steps of everything (~4 min)
    "classifier_epochs": 0,
    "vae_steps": 20,
    "encode_images": 2000,
    "unet_steps": 20,
    "text_steps": 20,
    "sample_steps": 4,
    "grid_seeds": 2,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(MODEL_DIR))
    p.add_argument("--grid", default=str(ROOT / "results/tiny_model_samples.png"))
    d = TrainOptions()  # the recipe's defaults
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--classifier-epochs", type=int, default=d.classifier_epochs)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument(
        "--vae-latent-noise",
        type=float,
        default=d.vae_latent_noise,
        help="half of each VAE batch is decoded from latents with noise up to this many stds",
    )
    p.add_argument(
        "--encode-images", type=int, default=d.encode_images, help="train images encoded"
    )
    p.add_argument("--text-steps", type=int, default=d.text_steps)
    p.add_argument("--unet-steps", type=int, default=d.unet_steps)
    p.add_argument("--unet-batch", type=int, default=d.unet_batch)
    p.add_argument("--unet-lr", type=float, default=d.unet_lr)
    p.add_argument("--ema", type=float, default=d.ema)
    p.add_argument("--unet-minutes", type=float, default=d.unet_minutes, help="wall-clock guard")
    p.add_argument(
        "--unet-stop",
        type=int,
        default=d.unet_stop,
        help="stop after this step, the schedule still planned for --unet-steps "
        "(replay a guard-stopped run: the shipped model is --unet-stop 1564)",
    )
    p.add_argument(
        "--unet-stop-file", default=d.unet_stop_file, help="stop the UNet once this file exists"
    )
    p.add_argument(
        "--decoder-steps",
        type=int,
        default=d.decoder_steps,
        help="last phase: fine-tune the VAE decoder on the UNet's own latents (0: skip)",
    )
    p.add_argument(
        "--decoder-seeds", type=int, default=d.decoder_seeds, help="its latents per class prompt"
    )
    p.add_argument(
        "--decoder-only",
        action="store_true",
        help="only the last phase, on the model already in --out (in place)",
    )
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--grid-seeds", type=int, default=8)
    p.add_argument("--sample-only", action="store_true", help="skip training: resample the grid")
    p.add_argument(
        "--from-model",
        default=None,
        help="retrofit: keep this trained model's latent space, classifier, text encoders and "
        "UNet (continued for --unet-steps); train only the new VAE (recipe.retrofit_and_save)",
    )
    p.add_argument("--smoke", action="store_true", help="a few steps of everything (~4 min)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if not (out / "tokenizer" / "vocab.json").is_file():
        raise FileNotFoundError(f"{out}/tokenizer missing: run scripts/make_clip_tokenizer.py")
    grid = Path(args.grid)
    in_repo = ROOT in grid.resolve().parents
    sampling = {
        "grid": grid,
        "grid_name": str(grid.resolve().relative_to(ROOT)) if in_repo else args.grid,
        "steps": args.sample_steps,
        "guidance": args.guidance,
        "grid_seeds": args.grid_seeds,
        "log": log,
    }
    if args.sample_only:
        sample_and_report(out, json.loads((out / "training.json").read_text()), **sampling)
        return
    t_start = time.time()
    opts = TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})
    if args.decoder_only:
        report = json.loads((out / "training.json").read_text())
        report["vae_decoder_tuned"] = clean_decoder(out, opts)
        report["trained"]["vae decoder (last)"] = TRAINED["vae decoder (last)"]
        report.pop("samples", None)
    elif args.from_model:
        report = retrofit_and_save(out, Path(args.from_model), opts)
    else:
        report = train_and_save(out, opts, smoke=args.smoke)
    report = sample_and_report(out, report, **sampling)
    wall = "decoder_wall_seconds" if args.decoder_only else "wall_seconds"
    report[wall] = round(time.time() - t_start, 1)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    mb = report["model_dir_bytes"] / 1e6
    log(f"done in {report[wall] / 60:.1f} min; {out}: {mb:.1f} MB")


if __name__ == "__main__":
    main()
