"""Generate images with DistriFusion patch parallelism (`distrifusion-generate` from a checkout).

    python scripts/generate.py                                  # shipped tiny model, 1 device
    python scripts/generate.py --cpu-devices 8 --patches 8      # 8 row bands on fake CPU devices
    python scripts/generate.py --model ~/sdxl --prompt "..." --patches 8 --cfg-split  # 16 GPUs

Flags, output and multi-host use: `distrifusion_jax/cli/generate.py` (or `--help`).
"""

import sys

from distrifusion_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
