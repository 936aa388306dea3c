"""README picture for image inputs: the shipped model doing img2img and inpainting (issue 15).

    python scripts/image_examples.py        # ~2 min on 2 CPU cores; writes results/image_examples.png

Writes two Fashion-MNIST test images and a mask to a temporary folder, runs
`scripts/generate.py` there with the commands it prints (4 row bands on 4 CPU devices,
displaced `corrected_async_gn`), and lays inputs and outputs side by side
(`distrifusion_jax/tiny/image_examples.py`).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from distrifusion_jax.tiny.image_examples import COMMANDS, compose, write_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "results/image_examples.png"))
    p.add_argument("--scale", type=int, default=2, help="nearest upscaling of each tile")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_inputs(folder)
        for label, cmd in COMMANDS:
            print(f"{label}: python scripts/generate.py {cmd}", flush=True)
            generate = [sys.executable, str(ROOT / "scripts/generate.py"), *shlex.split(cmd)]
            subprocess.run(generate, cwd=folder, check=True)
        compose(folder, Path(args.out), args.scale)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
