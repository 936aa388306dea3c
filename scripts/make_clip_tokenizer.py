"""Build SDXL's two CLIP tokenizers (HF format) from open_clip's BPE file, offline.

    python scripts/make_clip_tokenizer.py [--wheel open_clip_torch-3.3.0-py3-none-any.whl] \
        [--out distrifusion_jax/assets/tiny-sdxl]

Writes OUT/tokenizer/ (pads with <|endoftext|>, id 49407) and OUT/tokenizer_2/ (pad_token "!",
id 0), as in stabilityai/stable-diffusion-xl-base-1.0; both load with
`transformers.CLIPTokenizer.from_pretrained(dir)` and no network. The vocabulary is OpenAI
CLIP's (MIT), read from `open_clip/bpe_simple_vocab_16e6.txt.gz` inside the open_clip_torch
wheel (MIT) without importing open_clip (which needs torchvision). Without --wheel, an installed
open_clip is used if there is one, else the wheel is fetched with
`pip download --no-deps open_clip_torch==3.3.0`. Takes ~5 s; prints the ids of a test prompt.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

WHEEL = "open_clip_torch==3.3.0"
BPE_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # what OpenAI's SimpleTokenizer keeps: 48,894
CHECK_PROMPT = "a photo of a cat"
CHECK_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # OpenAI CLIP's ids
HARD_PROMPTS = ("An ANKLE-boot, don't   stop!", "Ünïcode café 🐱 x" * 3, "t-shirt" * 60, "")

NOTICE = """\
The vocabulary and merges in this folder (vocab.json, merges.txt, tokenizer.json) are OpenAI
CLIP's byte-level BPE (bpe_simple_vocab_16e6), converted to the Hugging Face format by
scripts/make_clip_tokenizer.py from the copy shipped in the open_clip_torch 3.3.0 wheel
(open_clip/bpe_simple_vocab_16e6.txt.gz). Both are under the MIT license:

CLIP: Copyright (c) 2021 OpenAI
open_clip: Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini,
Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh Hajishirzi,
Ali Farhadi, Ludwig Schmidt

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_bpe(wheel: str | None) -> bytes:
    """The gzipped BPE file's bytes, from `wheel`, an installed open_clip, or a fresh download."""
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            return z.read(BPE_IN_WHEEL)
    spec = importlib.util.find_spec("open_clip")  # does not run the package
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / Path(BPE_IN_WHEEL).name
        if path.is_file():
            return path.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp, "-q"]
        subprocess.run(cmd, check=True)
        (found,) = Path(tmp).glob("open_clip_torch-*.whl")
        return read_bpe(str(found))


def vocab_and_merges(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges) exactly as OpenAI's SimpleTokenizer builds them (49,408 tokens)."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is the "#version" header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"built {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizers(out: Path, bpe_gz: bytes) -> None:
    """OUT/tokenizer (pad <|endoftext|>) and OUT/tokenizer_2 (pad "!"), checked on a prompt."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges(bpe_gz)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
            # transformers 5: CLIPTokenizer is the fast one and silently ignores vocab_file=/
            # merges_file= keywords (environment.md §7), so pass the files positionally.
            files = (str(vocab_file), str(merges_file))
            tok = CLIPTokenizer(*files, model_max_length=77, pad_token=pad)
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(folder)
            # Ship vocab.json + merges.txt (1.5 MB, as diffusers' SDXL folders do) instead of the
            # 3.6 MB tokenizer.json; from_pretrained rebuilds the same tokenizer from them.
            (folder / "tokenizer.json").unlink()
            shutil.copy(vocab_file, folder / "vocab.json")
            shutil.copy(merges_file, folder / "merges.txt")
            (folder / "NOTICE").write_text(NOTICE)
            check(folder, pad, reference=tok)


def check(folder: Path, pad: str, reference=None) -> list[int]:
    """Reload `folder` offline; require CLIP's ids for CHECK_PROMPT, the right padding, and
    (given `reference`) the same ids as the tokenizer that was saved on a few hard prompts."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok(CHECK_PROMPT).input_ids
    if ids != CHECK_IDS:
        raise ValueError(f"{folder}: {CHECK_PROMPT!r} -> {ids}, expected {CHECK_IDS}")
    for prompt in HARD_PROMPTS if reference is not None else ():
        ours, want = (t(prompt, truncation=True).input_ids for t in (tok, reference))
        if ours != want:
            raise ValueError(f"{folder}: reloaded tokenizer differs on {prompt!r}")
    padded = tok(CHECK_PROMPT, padding="max_length", truncation=True).input_ids
    want_pad = 49407 if pad == "<|endoftext|>" else 0
    if len(padded) != 77 or padded[-1] != want_pad:
        raise ValueError(f"{folder}: padding gives {len(padded)} ids ending {padded[-1]}")
    print(f"{folder}: {CHECK_PROMPT!r} -> {ids}, pads with {want_pad}")
    return ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", help="path to an open_clip_torch wheel (default: installed/download)")
    p.add_argument("--out", default="distrifusion_jax/assets/tiny-sdxl", help="model folder")
    args = p.parse_args()
    write_tokenizers(Path(args.out), read_bpe(args.wheel))


if __name__ == "__main__":
    main()
