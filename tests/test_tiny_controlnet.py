"""The shipped Canny ControlNet (distrifusion_jax/assets/tiny-sdxl-controlnet-canny): it loads
as the base model's ControlNet, `generate.py --controlnet` runs it out of the box, and it
controls: generated images follow the conditioning edges better than without it. Its recipe's
init is exact: at step 0 the controlled UNet is the UNet.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from distrifusion_jax.cli import generate
from distrifusion_jax.io import checkpoint
from distrifusion_jax.tiny import CONTROLNET_DIR, MODEL_DIR
from distrifusion_jax.tiny.controlnet import EXAMPLE_EDGES, controlnet_config_json
from distrifusion_jax.tiny.fashion_mnist import DATA, PROMPTS

pytest.importorskip("skimage")
EXAMPLE = CONTROLNET_DIR / EXAMPLE_EDGES
RES = json.loads((MODEL_DIR / "training.json").read_text())["resolution"]
# about half the measured edge-F1 gain (0.145 on the 10 pairs below; 0.12 on the study's 20)
MIN_F1_GAIN = 0.07


def test_shipped_controlnet_loads_for_the_base_model():
    cn, params = checkpoint.load_component(CONTROLNET_DIR, "controlnet")
    assert json.loads((CONTROLNET_DIR / "config.json").read_text()) == controlnet_config_json()
    vae, _ = checkpoint.load_component(MODEL_DIR, "vae")
    unet, _ = checkpoint.load_component(MODEL_DIR, "unet")
    assert cn.config.conditioning_factor == vae.config.downsample_factor
    assert cn.config.block_out_channels == unet.config.block_out_channels
    zero = params["controlnet_mid_block"]["kernel"]
    assert np.abs(np.asarray(zero)).max() > 0  # trained: the zero convs moved
    size = sum(f.stat().st_size for f in CONTROLNET_DIR.rglob("*") if f.is_file())
    assert size <= 10e6, f"{CONTROLNET_DIR} is {size / 1e6:.1f} MB"
    from PIL import Image

    edges = np.asarray(Image.open(EXAMPLE))
    assert edges.shape == (RES, RES, 3) and set(np.unique(edges)) <= {0, 255}


def test_init_from_unet_is_the_unet():
    """Trunk copied, zero convs zero: the controlled UNet's output equals the UNet's exactly."""
    import jax
    import jax.numpy as jnp

    from distrifusion_jax.models.controlled_unet import ControlledUNet, controlled_params
    from distrifusion_jax.models.controlnet import ControlNetModel
    from distrifusion_jax.models.controlnet_config import ControlNetConfig
    from distrifusion_jax.tiny.controlnet import CONTROLNET_CONFIG, init_from_unet

    unet, up = checkpoint.load_component(MODEL_DIR, "unet")
    cn = ControlNetModel(ControlNetConfig.from_diffusers(CONTROLNET_CONFIG))
    p = init_from_unet(cn, up, seed=3)
    assert np.array_equal(p["down_blocks_1"]["resnets_0"]["conv1"]["kernel"],
                          up["down_blocks_1"]["resnets_0"]["conv1"]["kernel"])  # fmt: skip
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 16, 16, 4))
    ctx = jax.random.normal(k[1], (2, 77, unet.config.cross_attention_dims[0]))
    added = {"text_embeds": jnp.ones((2, 32)), "time_ids": jnp.full((2, 6), 64.0)}
    image = jax.random.uniform(k[2], (2, 32, 32, 3))
    model = ControlledUNet(unet.config, (cn.config,))
    control = {"images": (image,), "scales": jnp.ones((2, 1))}
    t = jnp.array([10.0, 900.0])
    got = model.apply({"params": controlled_params(up, [p])}, x, t, ctx, added, control)
    want = unet.apply({"params": up}, x, t, ctx, added)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_generate_with_the_shipped_controlnet(tmp_path):
    """`generate.py --controlnet <shipped> --control-image <its example>` (the default prompt is
    the example's class): a PNG that records the ControlNet and differs from the same seed
    without it. (One image says little about control: the test below measures that.)"""
    from PIL import Image

    out_c, out_p = tmp_path / "cn.png", tmp_path / "plain.png"
    common = ["--steps", "20", "--seed", "3"]
    control = ["--controlnet", str(CONTROLNET_DIR), "--control-image", str(EXAMPLE)]
    assert generate.main([*common, *control, "--output", str(out_c)]) == 0
    assert generate.main([*common, "--output", str(out_p)]) == 0
    assert str(CONTROLNET_DIR) in json.dumps(Image.open(out_c).text)
    a, b = (np.asarray(Image.open(p), np.float32) for p in (out_c, out_p))
    assert a.shape == (RES, RES, 3) and a.std() > 20
    assert np.abs(a - b).mean() > 2.0  # the residuals change the image


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_controlnet_follows_edges_of_unseen_images():
    """Edges of 10 test images (one per class, prompt of that class): mean edge F1 with the
    ControlNet beats the same prompts and seeds without it."""
    from distrifusion_jax.eval.edges import canny_edges, edge_image
    from distrifusion_jax.eval.quality import generate as study_generate
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.tiny.fashion_mnist import class_test_images

    pairs = [(p, 5) for p in PROMPTS]  # test image 5 of each class: not in the study's 0, 1
    edges = canny_edges(class_test_images([(k, 5) for k in range(len(PROMPTS))], RES))
    kw = dict(steps=20, scheduler="ddim", guidance=5.0)
    one = ParallelConfig(patches=1)
    plain, *_ = study_generate(str(MODEL_DIR), one, pairs, **kw)
    ctl, *_ = study_generate(
        str(MODEL_DIR), one, pairs, **kw, control=(str(CONTROLNET_DIR), edge_image(edges, RES))
    )
    from distrifusion_jax.eval.edges import edge_scores

    with_cn, without = edge_scores(ctl, edges), edge_scores(plain, edges)
    # measured: with 0.816, without 0.671 (tolerance 1 px at 32 px)
    print(f"edge F1 tol 1: with {with_cn['f1_tol1']:.3f}, without {without['f1_tol1']:.3f}")
    assert with_cn["f1_tol1"] > without["f1_tol1"] + MIN_F1_GAIN


def test_study_counts_the_controlnets_exchange():
    """quality.py's bytes column: a ControlNet's halos and K,V on top of the UNet's."""
    from distrifusion_jax.eval.quality import exchanged_bytes
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    pipe = DistriSDXLPipeline.from_pretrained(MODEL_DIR, parallel=ParallelConfig(patches=2))
    plain = exchanged_bytes(pipe, RES, RES)
    pipe.load_controlnets([CONTROLNET_DIR])
    with_cn = exchanged_bytes(pipe, RES, RES)
    # the ControlNet is the UNet's encoder and mid block: more than a third again, less than 2x
    assert plain * 1.3 < with_cn < 2 * plain
