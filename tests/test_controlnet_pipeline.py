"""End to end with ControlNets on the tiny diffusers SDXL folder: our pipeline equals diffusers'
`StableDiffusionXLControlNetPipeline` on the same initial noise (one ControlNet; two with their
own images, scales and guidance windows; guess mode), within the uint8 rounding (1/255);
full_sync on 4 devices gives the single-device image; displaced stays close."""

import numpy as np
import pytest
from PIL import Image

from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.pipeline import DistriSDXLPipeline
from tests.controlnet_fixtures import TINY_SDXL_CONTROLNET_CONFIG, tiny_torch_controlnet

PROMPT = "a photo of a red sneaker"
STEPS = 6
SIZE = 64  # the tiny folder's default (sample_size 32 x VAE factor 2)


@pytest.fixture(scope="module")
def controlnets(tiny_sdxl, tmp_path_factory):
    """Two tiny random ControlNet folders (diffusers `save_pretrained`) and their torch models."""
    root = tmp_path_factory.mktemp("controlnets")
    nets = []
    for seed in (10, 11):
        tm = tiny_torch_controlnet(TINY_SDXL_CONTROLNET_CONFIG, seed)
        tm.save_pretrained(root / f"cn{seed}")
        nets.append((root / f"cn{seed}", tm))
    return nets


@pytest.fixture(scope="module")
def control_images():
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2)
    ]


@pytest.fixture(scope="module")
def pipes(tiny_sdxl, controlnets):
    """`pipes(k, **parallel_kw)`: the pipeline with the first k ControlNets, loaded once."""
    loaded = {}

    def get(k=1, **kw):
        key = (k, tuple(sorted(kw.items())))
        if key not in loaded:
            pipe = DistriSDXLPipeline.from_pretrained(tiny_sdxl.root, parallel=ParallelConfig(**kw))
            pipe.load_controlnets([path for path, _ in controlnets[:k]])
            loaded[key] = pipe
        return loaded[key]

    return get


def _diffusers_image(tiny_sdxl, controlnets, k, images, noise, **kw):
    import torch
    from diffusers import MultiControlNetModel, StableDiffusionXLControlNetPipeline

    nets = [tm for _, tm in controlnets[:k]]
    base = StableDiffusionXLControlNetPipeline.from_pretrained(
        str(tiny_sdxl.root), controlnet=nets[0] if k == 1 else MultiControlNetModel(nets),
        add_watermarker=False,
    )  # fmt: skip
    with torch.no_grad():
        out = base(
            PROMPT, image=images[0] if k == 1 else images[:k], height=SIZE, width=SIZE,
            num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
            latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), **kw,
        )  # fmt: skip
    return out.images[0]


CASES = {
    "one": (1, dict(controlnet_conditioning_scale=0.7)),
    "two": (
        2,
        dict(
            controlnet_conditioning_scale=[0.6, 0.9],
            control_guidance_start=[0.0, 0.3],
            control_guidance_end=[0.8, 1.0],
        ),
    ),
    "guess": (1, dict(guess_mode=True, controlnet_conditioning_scale=0.9)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_image_equals_diffusers_controlnet_pipeline(tiny_sdxl, controlnets, control_images,
                                                    pipes, case):  # fmt: skip
    k, kw = CASES[case]
    noise = np.random.default_rng(0).standard_normal((1, 32, 32, 4)).astype(np.float32)
    want = _diffusers_image(tiny_sdxl, controlnets, k, control_images, noise, **kw)
    images = control_images[0] if k == 1 else control_images[:k]
    got = pipes(k)(PROMPT, num_inference_steps=STEPS, noise=noise, control_image=images, **kw)[0]
    diff = np.abs(np.asarray(got, np.float64) - np.round(want * 255))
    print(f"[controlnet pipeline] {case}: max |ours - diffusers| = {diff.max():.0f}/255")
    assert diff.max() <= 1.0, diff.max()  # uint8 rounding only
    # The ControlNets matter: the image without them differs.
    plain = pipes(k)(
        PROMPT, num_inference_steps=STEPS, noise=noise, control_image=images,
        **dict(kw, controlnet_conditioning_scale=0.0),
    )[0]  # fmt: skip
    assert np.abs(np.asarray(plain, np.float64) - np.asarray(got, np.float64)).max() > 2


def _psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse) if mse else float("inf")


def test_patch_parallel_images(pipes, control_images):
    """full_sync on 4 bands (and 2 x CFG split) = one device (<= 1/255); displaced close."""
    kw = dict(num_inference_steps=STEPS, seed=1, control_image=control_images[:2],
              controlnet_conditioning_scale=[0.8, 0.6])  # fmt: skip
    single = np.asarray(pipes(2)(PROMPT, **kw)[0], np.float64)
    for pk in (dict(patches=4), dict(patches=2, cfg_split=True)):
        img = np.asarray(pipes(2, mode="full_sync", **pk)(PROMPT, **kw)[0], np.float64)
        print(f"[controlnet pipeline] full_sync {pk}: max diff {np.abs(img - single).max():.0f}")
        assert np.abs(img - single).max() <= 1.0
    img = pipes(2, patches=4, warmup_steps=1)(PROMPT, **kw)[0]
    value = _psnr(img, single)
    print(f"[controlnet pipeline] corrected_async_gn n=4 w=1 PSNR vs 1 device: {value:.1f} dB")
    assert value >= 30


def test_errors(pipes, control_images):
    pipe = pipes(2)
    with pytest.raises(ValueError, match="control_image"):
        pipe(PROMPT, num_inference_steps=2)
    with pytest.raises(ValueError, match="1 control images for 2 ControlNets"):
        pipe(PROMPT, num_inference_steps=2, control_image=control_images[0])
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        pipe(PROMPT, num_inference_steps=2, control_image=control_images,
             controlnet_conditioning_scale=[1.0, 1.0, 1.0])  # fmt: skip
    with pytest.raises(ValueError, match="start"):
        pipe(PROMPT, num_inference_steps=2, control_image=control_images,
             control_guidance_start=0.9, control_guidance_end=0.5)  # fmt: skip


# ---- generate.py ---------------------------------------------------------------------------


def test_cli_writes_png_with_controlnet_metadata(tiny_sdxl, controlnets, control_images,
                                                 tmp_path):  # fmt: skip
    import json

    from distrifusion_jax.cli import generate

    paths = []
    for i, im in enumerate(control_images):
        paths.append(tmp_path / f"c{i}.png")
        im.save(paths[-1])
    out = tmp_path / "img.png"
    (a, _), (b, _) = controlnets
    rc = generate.main([
        "--model", str(tiny_sdxl.root), "--output", str(out), "--steps", "1", "--patches", "2",
        "--controlnet", f"{a}:0.7", "--control-image", str(paths[0]),
        "--controlnet", str(b), "--control-image", str(paths[1]),
        "--control-start", "0.0", "--control-start", "0.3", "--control-end", "0.9",
    ])  # fmt: skip
    assert rc == 0
    meta = json.loads(Image.open(out).text["controlnets"])
    assert [(m["path"], m["scale"], m["start"], m["end"]) for m in meta] == [
        (str(a), 0.7, 0.0, 0.9), (str(b), 1.0, 0.3, 0.9)
    ]  # fmt: skip
    assert meta[0]["image"] == str(paths[0])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--control-image", "x.png"], "need(s) --controlnet"),
        (["--controlnet", "/nonexistent/cn"], "does not exist"),
        (["--controlnet", "{cn}"], "0 --control-image for 1 --controlnet"),
        (["--controlnet", "{cn}", "--control-image", "{img}", "--control-end", "0.2",
          "--control-start", "0.5"], "--control-start 0.5 and --control-end 0.2"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)  # fmt: skip
def test_cli_bad_control_input(tiny_sdxl, controlnets, tmp_path, capsys, extra, message):
    from distrifusion_jax.cli import generate

    img = tmp_path / "c.png"
    Image.new("RGB", (64, 64)).save(img)
    extra = [e.format(cn=controlnets[0][0], img=img) for e in extra]
    out = tmp_path / "out.png"
    rc = generate.main(["--model", str(tiny_sdxl.root), "--output", str(out), "--steps", "2",
                        *extra])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and message in err[0], err
    assert not out.exists()
