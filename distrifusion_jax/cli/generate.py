"""distrifusion-generate: images with DistriFusion patch parallelism.

    distrifusion-generate                                  # shipped tiny model, 1 device
    distrifusion-generate --cpu-devices 8 --patches 8      # 8 row bands on fake CPU devices
    distrifusion-generate --model ~/sdxl --prompt "..." --patches 8 --cfg-split  # 16 GPUs
    distrifusion-generate --image in.png --strength 0.5              # image-to-image
    distrifusion-generate --image in.png --mask mask.png             # inpainting (white: repaint)
    distrifusion-generate --model ~/sdxl --refiner ~/sdxl-refiner    # base -> refiner (0.8)
    distrifusion-generate --model ~/sdxl --controlnet ~/cn-canny:0.5 --control-image edges.png

(`python scripts/generate.py` in a checkout is the same command.)

Compiled programs are cached in ~/.cache/distrifusion-jax/xla (`--compile-cache DIR`,
`--no-compile-cache`), so a repeated command compiles nothing; `--prompts-file FILE` draws every
line of FILE (optionally `PROMPT<TAB>SEED`) with one set of compiled programs, one PNG per line.

Multi-node: run the same command on every host with
`--coordinator HOST:PORT --num-processes N --process-id I`; process 0 writes the image. Each
process then supervises a worker (`cli/supervise.py`): a process that never joins, an unreachable
coordinator, or a peer that dies mid-run ends every survivor within about `--init-timeout` or
`--heartbeat-timeout` seconds with one line on stderr naming the missing process, exit 1, and
JAX's logs in `--log-file`.
Prints compile time and steady per-step time; writes PNGs with the settings in text chunks.
Bad inputs are one line on stderr and exit 2, and no file is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# JAX-free imports only: `--cpu-devices` sets XLA_FLAGS before JAX is first imported (in run).
from distrifusion_jax.cli import control_args, supervise
from distrifusion_jax.cli.jobs import Job, make_jobs
from distrifusion_jax.io.refiner_folder import HIGH_NOISE_FRAC, check_fraction, is_refiner_folder
from distrifusion_jax.parallel.config import DEFAULT_MODE, MODES, NAIVE_SPLITS
from distrifusion_jax.tiny import MODEL_DIR as DEFAULT_MODEL  # the shipped model

DEFAULT_PROMPT = "a photo of a sneaker"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusers or converted folder")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help="one prompt per line (optionally PROMPT<TAB>SEED); compiles once, one PNG each",
    )
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scheduler", default=None, help="ddim|euler|euler_a|dpmpp_2m (default: model's)"
    )
    p.add_argument("--patches", type=int, default=1, help="row bands n (devices on 'patch')")
    p.add_argument("--data", type=int, default=1, help="devices on 'data' (images split over it)")
    p.add_argument("--cfg-split", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--mode", default=DEFAULT_MODE, choices=MODES)
    p.add_argument("--naive-split", default="alternate", choices=NAIVE_SPLITS)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument(
        "--pcpp",
        type=float,
        nargs="?",
        const=0.3,
        default=None,
        metavar="P",
        help="PCPP: displaced self-attention sees only the nearest P (default 0.3) of "
        "each neighbour band's tokens; less traffic and memory, lower quality",
    )
    p.add_argument(
        "--compress",
        default=None,
        metavar="CODEC",
        help="code the displaced exchange's halo rows and K,V: bf16, fp8, int8, int4, int2, "
        "or residual+ one of them (error feedback; more state); GroupNorm and warm-up exact",
    )
    p.add_argument(
        "--fused-exchange",
        action="store_true",
        help="exchange a displaced step's activations in a few collectives at its "
        "end (faster where collectives block, e.g. CPU processes; same image)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA .safetensors (diffusers or kohya keys) merged at SCALE (default 1.0); repeatable",
    )
    p.add_argument("--image", type=Path, default=None, help="init image: img2img (or inpainting)")
    p.add_argument("--mask", type=Path, default=None, help="inpainting mask (white = repaint)")
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --image: share of the steps run, in (0, 1] (default diffusers': SDXL "
        "img2img 0.3, inpainting 0.9999; SD 0.8 and 1.0)",
    )
    p.add_argument(
        "--refiner",
        type=Path,
        default=None,
        help="SDXL refiner folder: the base denoises the high-noise steps, the refiner the rest",
    )
    p.add_argument(
        "--high-noise-frac",
        type=float,
        default=None,
        help=f"with --refiner: share of the noise levels the base denoises, in (0, 1) "
        f"(diffusers' denoising_end/denoising_start; default {HIGH_NOISE_FRAC})",
    )
    control_args.add_arguments(p)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--output", default="out.png", help="PNG path; with several images -N is added")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices (testing)")
    p.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="folder of compiled programs reused across runs (default: "
        "~/.cache/distrifusion-jax/xla)",
    )
    p.add_argument(
        "--no-compile-cache", action="store_true", help="compile everything anew each run"
    )
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument(
        "--init-timeout",
        type=int,
        default=supervise.DEFAULT_INIT_TIMEOUT_S,
        help="seconds every process has to join the coordinator (multi-host)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=supervise.DEFAULT_HEARTBEAT_TIMEOUT_S,
        help="seconds of silence after which a process counts as dead (multi-host)",
    )
    p.add_argument(
        "--log-file",
        default=None,
        help="multi-host: the worker's JAX/XLA log (default: a temporary file, kept on failure)",
    )
    return p.parse_args(argv)


def peer_of(args: argparse.Namespace) -> supervise.Peer:
    """This process's place in a multi-host run (`--coordinator` given)."""
    if not 0 <= args.process_id < args.num_processes:
        raise ValueError(
            f"--process-id {args.process_id} is outside 0..{args.num_processes - 1}; give each "
            f"process a distinct --process-id below --num-processes"
        )
    if args.init_timeout < 1 or args.heartbeat_timeout < 1:
        raise ValueError("--init-timeout and --heartbeat-timeout must be at least 1 second")
    return supervise.Peer(
        args.coordinator,
        args.num_processes,
        args.process_id,
        args.init_timeout,
        args.heartbeat_timeout,
    )


def jobs_of(args: argparse.Namespace) -> list[Job]:
    """The prompts to draw, each with its seed and PNG paths (see `cli/jobs.py`)."""
    if args.num_images < 1:
        raise ValueError("--num-images must be at least 1")
    return make_jobs(args.prompt, args.seed, Path(args.output), args.num_images, args.prompts_file)


def loras_of(args: argparse.Namespace) -> list[tuple[str, float]]:
    """`--lora PATH[:SCALE]` values as (path, scale)."""
    return control_args.path_and_scale(args.lora)


def check_inputs(args: argparse.Namespace, jobs: list[Job]) -> None:
    """Fail before any heavy work: bad paths, overwrites, impossible numbers."""
    paths = [p for job in jobs for p in job.paths]
    if not Path(args.model).is_dir():
        raise FileNotFoundError(
            f"model folder {args.model} does not exist; pass --model with a diffusers or "
            f"converted model folder"
        )
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(existing)} already exists; pass --force to overwrite")
    for p in paths:
        if not p.parent.is_dir():
            raise FileNotFoundError(f"output folder {p.parent} does not exist; create it first")
    for path, _ in loras_of(args):
        if not Path(path).is_file():
            raise FileNotFoundError(f"LoRA file {path} does not exist; pass --lora PATH[:SCALE]")
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    check_image_inputs(args)
    check_refiner_inputs(args)
    control_args.check_control_inputs(args)


def check_refiner_inputs(args: argparse.Namespace) -> None:
    """--model is a base, --refiner a refiner folder, --high-noise-frac in (0, 1)."""
    if is_refiner_folder(args.model):
        raise ValueError(
            f"--model {args.model} is an SDXL refiner, not a base model; pass the base as "
            f"--model and this folder as --refiner"
        )
    if args.refiner is None:
        if args.high_noise_frac is not None:
            raise ValueError("--high-noise-frac needs --refiner (the SDXL refiner folder)")
        return
    if not args.refiner.is_dir():
        raise FileNotFoundError(
            f"--refiner folder {args.refiner} does not exist; pass an SDXL refiner folder"
        )
    if args.high_noise_frac is not None:
        check_fraction("--high-noise-frac", args.high_noise_frac)
    if args.mask is not None:
        raise ValueError("--refiner with --mask (inpainting) is not supported; drop one of them")


def check_image_inputs(args: argparse.Namespace) -> None:
    """--image/--mask/--strength: files exist, sizes match, strength in (0, 1]."""
    if args.mask is not None and args.image is None:
        raise ValueError("--mask needs --image (the image to inpaint)")
    if args.strength is not None:
        if args.image is None:
            raise ValueError("--strength needs --image (img2img or inpainting)")
        if not 0 < args.strength <= 1:
            raise ValueError(f"--strength must be in (0, 1]; got {args.strength}")
    sizes = {}
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if path is None:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"{flag} file {path} does not exist")
        from PIL import Image

        with Image.open(path) as im:  # reads the header only
            sizes[flag] = im.size
    if len(sizes) == 2 and sizes["--image"] != sizes["--mask"]:
        (iw, ih), (mw, mh) = sizes["--image"], sizes["--mask"]
        raise ValueError(f"--mask is {mw}x{mh} but --image is {iw}x{ih}; give masks of equal size")


def save_png(image, path: Path, meta: dict) -> None:
    """Write atomically (temporary file beside it, then rename) with metadata text chunks."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    """Check inputs, set up devices, generate, and (process 0) write the PNGs; returns 0."""
    jobs = jobs_of(args)
    check_inputs(args, jobs)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        )
    import jax

    if not args.no_compile_cache:
        from distrifusion_jax.compile_cache import enable_compile_cache

        enable_compile_cache(args.compile_cache)
    if args.coordinator:
        from distrifusion_jax.parallel.mesh import initialize_distributed

        peer = peer_of(args)
        initialize_distributed(
            peer.coordinator,
            peer.num_processes,
            peer.process_id,
            init_timeout=peer.init_timeout,
            heartbeat_timeout=peer.heartbeat_timeout,
        )
        supervise.report("joined")
    import jax.numpy as jnp
    from tqdm import tqdm

    from distrifusion_jax.parallel.config import ParallelConfig
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    parallel = ParallelConfig(
        patches=args.patches,
        cfg_split=args.cfg_split,
        data=args.data,
        mode=args.mode,
        naive_split=args.naive_split,
        warmup_steps=args.warmup_steps,
        fused_exchange=args.fused_exchange,
        pcpp=args.pcpp,
        compress=args.compress,
    )
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    pipe = DistriSDXLPipeline.from_pretrained(
        args.model, parallel=parallel, dtype=dtype, refiner=args.refiner
    )
    loras = loras_of(args)
    if loras:
        pipe.set_loras(loras)  # every file checked before any weight changes
    controlnets = control_args.controlnets_of(args)
    if controlnets:
        pipe.load_controlnets([path for path, _ in controlnets])
    lead = jax.process_index() == 0
    meta = {
        "negative_prompt": args.negative_prompt or "",
        "model": str(args.model),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler or pipe.scheduler_config.get("_class_name", ""),
        "parallel": {**vars(parallel), "devices": jax.device_count()},
        "dtype": args.dtype,
    }
    if loras:
        meta["loras"] = [{"path": path, "scale": scale} for path, scale in loras]
    meta.update(control_args.control_meta(args))
    high_noise_frac = None
    if args.refiner is not None:
        high_noise_frac = args.high_noise_frac or HIGH_NOISE_FRAC
        meta.update(refiner=str(args.refiner), high_noise_frac=high_noise_frac)
    strength = None
    if args.image is not None:
        from distrifusion_jax.pipeline import default_strength

        strength = args.strength
        if strength is None:
            strength = default_strength(pipe.is_sdxl, args.mask is not None)
        meta.update(image=str(args.image), strength=strength)
        if args.mask is not None:
            meta["mask"] = str(args.mask)
    for job in jobs:
        images = pipe(
            job.prompt,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=job.seed,
            scheduler=args.scheduler,
            num_images=args.num_images,
            image=args.image,
            mask_image=args.mask,
            strength=strength,
            denoising_end=high_noise_frac,
            **control_args.control_kwargs(args),
            # a supervised worker's stderr is its log file: progress goes to stdout
            progress=(
                lambda it: tqdm(
                    it,
                    desc="denoise",
                    disable=not lead,
                    file=sys.stdout if supervise.is_worker() else None,
                )
            ),
        )
        if not lead:
            continue
        for i, (image, path) in enumerate(zip(images, job.paths)):
            save_png(
                image, path, {"prompt": job.prompt, "seed": job.seed, **meta, "image_index": i}
            )
            print(f"wrote {path} ({image.width}x{image.height})")
        t = pipe.timings  # per-step times: the tqdm driver records them
        print(
            f"devices {jax.device_count()} ({parallel.data} data x {parallel.cfg} cfg x "
            f"{parallel.patches} patch), mode {parallel.mode}: compile "
            f"~{t.compile_seconds():.2f} s, steady {t.steady_step() * 1e3:.1f} ms/step, "
            f"denoise {t.denoise:.2f} s, encode {t.encode:.2f} s, decode {t.decode:.2f} s"
        )
    supervise.report("done")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `distrifusion-generate` command; returns the exit code (2: bad input, 1: a multi-host
    run failed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if supervise.is_worker():
        return _worker(args)
    try:
        if args.coordinator:
            peer = peer_of(args)
            check_inputs(args, jobs_of(args))
            log = Path(args.log_file) if args.log_file else supervise.default_log_path(peer)
            return supervise.supervise(argv, peer, log, keep_log=args.log_file is not None)
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _worker(args: argparse.Namespace) -> int:
    """A supervised multi-host worker: any failure is reported to the supervisor (traceback to
    the log) and ends the process at once (see `supervise.exit_worker`)."""
    supervise.die_with_supervisor()
    try:
        return run(args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        peer_failure = supervise.looks_like_peer_failure(e)
        bad_input = isinstance(e, (ValueError, FileNotFoundError, FileExistsError))
        code = 2 if bad_input and not peer_failure else 1
        supervise.exit_worker(code, _first_line(e), peer_failure=peer_failure, peer=peer_of(args))
        raise  # not reached: exit_worker ends the process


if __name__ == "__main__":
    sys.exit(main())
