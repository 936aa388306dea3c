"""CLIP text encoders (transformers `CLIPTextModel`, `CLIPTextModelWithProjection`) in Flax.

SDXL uses both: `text_encoder` (ViT-L/14, quick_gelu) and `text_encoder_2` (bigG, gelu, with a
bias-free `text_projection`). SDXL conditions on `hidden_states[-2]` (penultimate layer, before
`final_layer_norm`) of both and on the projected pooled `text_embeds` of the second; SD 1.x uses
`last_hidden_state` (after `final_layer_norm`).

Parameter paths mirror the transformers 5 `CLIPTextModel` state dict, whose keys have no
`text_model.` prefix (`embeddings/token_embedding/embedding`, `encoder/layers_0/self_attn/q_proj/
kernel`, `final_layer_norm/scale`); `CLIPTextModelWithProjection` adds `text_projection/kernel`
at the same root. Checkpoints on disk (and `CLIPTextModelWithProjection`'s state dict) prefix the
text model with `text_model.`: convert both encoders with `strip_prefix=STRIP_PREFIX`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Dtype = Any

# Pass to `distrifusion_jax.io.keys.convert_tensors(..., strip_prefix=STRIP_PREFIX)` for either
# encoder.
STRIP_PREFIX = "text_model."

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers "gelu" is exact (erf)
}

# transformers' legacy `eos_token_id` (before PR #24773): pool at argmax(input_ids) instead.
LEGACY_EOS_TOKEN_ID = 2

_MODEL_TYPES = ("clip_text_model",)
# Generic PretrainedConfig keys (transformers 4 and 5) that do not change the text encoder.
_IGNORED_HF_KEYS = frozenset(
    ["transformers_version", "architectures", "output_hidden_states", "output_attentions", "return_dict", "dtype", "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "initializer_range", "initializer_factor", "attention_dropout", "dropout", "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "is_decoder", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_scores", "prefix", "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p", "torchscript", "typical_p", "use_bfloat16", "gradient_checkpointing"]
)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text encoder (the fields of transformers' `CLIPTextConfig` we use)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig hidden_act={self.hidden_act!r} is not supported; "
                f"supported: {sorted(ACTIVATIONS)}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(  # noqa: TRY004 - every config check raises ValueError
                f"CLIPTextConfig eos_token_id={self.eos_token_id!r} is not supported; "
                "supported: one int (the pooled output is taken at that token)."
            )

    @classmethod
    def from_hf(cls, d: dict) -> CLIPTextConfig:
        """From a transformers `CLIPTextConfig` config.json dict (text_encoder/, text_encoder_2/).

        Generic PretrainedConfig keys and `_`-prefixed metadata are ignored; any other unknown
        key, or an unsupported value, raises ValueError.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in d.items():
            if key in fields:
                kw[key] = value
            elif key == "model_type":
                if value not in _MODEL_TYPES:
                    raise ValueError(
                        f"CLIP text config model_type={value!r} is not supported; supported: "
                        f"{list(_MODEL_TYPES)} (pass the text_config of a full CLIP config)."
                    )
            elif key.startswith("_") or key in _IGNORED_HF_KEYS:
                continue
            else:
                raise ValueError(
                    f"CLIP text config key {key!r} (value {value!r}) is not supported; "
                    f"supported keys: {sorted(fields)} and generic PretrainedConfig keys."
                )
        if kw.get("projection_dim") is None:
            kw.pop("projection_dim", None)
        if kw.get("layer_norm_eps") is None:
            kw.pop("layer_norm_eps", None)
        return cls(**kw)

    def to_dict(self) -> dict:
        """A transformers-style config dict; `from_hf(to_dict())` round-trips."""
        return {"model_type": "clip_text_model", **dataclasses.asdict(self)}


def sdxl_text_encoder_config() -> CLIPTextConfig:
    """SDXL `text_encoder` (OpenAI ViT-L/14 text tower), as its shipped config.json."""
    return CLIPTextConfig(bos_token_id=0, eos_token_id=LEGACY_EOS_TOKEN_ID, pad_token_id=1)


def sdxl_text_encoder_2_config() -> CLIPTextConfig:
    """SDXL `text_encoder_2` (OpenCLIP bigG text tower), as its shipped config.json."""
    return CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
        bos_token_id=0,
        eos_token_id=LEGACY_EOS_TOKEN_ID,
        pad_token_id=1,
    )


def tiny_config(**kw) -> CLIPTextConfig:
    """For tests only: hidden 32, 2 layers, 4 heads."""
    base = dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    return CLIPTextConfig(**{**base, **kw})


@flax.struct.dataclass
class CLIPTextOutput:
    """Encoder outputs, as transformers names them.

    Attributes:
      last_hidden_state: `[B, S, D]`, after `final_layer_norm`.
      hidden_states: `num_hidden_layers + 1` arrays `[B, S, D]`: the embeddings output, then
        each layer's output (the last one before `final_layer_norm`).
      pooler_output: `[B, D]`, `last_hidden_state` at the EOS position.
      text_embeds: `[B, P]`, `text_projection(pooler_output)` (projection model only, else None).
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooler_output: jax.Array
    text_embeds: jax.Array | None = None


class CLIPTextEmbeddings(nn.Module):
    """Token + learned absolute position embeddings: ids `[B, S]` -> `[B, S, D]`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        s = input_ids.shape[-1]
        if s > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {s} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}."
            )
        embed = lambda n, name: nn.Embed(
            n, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        tokens = embed(cfg.vocab_size, "token_embedding")(input_ids)
        positions = embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(s))
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with a `[B, 1, S, S]` boolean mask: `[B, S, D] -> [B, S, D]`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        b, s, d = x.shape
        heads = cfg.num_attention_heads
        dense = lambda name: nn.Dense(
            d, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        q = dense("q_proj")(x).reshape(b, s, heads, d // heads)  # [B, S, N, H]
        k = dense("k_proj")(x).reshape(b, s, heads, d // heads)
        v = dense("v_proj")(x).reshape(b, s, heads, d // heads)
        y = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=(d // heads) ** -0.5)
        return dense("out_proj")(y.reshape(b, s, d))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2: `[B, S, D] -> [B, S, D]`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(cfg.intermediate_size, name="fc1", **kw)(x)
        x = ACTIVATIONS[cfg.hidden_act](x)
        return nn.Dense(cfg.hidden_size, name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: `[B, S, D] -> [B, S, D]`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(
            epsilon=self.config.layer_norm_eps, name=name, **kw
        )
        x = x + CLIPAttention(self.config, name="self_attn", **kw)(ln("layer_norm1")(x), mask)
        return x + CLIPMLP(self.config, name="mlp", **kw)(ln("layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The layer stack; returns every layer's output `[B, S, D]` (the input not included)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        outs = []
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(
                self.config, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}"
            )(x, mask)
            outs.append(x)
        return tuple(outs)


def attention_mask_4d(seq_len: int, padding_mask: jax.Array | None = None) -> jax.Array:
    """Causal mask AND an optional key padding mask `[B, S]` (1 = keep) -> bool `[B|1, 1, S, S]`."""
    mask = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask.astype(bool)[:, None, None, :]
    return mask


def pool_eos(x: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """`x [B, S, D]` at the first EOS position of each sequence -> `[B, D]`, as transformers 5.

    With the legacy `eos_token_id == 2` the EOS is taken to be the highest id (argmax of ids).
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        idx = jnp.argmax(input_ids, axis=-1)
    else:
        idx = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]


class CLIPTextModel(nn.Module):
    """transformers `CLIPTextModel`: ids `[B, S]` (+ optional padding mask) -> CLIPTextOutput."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPTextEmbeddings(self.config, **kw)
        self.encoder = CLIPEncoder(self.config, **kw)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.config.layer_norm_eps, **kw)

    def encode(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPTextOutput:
        """The text transformer shared by both encoders (`text_embeds` left None)."""
        x = self.embeddings(input_ids)  # [B, S, D]
        layers = self.encoder(x, attention_mask_4d(input_ids.shape[-1], attention_mask))
        last = self.final_layer_norm(layers[-1])
        return CLIPTextOutput(
            last_hidden_state=last,
            hidden_states=(x, *layers),
            pooler_output=pool_eos(last, input_ids, self.config.eos_token_id),
        )

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPTextOutput:
        """Args: input_ids `[B, S]` int; attention_mask `[B, S]` (1 = token, 0 = padding)."""
        return self.encode(input_ids, attention_mask)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers `CLIPTextModelWithProjection`: adds `text_embeds [B, P]` (no bias)."""

    def setup(self):
        super().setup()
        self.text_projection = nn.Dense(
            self.config.projection_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPTextOutput:
        """Args: input_ids `[B, S]` int; attention_mask `[B, S]` (1 = token, 0 = padding)."""
        out = self.encode(input_ids, attention_mask)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))
