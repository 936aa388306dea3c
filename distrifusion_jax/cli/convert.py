"""distrifusion-convert SRC DST [--dtype float32|bfloat16|float16] [--force] [--allow-pickle]

Converts a diffusers SDXL folder (or one component folder such as unet/, or a single-file
original-layout .safetensors) into Flax params saved with orbax, plus configs, tokenizers and
the scheduler config. Prints one line per component. Errors are one line on stderr: exit 2 for
usage errors (flags, a path that is missing or not a model, DST exists, a pickle without
--allow-pickle), 1 for bad inputs (corrupt file, keys or shapes that do not fit the config).
Peak memory and time for the full SDXL UNet: scripts/measure_convert.py.

Also run as `python -m convert` from a checkout (convert/__main__.py calls `main`).
"""

from __future__ import annotations

import argparse
import os
import sys

# Conversion needs no accelerator (numpy + jax.eval_shape); don't let JAX grab one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from distrifusion_jax.io.convert import DTYPES, UsageError, convert
from distrifusion_jax.io.weights import PickleRefused


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Usage lines name the command as it was typed: the console script or `python -m convert`.
    script = os.path.basename(sys.argv[0]) == "distrifusion-convert"
    prog = "distrifusion-convert" if script else "python -m convert"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    p.add_argument("src", metavar="SRC", help="diffusers root, component folder, or .safetensors")
    p.add_argument("dst", metavar="DST", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="params dtype")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--variant", help="weights variant, e.g. fp16 for *.fp16.safetensors")
    p.add_argument(
        "--allow-pickle", action="store_true", help="read .bin/.ckpt pickles (can run code)"
    )
    p.add_argument(
        "--config", help="single files: a diffusers folder with the model's config.json files"
    )
    p.add_argument("--original-config", help="single files: the model's original YAML")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # exits 2 with argparse's usage line on bad flags
    try:
        report = convert(
            args.src,
            args.dst,
            args.dtype,
            force=args.force,
            variant=args.variant,
            allow_pickle=args.allow_pickle,
            config=args.config,
            original_config=args.original_config,
            log=print,
        )
    except KeyboardInterrupt:
        print("convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"convert: error: {_one_line(e)}", file=sys.stderr)
        usage = (UsageError, PickleRefused, FileNotFoundError)  # fixed by other arguments
        return 2 if isinstance(e, usage) else 1
    print(report.lines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
