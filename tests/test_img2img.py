"""Image-to-image and inpainting on the tiny diffusers SDXL folder: equal to diffusers'
StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline (4- and 9-channel UNets) on
the same noise and the posterior mean; the VAE encode on row bands equals one device; full_sync
on 2 and 4 devices equals one device; bad inputs are one-line ValueErrors."""

import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.pipeline import DistriSDXLPipeline
from tests.tiny import TINY_SDXL_UNET_CONFIG, tiny_torch_unet

PROMPT = "a photo of a red sneaker"
STEPS = 6
SIZE = 64  # pixels; latents 32x32 (the tiny VAE's factor is 2)


def _image() -> Image.Image:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    smooth = np.stack([np.sin(6 * x), np.cos(5 * y), x * y], -1) * 100 + 128
    pixels = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def _mask() -> Image.Image:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[12:44, 20:52] = 255  # white: repaint
    return Image.fromarray(m)


IMAGE, MASK = _image(), _mask()


@pytest.fixture(scope="module")
def inpaint_root(tiny_sdxl, tmp_path_factory):
    """The tiny folder with a 9-channel (inpainting) UNet."""
    root = tmp_path_factory.mktemp("tiny_sdxl_inpaint")
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(tiny_sdxl.root / name, root / name)
    shutil.copy(tiny_sdxl.root / "model_index.json", root / "model_index.json")
    tiny_torch_unet({**TINY_SDXL_UNET_CONFIG, "in_channels": 9}, seed=5).save_pretrained(
        root / "unet"
    )
    return root


@pytest.fixture(scope="module")
def pipes(tiny_sdxl, inpaint_root):
    """`pipes(root=None, **parallel_kw)`: a pipeline per (folder, ParallelConfig), loaded once."""
    loaded = {}

    def get(root=None, **kw):
        key = (root, tuple(sorted(kw.items())))
        if key not in loaded:
            path = {None: tiny_sdxl.root, "inpaint": inpaint_root}[root]
            loaded[key] = DistriSDXLPipeline.from_pretrained(path, parallel=ParallelConfig(**kw))
        return loaded[key]

    return get


def _noise():
    return np.random.default_rng(0).standard_normal((1, 32, 32, 4)).astype(np.float32)


def _diffusers(cls_name, root, monkeypatch, noise, scheduler="euler", **kw):
    """Run diffusers' pipeline `cls_name` with `noise` as its one random draw and the posterior
    mean as the image latents (`sample_mode="argmax"`)."""
    import diffusers
    import torch
    from diffusers import DPMSolverMultistepScheduler

    cls = getattr(diffusers, cls_name)
    module = __import__(cls.__module__, fromlist=["x"])
    draws = []

    def randn(shape, **_):
        draws.append(shape)
        return torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())

    argmax = module.retrieve_latents
    monkeypatch.setattr(module, "randn_tensor", randn)
    monkeypatch.setattr(
        module, "retrieve_latents", lambda out, generator=None: argmax(out, sample_mode="argmax")
    )
    pipe = cls.from_pretrained(str(root))
    if scheduler == "dpmpp_2m":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=STEPS, output_type="np", **kw).images[0]
    assert len(draws) == 1, draws  # the initial noise is the only draw
    return np.round(out * 255)


def _max_diff(got, want):
    return np.abs(np.asarray(got, np.float64) - want).max()


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_img2img_equals_diffusers(tiny_sdxl, pipes, monkeypatch, scheduler):
    noise = _noise()
    want = _diffusers(
        "StableDiffusionXLImg2ImgPipeline", tiny_sdxl.root, monkeypatch, noise, scheduler,
        image=IMAGE, strength=0.5,
    )  # fmt: skip
    got = pipes()(
        PROMPT, num_inference_steps=STEPS, scheduler=scheduler, noise=noise, image=IMAGE,
        strength=0.5, posterior="mean",
    )[0]  # fmt: skip
    diff = _max_diff(got, want)
    print(f"[img2img] {scheduler} max |ours - diffusers| = {diff} / 255")
    assert diff <= 1.0


@pytest.mark.parametrize("unet", [None, "inpaint"], ids=["4ch", "9ch"])
def test_inpaint_equals_diffusers(tiny_sdxl, inpaint_root, pipes, monkeypatch, unet):
    noise = _noise()
    root = tiny_sdxl.root if unet is None else inpaint_root
    want = _diffusers(
        "StableDiffusionXLInpaintPipeline", root, monkeypatch, noise,
        image=IMAGE, mask_image=MASK, height=SIZE, width=SIZE, guidance_scale=5.0,
    )  # fmt: skip  # default strength 0.9999: the first of the 6 steps is skipped
    got = pipes(unet)(
        PROMPT, num_inference_steps=STEPS, noise=noise, image=IMAGE, mask_image=MASK,
        posterior="mean",
    )[0]  # fmt: skip
    diff = _max_diff(got, want)
    print(f"[inpaint] {unet or '4ch'} max |ours - diffusers| = {diff} / 255")
    assert diff <= 1.0


@pytest.mark.parametrize("n", [2, 4, 8])
def test_encode_on_bands_equals_one_device(pipes, n):
    from distrifusion_jax.io.images import image_to_array

    x = np.stack([image_to_array(IMAGE, SIZE, SIZE), image_to_array(MASK, SIZE, SIZE)])
    mean1, logvar1 = pipes().encode_image(x)
    mean, logvar = pipes(patches=n, mode="full_sync").encode_image(x)
    err = max(np.abs(mean - mean1).max(), np.abs(logvar - logvar1).max())
    print(f"[encode] n={n} max |bands - one device| = {err:.2e}")
    # as the decoder's band test (tests/models/test_vae.py): summation order differs per band
    np.testing.assert_allclose(mean, mean1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logvar, logvar1, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "unet,kw",
    [
        (None, dict(patches=2)),
        (None, dict(patches=4, cfg_split=True)),
        ("inpaint", dict(patches=4)),
    ],
    ids=["4ch-n2", "4ch-n4-cfg", "9ch-n4"],
)
def test_full_sync_equals_one_device(pipes, unet, kw):
    """img2img (jit driver) and inpainting (step driver) on the mesh = one device."""
    call = dict(prompt=PROMPT, num_inference_steps=STEPS, seed=3, image=IMAGE, strength=0.7)
    for extra in ({}, dict(mask_image=MASK, progress=iter)):
        if unet == "inpaint" and not extra:
            continue  # img2img needs a 4-channel UNet
        one = np.asarray(pipes(unet).generate_latents(**call, **extra))
        many = np.asarray(pipes(unet, mode="full_sync", **kw).generate_latents(**call, **extra))
        err = np.abs(many - one).max()
        print(f"[full_sync] {unet or '4ch'} {kw} {sorted(extra)}: max err {err:.2e}")
        assert err <= 1e-4 * max(1.0, np.abs(one).max())


def test_displaced_img2img_runs_and_first_step_is_sync(pipes):
    """Displaced patch parallelism from a skipped start (first step run synchronous)."""
    call = dict(num_inference_steps=STEPS, seed=3, image=IMAGE, strength=0.5)
    one = np.asarray(pipes().generate_latents(PROMPT, **call))
    many = np.asarray(pipes(patches=4, warmup_steps=0).generate_latents(PROMPT, **call))
    assert np.isfinite(many).all()
    assert np.abs(many - one).max() < 0.5 * np.abs(one).max()


@pytest.mark.parametrize("mode", ["naive_patch", "no_sync", "full_sync"])
def test_inpaint_nine_channels_every_mode(pipes, mode):
    """The 9-channel UNet's extra input is split with the latents in every mode (step driver)."""
    call = dict(num_inference_steps=4, seed=3, image=IMAGE, mask_image=MASK, progress=iter)
    one = np.asarray(pipes("inpaint").generate_latents(PROMPT, **call))
    pc = dict(patches=2, mode=mode, warmup_steps=1)
    many = np.asarray(pipes("inpaint", **pc).generate_latents(PROMPT, **call))
    assert np.isfinite(many).all()
    if mode == "full_sync":
        assert np.abs(many - one).max() < 1e-4 * np.abs(one).max()
    else:  # approximate modes on random weights: only roughly the same latents
        rms = lambda a: np.sqrt(np.mean(a**2))
        assert rms(many - one) < 0.5 * rms(one), (rms(many - one), rms(one))


def test_posterior_sample_is_seeded(pipes):
    call = dict(num_inference_steps=2, image=IMAGE, strength=0.5)
    a = np.asarray(pipes().generate_latents(PROMPT, seed=1, **call))
    b = np.asarray(pipes().generate_latents(PROMPT, seed=1, **call))
    c = np.asarray(pipes().generate_latents(PROMPT, seed=1, posterior="mean", **call))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mask_image=MASK), "mask_image needs image"),
        (dict(image=IMAGE, strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(image=IMAGE, strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(image=IMAGE, strength=0.1), "runs no step"),
        (dict(image=IMAGE, mask_image=MASK.resize((32, 64))), "mask size 32x64 differs"),
        (dict(strength=0.5), "strength needs image"),
        (dict(image=IMAGE, posterior="mode"), "posterior must be"),
    ],
)
def test_bad_inputs_one_line(pipes, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        pipes()(PROMPT, num_inference_steps=STEPS, **kw)
    assert "\n" not in str(e.value)


def test_nine_channel_unet_needs_a_mask(pipes):
    with pytest.raises(ValueError, match="which needs mask_image"):
        pipes("inpaint")(PROMPT, num_inference_steps=STEPS, image=IMAGE)


def test_start_step_as_diffusers():
    from distrifusion_jax.sampling.sample import start_step

    assert start_step(50, 0.3) == 35
    assert start_step(50, 0.9999) == 1
    assert start_step(6, 1.0) == 0
    assert jax.device_count() == 8


@pytest.mark.slow
def test_cli_inpaint_writes_png_with_metadata(tiny_sdxl, tmp_path):
    from distrifusion_jax.cli import generate

    IMAGE.save(tmp_path / "in.png")
    MASK.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    rc = generate.main(
        ["--model", str(tiny_sdxl.root), "--output", str(out), "--steps", "3",
         "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
         "--strength", "0.7", "--patches", "2"]
    )  # fmt: skip
    assert rc == 0
    meta = Image.open(out).text
    assert meta["image"].endswith("in.png") and meta["mask"].endswith("mask.png")
    assert meta["strength"] == "0.7"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--mask", "{mask}"], "--mask needs --image"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--image", "{image}", "--strength", "0"], "--strength must be in (0, 1]"),
        (["--image", "{image}", "--strength", "1.2"], "--strength must be in (0, 1]"),
        (["--image", "{image}", "--mask", "{small}"], "--mask is 32x32 but --image is 64x64"),
        (["--image", "{tmp}/none.png"], "does not exist"),
    ],
)
def test_cli_bad_image_inputs(tiny_sdxl, tmp_path, capsys, extra, message):
    from distrifusion_jax.cli import generate

    IMAGE.save(tmp_path / "in.png")
    MASK.save(tmp_path / "mask.png")
    MASK.resize((32, 32)).save(tmp_path / "small.png")
    names = dict(image=tmp_path / "in.png", mask=tmp_path / "mask.png")
    names.update(small=tmp_path / "small.png", tmp=tmp_path)
    out = tmp_path / "out.png"
    argv = ["--model", str(tiny_sdxl.root), "--output", str(out)]
    rc = generate.main(argv + [a.format(**names) for a in extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()
