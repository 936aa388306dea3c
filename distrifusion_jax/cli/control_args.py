"""generate.py's ControlNet flags: parsing, early checks, pipeline kwargs and PNG metadata.

    --controlnet PATH[:SCALE] --control-image IMG [--control-start S] [--control-end E]
    (each repeatable: the k-th image goes with the k-th ControlNet; one start/end applies to
    all ControlNets, or give one per ControlNet), --guess-mode.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ControlNet flags to generate.py's parser."""
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="ControlNet folder (diffusers or converted) at conditioning scale SCALE (default "
        "1.0); repeatable, one --control-image each",
    )
    p.add_argument(
        "--control-image",
        action="append",
        default=[],
        type=Path,
        metavar="IMG",
        help="conditioning image of the matching --controlnet (resized to the output size)",
    )
    p.add_argument(
        "--control-start",
        action="append",
        default=[],
        type=float,
        metavar="S",
        help="share of the steps before a ControlNet starts acting (default 0); one for all "
        "ControlNets or one per ControlNet",
    )
    p.add_argument(
        "--control-end",
        action="append",
        default=[],
        type=float,
        metavar="E",
        help="share of the steps after which a ControlNet stops (default 1); one or one each",
    )
    p.add_argument(
        "--guess-mode",
        action="store_true",
        help="ControlNet guess mode (residuals only on the conditional half, weighted 0.1..1)",
    )


def path_and_scale(values: list[str]) -> list[tuple[str, float]]:
    """`PATH[:SCALE]` flag values (`--controlnet`, `--lora`) as (path, scale), scale default 1.0;
    a suffix that is no number stays in PATH (a Windows drive, a colon in a name)."""
    out = []
    for value in values:
        path, _, scale = value.rpartition(":")
        try:
            out.append((path, float(scale)) if path else (value, 1.0))
        except ValueError:
            out.append((value, 1.0))
    return out


def controlnets_of(args: argparse.Namespace) -> list[tuple[str, float]]:
    """`--controlnet PATH[:SCALE]` values as (path, scale)."""
    return path_and_scale(args.controlnet)


def _per_net(values: list[float], k: int, flag: str, default: float) -> list[float]:
    if not values:
        return [default] * k
    if len(values) == 1:
        return values * k
    if len(values) != k:
        raise ValueError(f"{flag} given {len(values)} times for {k} --controlnet; give 1 or {k}")
    return list(values)


def check_control_inputs(args: argparse.Namespace) -> None:
    """Before any heavy work: folders and images exist, counts match, windows are valid."""
    nets = controlnets_of(args)
    k = len(nets)
    if not nets:
        extra = [f for f, v in (("--control-image", args.control_image),
                                ("--control-start", args.control_start),
                                ("--control-end", args.control_end),
                                ("--guess-mode", args.guess_mode)) if v]  # fmt: skip
        if extra:
            raise ValueError(f"{', '.join(extra)} need(s) --controlnet PATH[:SCALE]")
        return
    for path, _ in nets:
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"--controlnet folder {path} does not exist; pass a ControlNet folder"
            )
    if len(args.control_image) != k:
        raise ValueError(
            f"{len(args.control_image)} --control-image for {k} --controlnet; give one each"
        )
    for image in args.control_image:
        if not image.is_file():
            raise FileNotFoundError(f"--control-image file {image} does not exist")
    starts = _per_net(args.control_start, k, "--control-start", 0.0)
    ends = _per_net(args.control_end, k, "--control-end", 1.0)
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"--control-start {s} and --control-end {e}: need 0 <= S < E <= 1")


def control_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of the pipeline call ({} without --controlnet)."""
    nets = controlnets_of(args)
    if not nets:
        return {}
    k = len(nets)
    return dict(
        control_image=list(args.control_image),
        controlnet_conditioning_scale=[scale for _, scale in nets],
        control_guidance_start=_per_net(args.control_start, k, "--control-start", 0.0),
        control_guidance_end=_per_net(args.control_end, k, "--control-end", 1.0),
        guess_mode=args.guess_mode,
    )


def control_meta(args: argparse.Namespace) -> dict[str, Any]:
    """PNG metadata: every ControlNet with its image, scale and guidance window."""
    kw = control_kwargs(args)
    if not kw:
        return {}
    nets = [
        {"path": path, "image": str(image), "scale": scale, "start": start, "end": end}
        for (path, scale), image, start, end in zip(
            controlnets_of(args),
            kw["control_image"],
            kw["control_guidance_start"],
            kw["control_guidance_end"],
        )
    ]
    return {"controlnets": nets, "guess_mode": kw["guess_mode"]}
