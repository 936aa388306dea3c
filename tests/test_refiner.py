"""Base -> refiner ("ensemble of expert denoisers") on tiny random SDXL base and refiner folders,
converted with the project's converter: equal to diffusers' StableDiffusionXLPipeline
(`denoising_end`, `output_type="latent"`) -> StableDiffusionXLImg2ImgPipeline
(`denoising_start`) on the same initial noise; full_sync on 2 devices (and with CFG split) equals
one device; every displaced mode runs; the latents stay split by rows across the hand-off; bad
inputs are one-line errors."""

import json
import types

import jax
import numpy as np
import pytest
from PIL import Image

from distrifusion_jax.io.convert import convert
from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.config import MODES
from distrifusion_jax.pipeline import DistriSDXLPipeline
from tests.tiny_refiner import write_tiny_refiner

PROMPT = "a photo of a red sneaker"
STEPS = 6  # SDXL's leading spacing: timesteps 831 665 499 333 | 167 1 (cutoff 200 at 0.8)
SIZE = 64  # pixels; latents 32x32 (the tiny VAE's factor is 2)


@pytest.fixture(scope="module")
def folders(tiny_sdxl, tmp_path_factory):
    """Diffusers folders (`base`, `refiner`) and their conversions (`conv_base`, ...)."""
    refiner = write_tiny_refiner(tmp_path_factory.mktemp("tiny_refiner"), tiny_sdxl.root)
    out = tmp_path_factory.mktemp("converted")
    convert(tiny_sdxl.root, out / "base")
    convert(refiner, out / "refiner")
    return types.SimpleNamespace(
        base=tiny_sdxl.root, refiner=refiner, conv_base=out / "base", conv_refiner=out / "refiner"
    )


@pytest.fixture(scope="module")
def pipes(folders):
    """`pipes(refiner=True, **parallel_kw)`: converted base (+ refiner) per ParallelConfig."""
    loaded = {}

    def get(refiner=True, **kw):
        key = (refiner, tuple(sorted(kw.items())))
        if key not in loaded:
            loaded[key] = DistriSDXLPipeline.from_pretrained(
                folders.conv_base,
                parallel=ParallelConfig(**kw),
                refiner=folders.conv_refiner if refiner else None,
            )
        return loaded[key]

    return get


def _noise():
    return np.random.default_rng(0).standard_normal((1, 32, 32, 4)).astype(np.float32)


def _diffusers(folders, monkeypatch, noise, scheduler, frac):
    """diffusers' base (denoising_end, latents out) -> refiner (denoising_start): the image
    (0..255), the base's and the refiner's latents `[B, h, w, C]`; `noise` is the one random
    draw."""
    import diffusers
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl as base_mod
    from diffusers.pipelines.stable_diffusion_xl import (
        pipeline_stable_diffusion_xl_img2img as refiner_mod,
    )

    draws = []

    def randn(shape, **_):
        draws.append(shape)
        return torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())

    monkeypatch.setattr(base_mod, "randn_tensor", randn)
    monkeypatch.setattr(refiner_mod, "randn_tensor", randn)
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folders.base))
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(folders.refiner))
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    if scheduler == "dpmpp_2m":
        for p in (base, refiner):
            p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config)
    with torch.no_grad():
        latents = base(
            PROMPT, num_inference_steps=STEPS, denoising_end=frac, output_type="latent",
            height=SIZE, width=SIZE,
        ).images  # fmt: skip
        run = lambda out: refiner(
            PROMPT, image=latents, num_inference_steps=STEPS, denoising_start=frac,
            output_type=out,
        ).images  # fmt: skip
        image, final = run("np")[0], run("latent")
    assert len(draws) == 1, draws  # the base's initial noise; the refiner draws nothing
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    return np.round(image * 255), nhwc(latents), nhwc(final)


def test_converted_refiner_keeps_its_options(folders):
    index = json.loads((folders.conv_refiner / "model_index.json").read_text())
    assert index["requires_aesthetics_score"] is True
    assert index["force_zeros_for_empty_prompt"] is False
    assert not (folders.conv_refiner / "text_encoder").exists()


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_base_then_refiner_equals_diffusers(folders, pipes, monkeypatch, scheduler):
    frac, noise = 0.8, _noise()
    want, want_base, want_final = _diffusers(folders, monkeypatch, noise, scheduler, frac)
    call = dict(num_inference_steps=STEPS, scheduler=scheduler, noise=noise, height=SIZE)
    base = np.asarray(pipes(refiner=False).generate_latents(PROMPT, denoising_end=frac, **call))
    final = np.asarray(pipes().generate_latents(PROMPT, denoising_end=frac, **call))
    rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()
    got = pipes()(PROMPT, width=SIZE, denoising_end=frac, **call)[0]
    diff = np.abs(np.asarray(got, np.float64) - want).max()
    print(
        f"[refiner] {scheduler}: max rel err base latents {rel(base, want_base):.2e}, final "
        f"latents {rel(final, want_final):.2e}; image max |ours - diffusers| = {diff} / 255"
    )
    assert rel(base, want_base) < 1e-4 and rel(final, want_final) < 1e-4
    assert diff <= 1.0


def test_refiner_time_ids_and_text(pipes):
    """5 time ids (original size, crop, aesthetic score 6.0 / negative 2.5); the refiner's one
    encoder (hidden 32) and the empty negative prompt encoded (force_zeros false)."""
    pipe = pipes()
    cond = pipe.refiner.cond([PROMPT], None, True, (SIZE, SIZE), pipe.mesh, pipe.parallel)
    ids = np.asarray(cond["time_ids"])
    np.testing.assert_array_equal(ids[0, 0], [SIZE, SIZE, 0, 0, 2.5])
    np.testing.assert_array_equal(ids[1, 0], [SIZE, SIZE, 0, 0, 6.0])
    assert cond["encoder_hidden_states"].shape == (2, 1, 77, 32)
    assert np.abs(np.asarray(cond["encoder_hidden_states"][0])).max() > 0


@pytest.mark.parametrize(
    "kw",
    [dict(patches=2), pytest.param(dict(patches=2, cfg_split=True), marks=pytest.mark.slow)],
    ids=["n2", "n2-cfg"],
)
def test_full_sync_equals_one_device(pipes, kw):
    """Both drivers (one jit call; step at a time) on 2 row bands = one device."""
    call = dict(num_inference_steps=STEPS, seed=3, height=SIZE, width=SIZE, denoising_end=0.5)
    for extra in ({}, dict(progress=iter)):
        one = np.asarray(pipes().generate_latents(PROMPT, **call, **extra))
        many = np.asarray(pipes(mode="full_sync", **kw).generate_latents(PROMPT, **call, **extra))
        err = np.abs(many - one).max()
        print(f"[refiner full_sync] {kw} {sorted(extra)}: max err {err:.2e}")
        assert err <= 1e-4 * max(1.0, np.abs(one).max())


QUICK_MODES = ("corrected_async_gn", "naive_patch")  # the default and the baseline; rest: slow


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(m, marks=() if m in QUICK_MODES else pytest.mark.slow)
        for m in MODES
        if m != "full_sync"
    ],
)
def test_every_displaced_mode_runs(pipes, mode):
    """Displaced steps in both experts (warm-up 1, half the steps each); on random weights the
    latents are only roughly those of one device."""
    call = dict(num_inference_steps=8, seed=3, height=SIZE, width=SIZE, denoising_end=0.5)
    one = np.asarray(pipes().generate_latents(PROMPT, **call))
    many = np.asarray(pipes(patches=2, mode=mode, warmup_steps=1).generate_latents(PROMPT, **call))
    rms = lambda a: np.sqrt(np.mean(a**2))
    print(f"[refiner {mode}] rms(ours - one device) / rms(one) = {rms(many - one) / rms(one):.3f}")
    assert np.isfinite(many).all()
    assert rms(many - one) < 0.5 * rms(one)


@pytest.mark.parametrize("progress", [None, iter], ids=["jit", "stepper"])
def test_handoff_stays_split_by_rows(pipes, monkeypatch, progress):
    """The refiner receives the base's latents as a global array split by rows over `patch`
    (nothing gathered to one device between the samplers)."""
    from distrifusion_jax.refiner import Refiner

    pipe = pipes(patches=2, mode="full_sync")
    seen = []
    denoise = Refiner.denoise

    def spy(self, latents, *args, **kw):
        seen.append(latents)
        return denoise(self, latents, *args, **kw)

    monkeypatch.setattr(Refiner, "denoise", spy)
    pipe.generate_latents(PROMPT, num_inference_steps=STEPS, height=SIZE, progress=progress)
    (latents,) = seen
    assert isinstance(latents, jax.Array) and not latents.is_fully_replicated
    shards = {s.device: s.data.shape for s in latents.addressable_shards}
    assert len(shards) == 2 and all(shape == (1, 16, 32, 4) for shape in shards.values())


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(denoising_end=1.0), r"denoising_end must be in \(0, 1\)"),
        (dict(denoising_end=0.0), r"denoising_end must be in \(0, 1\)"),
        (dict(denoising_end=0.8, denoising_start=1.5), r"denoising_start must be in \(0, 1\)"),
        (dict(denoising_end=0.01), "leaves the base no step"),
        (dict(denoising_end=0.999), "leaves the refiner no step"),
        (dict(image="IMAGE", mask_image="IMAGE"), "inpainting with a refiner"),
    ],
)
def test_bad_inputs_one_line(pipes, kw, match):
    image = Image.new("RGB", (SIZE, SIZE))
    kw = {k: image if v == "IMAGE" else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=match) as e:
        pipes()(PROMPT, num_inference_steps=STEPS, height=SIZE, **kw)
    assert "\n" not in str(e.value)


def test_bad_setup_one_line(folders, pipes):
    with pytest.raises(ValueError, match="is an SDXL refiner .*not a base model") as e:
        DistriSDXLPipeline.from_pretrained(folders.refiner)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="denoising_start needs a refiner") as e:
        pipes(refiner=False)(PROMPT, num_inference_steps=STEPS, denoising_start=0.8)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_cli_base_refiner_writes_png_with_metadata(folders, tmp_path):
    from distrifusion_jax.cli import generate

    out = tmp_path / "out.png"
    rc = generate.main(
        ["--model", str(folders.conv_base), "--refiner", str(folders.conv_refiner),
         "--output", str(out), "--steps", "5", "--high-noise-frac", "0.7", "--patches", "2",
         "--height", str(SIZE), "--width", str(SIZE), "--no-compile-cache"]
    )  # fmt: skip
    assert rc == 0
    meta = Image.open(out).text
    assert meta["refiner"] == str(folders.conv_refiner) and meta["high_noise_frac"] == "0.7"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--high-noise-frac", "0.8"], "--high-noise-frac needs --refiner"),
        (["--refiner", "{refiner}", "--high-noise-frac", "1.0"], "--high-noise-frac must be in"),
        (["--refiner", "{refiner}", "--high-noise-frac", "0"], "--high-noise-frac must be in"),
        (["--refiner", "{tmp}/none"], "--refiner folder"),
        (["--model", "{refiner}"], "is an SDXL refiner, not a base model"),
    ],
)
def test_cli_bad_refiner_inputs(folders, tmp_path, capsys, extra, message):
    from distrifusion_jax.cli import generate

    out = tmp_path / "out.png"
    names = dict(refiner=folders.refiner, tmp=tmp_path)
    argv = ["--model", str(folders.base), "--output", str(out)]
    rc = generate.main(argv + [a.format(**names) for a in extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()
