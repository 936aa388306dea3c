"""What one `distrifusion-generate` command draws: a prompt, or every line of a prompts file, each
with its seed and output paths.

A prompts file has one prompt per line; a line may end with a tab and a seed (`a red dress<TAB>7`);
without one, line i (counting from 0, over prompt lines) uses `--seed + i`. Blank lines and lines
starting with `#` are skipped. Line i writes `OUTPUT-iii.png` (`OUTPUT-iii-j.png` with several
images per prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    """One prompt: its seed and the PNG path of each of its images."""

    prompt: str
    seed: int
    paths: tuple[Path, ...]


def read_prompts_file(path: Path, first_seed: int) -> list[tuple[str, int]]:
    """(prompt, seed) per prompt line of `path` (format in the module docstring)."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist; pass --prompts-file FILE")
    out: list[tuple[str, int]] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        prompt, _, seed = raw.rstrip().rpartition("\t") if "\t" in raw else (raw, "", "")
        prompt = prompt.strip()
        if not prompt:
            raise ValueError(f"{path}:{number}: no prompt before the tab; write PROMPT<TAB>SEED")
        try:
            out.append((prompt, int(seed) if seed.strip() else first_seed + len(out)))
        except ValueError:
            raise ValueError(
                f"{path}:{number}: seed {seed.strip()!r} is not an integer; write PROMPT<TAB>SEED"
            ) from None
    if not out:
        raise ValueError(f"prompts file {path} has no prompts; write one prompt per line")
    return out


def image_paths(output: Path, num_images: int, index: int | None) -> tuple[Path, ...]:
    """PNG paths of one prompt: `output` itself, or with `-index` and/or `-j` added."""
    if output.suffix.lower() != ".png":
        raise ValueError(f"--output {output} must end in .png")
    stem = output.stem if index is None else f"{output.stem}-{index:03d}"
    if num_images == 1:
        return (output.with_name(stem + output.suffix),)
    return tuple(output.with_name(f"{stem}-{j}{output.suffix}") for j in range(num_images))


def make_jobs(
    prompt: str, seed: int, output: Path, num_images: int, prompts_file: Path | None
) -> list[Job]:
    """The command's jobs: `prompt` alone, or every prompt of `prompts_file`."""
    if prompts_file is None:
        return [Job(prompt, seed, image_paths(output, num_images, None))]
    lines = read_prompts_file(prompts_file, seed)
    return [Job(p, s, image_paths(output, num_images, i)) for i, (p, s) in enumerate(lines)]
