"""Prompts -> UNet conditioning, as diffusers' SDXL and SD pipelines compute it.

SDXL: `encoder_hidden_states` = concat of both encoders' penultimate hidden states
`[B, 77, D1 + D2]`, `text_embeds` = text_encoder_2's pooled projection `[B, P]`,
`time_ids` = original size + crop top-left + target size `[B, 6]` (micro-conditioning).
SD 1.x/2.x: the single encoder's last hidden state, no added conditioning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


def load_clip_tokenizer(folder: str | os.PathLike) -> Any:
    """`transformers.CLIPTokenizer` from a local folder (no network).

    transformers is imported with its advisory warnings off: without PyTorch it would print
    "PyTorch was not found. Models won't be available..." on import, and we only use its
    tokenizer.
    """
    if "transformers" not in sys.modules:
        previous = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if previous is None:
                del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
            else:
                os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = previous
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(Path(folder)), local_files_only=True)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """One tokenizer + Flax CLIP encoder pair."""

    tokenizer: Any  # transformers.CLIPTokenizer
    module: Any
    params: Any

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """`[B, 77]` int32 ids, truncated (with a warning, as diffusers) and padded."""
        tok = self.tokenizer
        max_len = tok.model_max_length
        ids = tok(list(prompts), padding="max_length", max_length=max_len, truncation=True)
        full = tok(list(prompts), padding="longest").input_ids
        for p, f in zip(prompts, full):
            if len(f) > max_len:
                removed = tok.batch_decode([f[max_len - 1 : -1]])[0]
                log.warning(
                    "The prompt %r was truncated to %d CLIP tokens; this part was dropped: %r",
                    p[:40] + ("..." if len(p) > 40 else ""),
                    max_len,
                    removed,
                )
        return np.asarray(ids.input_ids, np.int32)

    @functools.cached_property
    def features(self):
        """Jitted `(params, ids [B, 77], penultimate) -> (hidden [B, 77, D], pooled [B, P] or
        None)`: the penultimate (SDXL) or last hidden state and the pooled projection. One
        compile per batch size, reused across calls (and across runs by the compile cache)."""

        def run(params, ids, penultimate):
            out = self.module.apply({"params": params}, ids)
            hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
            return hidden, out.text_embeds

        return jax.jit(run, static_argnums=2)


def _encode(encoders: Sequence[TextEncoder], prompts: Sequence[str], sdxl: bool):
    """(hidden `[B, 77, D]`, pooled `[B, P]` or None) of the prompts, every encoder."""
    hidden, pooled = [], None
    for enc in encoders:
        h, p = enc.features(enc.params, jnp.asarray(enc.tokenize(prompts)), sdxl)
        hidden.append(h)
        if p is not None:
            pooled = p
    return jnp.concatenate(hidden, axis=-1), pooled


def encode_prompts(
    encoders: Sequence[TextEncoder],
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None,
    guided: bool,
    sdxl: bool,
    time_ids: Sequence[float] | None = None,
    force_zeros_for_empty_prompt: bool = True,
    negative_time_ids: Sequence[float] | None = None,
) -> dict[str, jax.Array]:
    """Conditioning with a leading CFG axis: `[G, B, ...]`, G = 2 (uncond, cond) when guided.

    Args:
      encoders: one (SD) or two (SDXL) text encoders, in order.
      prompts: B prompts.
      negative_prompts: B negative prompts, or None (SDXL with `force_zeros_for_empty_prompt`:
        zero embeddings; otherwise the empty prompt).
      guided: classifier-free guidance (guidance scale > 1).
      sdxl: penultimate hidden states and pooled/time-id conditioning.
      time_ids: 6 numbers (original H, W, crop top, left, target H, W); SDXL only. An SDXL
        refiner takes 5: original H, W, crop top, left, aesthetic score.
      negative_time_ids: the unconditional half's time ids when guided (default `time_ids`;
        the refiner's differ in the aesthetic score).
    """
    b = len(prompts)
    cond_h, cond_p = _encode(encoders, prompts, sdxl)
    hs, pools = [cond_h], [cond_p]
    if guided:
        if negative_prompts is None and sdxl and force_zeros_for_empty_prompt:
            neg_h, neg_p = jnp.zeros_like(cond_h), jnp.zeros_like(cond_p)
        else:
            negs = list(negative_prompts) if negative_prompts is not None else [""] * b
            neg_h, neg_p = _encode(encoders, negs, sdxl)
        hs, pools = [neg_h, cond_h], [neg_p, cond_p]
    out = {"encoder_hidden_states": jnp.stack(hs).astype(jnp.float32)}
    if sdxl:
        out["text_embeds"] = jnp.stack(pools).astype(jnp.float32)
        ids = [time_ids] if not guided else [negative_time_ids or time_ids, time_ids]
        ids = jnp.asarray(ids, jnp.float32)  # [G, K]
        out["time_ids"] = jnp.broadcast_to(ids[:, None], (len(hs), b, ids.shape[1]))
    return out
