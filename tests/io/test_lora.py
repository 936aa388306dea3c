"""io/lora.py on the tiny SDXL: two LoRAs (a diffusers/PEFT file with linear and conv layers in
the UNet and both text encoders, and a kohya file) merged at two scales equal diffusers'
`load_lora_weights` + `set_adapters` on UNet eps, prompt embeddings and the final image; kohya
SGM names equal diffusers' reading of them; bad files are one-line errors that change nothing;
`set_loras([])` restores the base bit-exactly; the merge is linear in the scales."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest
import torch

from distrifusion_jax.io.keys import flatten
from distrifusion_jax.io.lora import LoraError, kernel_shapes, load_lora
from distrifusion_jax.io.lora_keys import kohya_names
from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.pipeline import DistriSDXLPipeline
from tests.io.lora_files import kohya_tensors, peft_adapter, save_diffusers, save_tensors
from tests.tiny import assert_close, nchw_to_nhwc, randn

PROMPT = "a photo of a red sneaker"
FAST = ["--steps", "3", "--warmup-steps", "1"]  # as tests/test_generate.py
SCALES = (0.7, 0.5)  # LoRA A (PEFT file), LoRA B (kohya file)
# A: every kind of layer: attention and MLP linears, 3x3 convs (conv1/conv2), 1x1 conv
# (conv_shortcut), the linear proj_in; alpha 8 / rank 4 comes from diffusers' adapter metadata.
UNET_A = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "conv1",
    "conv2",
    "conv_shortcut",
    "proj_in",
    "ff.net.2",
]
TEXT_A = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
# B (kohya, rank 2, per-module .alpha): strided down/up-sampler convs, conv_in, time embedding.
UNET_B = ["to_k", "ff.net.0.proj", "proj_out", "conv1", "time_emb_proj", "conv_shortcut", "conv",
          "conv_in", "time_embedding.linear_1"]  # fmt: skip


def alpha_b(module: str) -> float:
    return 3.0 if "conv" in module else 1.0


@pytest.fixture(scope="module")
def lora(tiny_sdxl, tmp_path_factory):
    """The LoRA files: `peft` (A), `kohya` (B), `sgm` (B's UNet part with SGM block names)."""
    d = tmp_path_factory.mktemp("loras")
    t = tiny_sdxl
    a = {
        "unet": peft_adapter(t.unet, UNET_A, rank=4, alpha=8, seed=10),
        "text_encoder": peft_adapter(t.text_encoder, TEXT_A, rank=4, alpha=8, seed=11),
        "text_encoder_2": peft_adapter(t.text_encoder_2, TEXT_A, rank=4, alpha=8, seed=12),
    }
    b = {
        "unet": peft_adapter(t.unet, UNET_B, rank=2, alpha=2, seed=13)[0],
        "text_encoder": peft_adapter(t.text_encoder, ["fc1", "fc2"], 2, 2, seed=14)[0],
        "text_encoder_2": peft_adapter(t.text_encoder_2, ["k_proj", "out_proj"], 2, 2, 15)[0],
    }
    peft = save_diffusers(d, "peft.safetensors", a)
    kohya = save_tensors(d / "kohya.safetensors", kohya_tensors(b, alpha_b))
    pipe = DistriSDXLPipeline.from_pretrained(t.root)
    unet_kernels = kernel_shapes(pipe.unet_params)
    to_sgm = {}
    for name, path in kohya_names("unet", unet_kernels).items():
        if name.startswith(("input_", "middle_", "output_", "time_embed_", "label_", "out_")):
            to_sgm["_".join(path[:-1])] = name
    sgm_tensors = kohya_tensors({"unet": b["unet"]}, alpha_b, lambda m: to_sgm[m.replace(".", "_")])
    sgm = save_tensors(d / "sgm.safetensors", sgm_tensors)
    return types.SimpleNamespace(peft=peft, kohya=kohya, sgm=sgm, a=a, b=b, dir=d)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl, lora):
    p = DistriSDXLPipeline.from_pretrained(tiny_sdxl.root)
    p.set_loras([(lora.peft, SCALES[0]), (lora.kohya, SCALES[1])])
    return p


def _torch_pipe(root, files_and_scales):
    import diffusers
    import transformers
    from diffusers import StableDiffusionXLPipeline

    transformers.logging.set_verbosity_error()  # PEFT injection prints load reports
    diffusers.utils.logging.set_verbosity_error()
    ref = StableDiffusionXLPipeline.from_pretrained(str(root))
    names = []
    for i, (path, _) in enumerate(files_and_scales):
        ref.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    ref.set_adapters(names, adapter_weights=[s for _, s in files_and_scales])
    return ref


@pytest.fixture(scope="module")
def torch_pipe(tiny_sdxl, lora):
    """diffusers with both LoRAs as PEFT adapters (unmerged), weighted by SCALES."""
    return _torch_pipe(tiny_sdxl.root, [(lora.peft, SCALES[0]), (lora.kohya, SCALES[1])])


def _unet_inputs():
    x = randn(1, 2, 4, 32, 32)  # [B, C, H, W]
    ctx = randn(2, 2, 7, 64)
    cond = {
        "text_embeds": randn(3, 2, 32),
        "time_ids": np.array([[64, 64, 0, 0, 64, 64], [48, 80, 8, 0, 64, 64]], np.float32),
    }
    return x, np.array([999.0, 17.0], np.float32), ctx, cond


def _eps(ours, ref_unet, params):
    x, t, ctx, cond = _unet_inputs()
    got = jax.jit(ours.apply)({"params": params}, nchw_to_nhwc(x), t, ctx, cond)
    with torch.no_grad():
        tc = {k: torch.from_numpy(v) for k, v in cond.items()}
        want = ref_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                        added_cond_kwargs=tc).sample  # fmt: skip
    return np.asarray(got), nchw_to_nhwc(want)


# Tolerances as tests/models/test_unet.py (fp32, 'highest' matmuls; summation order only).
MAX_ABS, REL_L2 = 1e-4, 1e-5


def test_unet_eps_equals_diffusers(pipe, torch_pipe):
    got, want = _eps(pipe.unet, torch_pipe.unet, pipe.unet_params)
    assert_close(got, want, MAX_ABS, REL_L2, "UNet eps, 2 LoRAs merged vs diffusers adapters")
    base, _ = _eps(pipe.unet, torch_pipe.unet, pipe._base["unet"])
    assert np.linalg.norm(base - want) > 0.3 * np.linalg.norm(want)  # the LoRAs matter


def test_sgm_named_kohya_equals_diffusers(tiny_sdxl, lora):
    """kohya's SDXL names (`input_blocks_4_1_...`) as diffusers maps them."""
    ref = _torch_pipe(tiny_sdxl.root, [(lora.sgm, 0.8)])
    ours = DistriSDXLPipeline.from_pretrained(tiny_sdxl.root)
    ours.set_loras([(lora.sgm, 0.8)])
    got, want = _eps(ours.unet, ref.unet, ours.unet_params)
    assert_close(got, want, MAX_ABS, REL_L2, "UNet eps, SGM-named kohya LoRA vs diffusers")


def test_prompt_encoding_equals_diffusers(pipe, torch_pipe):
    from distrifusion_jax.prompt import encode_prompts

    with torch.no_grad():
        pe, npe, pp, npp = torch_pipe.encode_prompt(
            [PROMPT], negative_prompt=["blurry"], do_classifier_free_guidance=True
        )
    cond = encode_prompts(pipe.encoders, [PROMPT], ["blurry"], True, True, [64, 64, 0, 0, 64, 64])
    assert_close(cond["encoder_hidden_states"][1], pe.numpy(), 1e-5, 1e-5, "prompt, LoRA encoders")
    assert_close(cond["encoder_hidden_states"][0], npe.numpy(), 1e-5, 1e-5, "negative prompt")
    assert_close(cond["text_embeds"][1], pp.numpy(), 1e-5, 1e-5, "pooled, LoRA text_encoder_2")
    assert_close(cond["text_embeds"][0], npp.numpy(), 1e-5, 1e-5, "negative pooled")
    base_encoders = [pipe._base[n] for n in ("text_encoder", "text_encoder_2")]
    base = encode_prompts(base_encoders, [PROMPT], None, False, True, [64, 64, 0, 0, 64, 64])
    for key, want in (("encoder_hidden_states", pe), ("text_embeds", pp)):  # the LoRAs matter
        d = np.asarray(base[key][0]) - want.numpy()[0]
        assert np.linalg.norm(d) > 0.1 * np.linalg.norm(want.numpy()), key


def test_image_equals_diffusers(pipe, torch_pipe):
    noise = np.random.default_rng(0).standard_normal((1, 32, 32, 4)).astype(np.float32)
    with torch.no_grad():
        want = torch_pipe(
            PROMPT, num_inference_steps=6, guidance_scale=5.0, output_type="np",
            latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
        ).images[0]  # fmt: skip
    got = np.asarray(pipe(PROMPT, num_inference_steps=6, noise=noise)[0], np.float64)
    diff = np.abs(got - np.round(want * 255))
    print(f"[lora] image vs diffusers: max {diff.max():.0f}/255, mean {diff.mean():.3f}")
    assert diff.max() <= 1.0  # uint8 rounding only


# ---- names and formats ------------------------------------------------------------------

# SGM names kohya gives SDXL modules, by hand for 2 layers per block: input_blocks_0 is conv_in,
# then (resnet, transformer) per layer and a downsampler per down block; output_blocks hold 3
# layers per up block, the last also the upsampler (`_2` after a transformer).
SGM = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks_0/resnets_0/conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks_0/resnets_1/time_emb_proj",
    "input_blocks_3_0_op": "down_blocks_0/downsamplers_0/conv",
    "input_blocks_4_0_skip_connection": "down_blocks_1/resnets_0/conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks_1/attentions_0/proj_in",
    "input_blocks_5_1_transformer_blocks_1_attn2_to_k": (
        "down_blocks_1/attentions_1/transformer_blocks_1/attn2/to_k"
    ),
    "middle_block_0_out_layers_3": "mid_block/resnets_0/conv2",
    "middle_block_1_transformer_blocks_0_ff_net_0_proj": (
        "mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj"
    ),
    "middle_block_2_emb_layers_1": "mid_block/resnets_1/time_emb_proj",
    "output_blocks_0_1_proj_out": "up_blocks_0/attentions_0/proj_out",
    "output_blocks_2_1_transformer_blocks_0_attn1_to_out_0": (
        "up_blocks_0/attentions_2/transformer_blocks_0/attn1/to_out_0"
    ),
    "output_blocks_2_2_conv": "up_blocks_0/upsamplers_0/conv",
    "output_blocks_5_0_out_layers_3": "up_blocks_1/resnets_2/conv2",
    "time_embed_2": "time_embedding/linear_2",
    "label_emb_0_0": "add_embedding/linear_1",
    "out_2": "conv_out",
}


def test_kohya_names(pipe):
    names = kohya_names("unet", kernel_shapes(pipe._base["unet"]))
    assert {k: "/".join(names[k][:-1]) for k in SGM} == SGM
    assert None not in names.values()  # no two modules share a name
    te = kohya_names("text_encoder_2", kernel_shapes(pipe._base["text_encoder_2"].params))
    want = ("encoder", "layers_1", "mlp", "fc2", "kernel")
    assert te["text_model_encoder_layers_1_mlp_fc2"] == te["encoder_layers_1_mlp_fc2"] == want


def _kernels(p):
    return {"unet": kernel_shapes(p._base["unet"])} | {
        n: kernel_shapes(p._base[n].params) for n in ("text_encoder", "text_encoder_2")
    }


def test_formats_give_the_same_updates(pipe, lora):
    """B as kohya (diffusers names), kohya (SGM names) and diffusers keys with `.alpha`."""
    kernels = _kernels(pipe)
    diffusers_keys = {}
    for comp, sd in lora.b.items():
        for key, v in sd.items():
            diffusers_keys[f"{comp}.{key}"] = v
            diffusers_keys[f"{comp}.{key.rsplit('.lora_', 1)[0]}.alpha"] = torch.tensor(
                alpha_b(key.rsplit(".lora_", 1)[0])
            )
    other = save_tensors(lora.dir / "b_diffusers.safetensors", diffusers_keys)
    ref = load_lora(lora.kohya, kernels).layers
    for path in (other, lora.sgm):
        got = load_lora(path, kernels).layers
        comps = ref.keys() if path == other else ["unet"]
        assert set(got) == set(comps)
        for comp in comps:
            assert got[comp].keys() == ref[comp].keys()
            for k, layer in got[comp].items():
                assert layer.scale == ref[comp][k].scale
                np.testing.assert_array_equal(layer.down, ref[comp][k].down)
                np.testing.assert_array_equal(layer.up, ref[comp][k].up)
    assert {c: len(v) for c, v in ref.items()} == {c: len(sd) // 2 for c, sd in lora.b.items()}


# ---- strictness and swapping ------------------------------------------------------------


def _bad_files(lora):
    """(file, text the error must contain) for each way a LoRA can be wrong."""
    d = lora.dir
    a = {f"unet.{k}": v for k, v in lora.a["unet"][0].items()}
    qa = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    qb = qa.replace("lora_A", "lora_B")
    cases = []

    def add(name, tensors, needle):
        cases.append((save_tensors(d / name, tensors), needle))

    bad = qa.replace("down_blocks.1", "down_blocks.9")
    add("unknown.safetensors", {**a, bad: a[qa], bad.replace("lora_A", "lora_B"): a[qb]}, bad)
    kohya_bad = "lora_unet_down_blocks_1_attentions_0_proj_inn.lora_down.weight"
    add("unknown_kohya.safetensors", {**a, kohya_bad: a[qa]}, kohya_bad)
    add("shape.safetensors", {**a, qa: torch.zeros(4, 63)}, qa)
    add("rank.safetensors", {**a, qb: torch.zeros(64, 3)}, "rank mismatch")
    add("no_up.safetensors", {k: v for k, v in a.items() if k != qb}, "no matching up")
    add("not_lora.safetensors", {**a, "unet.conv_in.weight": torch.zeros(3)}, "unet.conv_in.weight")
    add("empty.safetensors", {}, "holds no tensors")
    for suffix in (".bin", ".pt", ".ckpt"):
        path = d / f"lora{suffix}"
        torch.save({qa: a[qa]}, path)
        cases.append((path, f"lora{suffix} is a pickle"))
    (d / "garbage.safetensors").write_bytes(b"\x00" * 20)
    cases.append((d / "garbage.safetensors", "garbage.safetensors"))
    cases.append((d / "missing.safetensors", "missing.safetensors does not exist"))
    return cases


def test_bad_files_are_one_line_errors_and_change_nothing(tiny_sdxl, lora):
    p = DistriSDXLPipeline.from_pretrained(tiny_sdxl.root)
    p.set_loras([(lora.kohya, 1.0)])
    before = (p.unet_params, list(p.encoders), list(p.loras))
    for path, needle in _bad_files(lora):
        with pytest.raises(LoraError) as e:
            p.set_loras([(lora.peft, 1.0), (path, 1.0)])
        msg = str(e.value)
        assert "\n" not in msg and needle in msg, msg
        assert p.unet_params is before[0] and p.encoders == before[1] and p.loras == before[2]


def test_swap_rescale_and_restore(tiny_sdxl, lora):
    """Merging is linear in the scales and in the LoRAs; `[]` gives back the base bit-exactly;
    on an 8-device mesh the merged weights stay replicated like the base."""
    p = DistriSDXLPipeline.from_pretrained(tiny_sdxl.root, parallel=ParallelConfig(patches=8))
    base = {"unet": flatten(p.unet_params)} | {
        n: flatten(e.params) for n, e in zip(("text_encoder", "text_encoder_2"), p.encoders)
    }

    def deltas(loras):
        p.set_loras(loras)
        now = {"unet": flatten(p.unet_params)} | {
            n: flatten(e.params) for n, e in zip(("text_encoder", "text_encoder_2"), p.encoders)
        }
        return {
            (c, k): np.asarray(v, np.float64) - np.asarray(base[c][k], np.float64)
            for c in now
            for k, v in now[c].items()
        }

    one, two = deltas([(lora.peft, 1.0)]), deltas([(lora.peft, 2.0)])
    both = deltas([(lora.peft, -0.5), (lora.kohya, 1.5)])
    kohya = deltas([(lora.kohya, 1.0)])
    leaf = flatten(p.unet_params)[("conv_in", "kernel")]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    for k in one:
        scale = np.abs(one[k]).max() + np.abs(kohya[k]).max() + 1e-30
        np.testing.assert_allclose(two[k], 2 * one[k], atol=1e-6 * scale, err_msg=str(k))
        np.testing.assert_allclose(
            both[k], -0.5 * one[k] + 1.5 * kohya[k], atol=1e-6 * scale, err_msg=str(k)
        )
    changed = {k for k, v in one.items() if np.any(v)}
    assert ("unet", ("conv_in", "kernel")) not in changed and len(changed) > 100
    p.set_loras([])
    params = {"unet": p.unet_params, "text_encoder": p.encoders[0].params}
    params["text_encoder_2"] = p.encoders[1].params
    for c, flat in base.items():
        for k, v in flatten(params[c]).items():
            assert np.array_equal(np.asarray(v), np.asarray(flat[k])), (c, k)
    assert p.loras == []


# ---- generate.py --lora -----------------------------------------------------------------


@pytest.mark.slow
def test_generate_records_loras(tiny_sdxl, lora, tmp_path):
    from PIL import Image

    from distrifusion_jax.cli import generate

    out = tmp_path / "img.png"
    args = ["--model", str(tiny_sdxl.root), "--output", str(out), *FAST]
    rc = generate.main([*args, "--lora", f"{lora.peft}:0.7", "--lora", str(lora.kohya)])
    assert rc == 0
    recorded = json.loads(Image.open(out).text["loras"])
    assert recorded == [
        {"path": str(lora.peft), "scale": 0.7},
        {"path": str(lora.kohya), "scale": 1.0},
    ]


@pytest.mark.parametrize(
    "value,message", [("missing.safetensors:0.5", "does not exist"), ("lora.bin", "pickle")]
)
def test_generate_bad_lora_one_line_no_file(tiny_sdxl, lora, tmp_path, capsys, value, message):
    from distrifusion_jax.cli import generate

    if value.endswith(".bin"):
        (tmp_path / value).write_bytes(b"not really")
    out = tmp_path / "out" / "img.png"
    out.parent.mkdir()
    rc = generate.main(
        ["--model", str(tiny_sdxl.root), "--output", str(out), *FAST,
         "--lora", str(tmp_path / value)]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert list(out.parent.iterdir()) == []
