"""Flax CLIP text encoders vs transformers (PyTorch) on the same random weights; key coverage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from distrifusion_jax.io.keys import convert_tensors, flatten, flax_path, is_ignored, to_flax_layout
from distrifusion_jax.models import clip

# fp32 on CPU with 'highest' matmul precision; differences are summation order only.
RTOL_L2, ATOL_MAX = 1e-5, 1e-4

# environment.md section 7: the SDXL text encoders.
TE1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
           num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
           projection_dim=768)  # fmt: skip
TE2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
           projection_dim=1280)  # fmt: skip

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=0, pad_token_id=1)  # fmt: skip
EOS = 999  # the highest id in the tiny vocab, as 49407 is in CLIP's (legacy pooling: argmax id)
EOS_MID = 500  # a real eos_token_id below other ids: only first-EOS pooling finds it


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter (none zero): weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, .1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / np.sqrt(p[0].numel()))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_close(name: str, ours, theirs, errors: dict) -> None:
    a, b = np.asarray(ours, np.float64), theirs.detach().numpy().astype(np.float64)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    errors[name] = (rel_l2(a, b), float(np.max(np.abs(a - b))))
    assert errors[name][0] <= RTOL_L2 and errors[name][1] <= ATOL_MAX, (name, errors[name])


def make_ids(eos: int, pad_id: int, seed: int = 0) -> np.ndarray:
    """`[2, 77]` ids: random tokens in [3, 998), `eos` at 6 and 20, then `pad_id` padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, EOS - 1, size=(2, 77))
    ids[ids == eos] = 3
    for row, eos_at in enumerate((6, 20)):
        ids[row, eos_at] = eos
        ids[row, eos_at + 1 :] = pad_id
    return ids


def build(with_projection: bool, hidden_act: str, eos_token_id: int, seed: int):
    """Torch model with random weights, and our model with the converted params."""
    tcfg = transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act, eos_token_id=eos_token_id)
    tcls = (
        transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    )
    torch_model = tcls(tcfg).eval()
    randomize_(torch_model, seed)
    cfg = clip.CLIPTextConfig.from_hf(tcfg.to_dict())
    fcls = clip.CLIPTextModelWithProjection if with_projection else clip.CLIPTextModel
    model = fcls(cfg)
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
    sd = torch_model.state_dict()
    params = convert_tensors(
        sd.keys(), lambda k: sd[k].numpy(), target["params"], strip_prefix=clip.STRIP_PREFIX
    )
    return torch_model, model, params


@pytest.mark.parametrize(
    "with_projection,hidden_act,eos_token_id,eos,pad_id",
    [
        (False, "quick_gelu", 2, EOS, EOS),  # SDXL text_encoder: legacy eos id, pads with EOS
        (True, "gelu", 2, EOS, 0),  # SDXL text_encoder_2: legacy eos id, pads with "!" (0)
        (False, "quick_gelu", EOS_MID, EOS_MID, EOS_MID),  # first EOS, padding repeats it
        (True, "gelu", EOS_MID, EOS_MID, 0),
    ],
    ids=["te1-legacy-eos", "te2-legacy-eos", "te1-eos", "te2-eos"],
)
def test_matches_transformers(with_projection, hidden_act, eos_token_id, eos, pad_id):
    torch_model, model, params = build(with_projection, hidden_act, eos_token_id, seed=1)
    ids = make_ids(eos, pad_id)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    errors: dict = {}
    assert_close("last_hidden_state", out.last_hidden_state, ref.last_hidden_state, errors)
    for i in range(len(ref.hidden_states)):
        assert_close(f"hidden_states[{i}]", out.hidden_states[i], ref.hidden_states[i], errors)
    if with_projection:
        assert_close("text_embeds", out.text_embeds, ref.text_embeds, errors)
        pooled = torch_model.text_model(torch.from_numpy(ids)).pooler_output
    else:
        assert out.text_embeds is None
        pooled = ref.pooler_output
    assert_close("pooler_output", out.pooler_output, pooled, errors)
    print({k: f"rel {v[0]:.2e} max {v[1]:.2e}" for k, v in errors.items()})


def test_padding_mask_matches_transformers():
    torch_model, model, params = build(True, "gelu", EOS_MID, seed=2)
    ids = make_ids(EOS_MID, 0, seed=3)
    mask = (np.arange(77)[None] <= np.array([[6], [20]])).astype(np.int64)  # keep up to EOS
    with torch.no_grad():
        ref = torch_model(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True
        )
    out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    errors: dict = {}
    assert_close("last_hidden_state", out.last_hidden_state, ref.last_hidden_state, errors)
    assert_close("hidden_states[-2]", out.hidden_states[-2], ref.hidden_states[-2], errors)
    assert_close("text_embeds", out.text_embeds, ref.text_embeds, errors)
    print(errors)


@pytest.mark.parametrize(
    "hf,with_projection,preset",
    [
        (TE1, False, clip.sdxl_text_encoder_config),
        (TE2, True, clip.sdxl_text_encoder_2_config),
    ],
)
def test_full_size_key_coverage(hf, with_projection, preset):
    """Every full-size torch key maps to a Flax param of the right shape; none left over."""
    tcfg = transformers.CLIPTextConfig(**hf)
    tcls = (
        transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    )
    with torch.device("meta"):
        torch_model = tcls(tcfg)
    cfg = clip.CLIPTextConfig.from_hf(tcfg.to_dict())
    ours = preset()
    arch = ("bos_token_id", "eos_token_id", "pad_token_id")
    assert arch_fields(cfg, arch) == arch_fields(ours, arch)
    fcls = clip.CLIPTextModelWithProjection if with_projection else clip.CLIPTextModel
    target = jax.eval_shape(fcls(ours).init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
    flat = flatten(target["params"])
    seen = set()
    for key, tensor in torch_model.state_dict().items():
        if is_ignored(key):
            continue
        name = key.removeprefix(clip.STRIP_PREFIX)
        path = flax_path(name, flat)
        assert path in flat, f"torch key {key} has no Flax param"
        shape = to_flax_layout(np.empty(tensor.shape, np.uint8), path).shape
        assert shape == flat[path].shape, (key, shape, flat[path].shape)
        seen.add(path)
    assert not set(flat) - seen, f"Flax params without a torch key: {sorted(set(flat) - seen)}"
    n_params = sum(int(np.prod(v.shape)) for v in flat.values())
    assert n_params == sum(p.numel() for p in torch_model.parameters())


def arch_fields(cfg: clip.CLIPTextConfig, fields: tuple[str, ...]) -> dict:
    d = cfg.to_dict()
    for f in fields:
        d.pop(f)
    return d


def test_config_round_trip_and_errors():
    cfg = clip.sdxl_text_encoder_2_config()
    assert clip.CLIPTextConfig.from_hf(cfg.to_dict()) == cfg
    # A shipped SDXL text_encoder_2/config.json (transformers 4.x) parses to the preset.
    shipped = dict(TE2, architectures=["CLIPTextModelWithProjection"], attention_dropout=0.0,
                   bos_token_id=0, dropout=0.0, eos_token_id=2, initializer_factor=1.0,
                   initializer_range=0.02, layer_norm_eps=1e-05, model_type="clip_text_model",
                   pad_token_id=1, torch_dtype="float16", transformers_version="4.32.0.dev0",
                   _name_or_path="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")  # fmt: skip
    assert clip.CLIPTextConfig.from_hf(shipped) == cfg
    with pytest.raises(ValueError, match="hidden_act='relu'.*supported"):
        clip.CLIPTextConfig.from_hf(dict(TE1, hidden_act="relu"))
    with pytest.raises(ValueError, match="'use_rope'.*not supported"):
        clip.CLIPTextConfig.from_hf(dict(TE1, use_rope=True))
    with pytest.raises(ValueError, match="model_type='clip'"):
        clip.CLIPTextConfig.from_hf(dict(TE1, model_type="clip"))
    with pytest.raises(ValueError, match="eos_token_id"):
        clip.CLIPTextConfig.from_hf(dict(TE1, eos_token_id=[2, 3]))
