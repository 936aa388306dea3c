"""Check that the shipped tiny model draws clean images of the prompted class (issue 19).

    python scripts/check_tiny.py            # ~1 min on one CPU core; writes results/tiny_check.json
    python scripts/check_tiny.py --examples results/generate_examples.png   # and the README strip

Draws the 10 class prompts x 8 seeds with the sampler settings of the model's training.json
("samples": Euler, 25 steps, CFG 5, seeds 1000-1007) and measures, per image, the colour
(mean |RGB - gray|, largest channel spread of a pixel), the padding border's mean, the corner
pixels against their neighbours, and the real-image classifier's prompted-class accuracy
(`distrifusion_jax/tiny/check.py`). Prints one line per metric; exit status 1 if any image
is over a limit or the accuracy is under 85%.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from distrifusion_jax.tiny import MODEL_DIR
    from distrifusion_jax.tiny.check import check_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--steps", type=int, default=None, help="default: training.json's")
    p.add_argument("--guidance", type=float, default=None, help="default: training.json's")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: training.json's")
    p.add_argument("--json", default=str(ROOT / "results/tiny_check.json"))
    p.add_argument(
        "--examples",
        default=None,
        help="also write the README's strip (generate.py's defaults, six classes) to this PNG",
    )
    args = p.parse_args(argv)
    if args.examples:
        from distrifusion_jax.tiny.samples import save_examples

        save_examples(args.model, Path(args.examples))
    report, _ = check_model(args.model, args.steps, args.guidance, args.seeds)
    for name in ("gray_dev", "spread", "border", "corner_excess"):
        m = report[name]
        print(
            f"{name:14s} mean {m['mean']:7.3f}  worst {m['max']:7.3f}  limit {m['limit']:5.1f}"
            f"  images over: {m['images_over']}"
        )
    acc = report["accuracy"]
    print(
        f"{'accuracy':14s} mean {acc['mean']:7.3f}  (min {acc['min']}) per class {acc['per_class']}"
    )
    print("PASS" if report["pass"] else "FAIL", f"({report['images']} images)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
