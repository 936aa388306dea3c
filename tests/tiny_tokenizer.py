"""A tiny byte-level CLIP tokenizer (514 tokens, no merges) for tiny text encoders.

Same BPE machinery and special tokens as CLIP's, so truncation, padding and EOS pooling work
as with the real vocabulary; every character is its own token.
"""

from __future__ import annotations

import json
from pathlib import Path


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_tokenizer(folder: Path, pad_token: str | None = None) -> Path:
    """Write a CLIPTokenizer to `folder` (pads with EOS, or `pad_token`, e.g. '!' as SDXL's 2nd)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    kw = {"pad_token": pad_token} if pad_token else {}
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, **kw)
    tok.save_pretrained(str(folder))
    return folder
