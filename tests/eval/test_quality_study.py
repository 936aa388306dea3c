"""The quality study's configurations, img2img inputs and bytes plot (no sampling: quick)."""

import json

import numpy as np
import pytest

from distrifusion_jax.eval.quality import (
    CODECS,
    STRENGTH,
    config_row,
    default_configs,
    fixed_pairs,
)
from distrifusion_jax.tiny.fashion_mnist import DATA, PROMPTS, class_test_images


@pytest.mark.parametrize("n_max", [2, 4, 8])
def test_configs_cover_codecs_and_img2img(n_max):
    cfgs = {c.name: c for c in default_configs(n_max)}
    assert len(cfgs) == len(default_configs(n_max))  # names are unique
    for codec in CODECS:  # every codec at the largest n, with the displaced mode it codes
        c = cfgs[f"{codec}-n{n_max}"]
        assert c.parallel().compress == codec and c.mode == "corrected_async_gn"
    i2i = [c for c in cfgs.values() if c.task == "img2img"]
    assert sorted(c.n for c in i2i) == [n for n in (2, 4, 8) if n <= n_max]
    assert all(c.parallel().compress is None for c in i2i)
    assert 0 < STRENGTH <= 1


@pytest.mark.skipif(not DATA.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_img2img_inputs_are_the_prompted_class():
    pairs = fixed_pairs(PROMPTS[:3], (0, 2))
    img = class_test_images([(PROMPTS.index(p), s) for p, s in pairs], 64)
    assert img.shape == (6, 64, 64, 3) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0], img[..., 2])  # gray
    assert img[:, :4].max() == 0 and img[:, :, -4:].max() == 0  # the black padding frame
    assert not np.array_equal(img[0], img[1])  # seed s: the class's s-th test image


def test_bytes_plot_and_row(tmp_path):
    pytest.importorskip("matplotlib")
    from distrifusion_jax.eval.plots import plot_quality

    cfgs = [c for c in default_configs(2) if "compress" in c.groups or c.name == "corrected-n2"]
    per = {"psnr": [30.0, None], "ssim": [0.9, 1.0], "lpips": [0.05, 0.0]}
    summary = {"psnr_mean": 30.0, "psnr_std": 0.0, "n_identical": 1, "ssim_mean": 0.95,
               "ssim_std": 0.05, "lpips_mean": 0.025, "lpips_std": 0.025, "max_abs_diff": 9}  # fmt: skip
    rows = [
        config_row(c, per, summary, None, None, np.zeros(2), 1.0, 1e6 / (k + 1))
        for k, c in enumerate(cfgs)
    ]
    assert rows[1]["compress"] == cfgs[1].compress and rows[1]["task"] == "txt2img"
    assert rows[1]["exchanged_bytes_per_step"] == 5e5
    result = {"configs": rows, "height": 64, "width": 64, "steps": 2, "scheduler": "ddim",
              "guidance_scale": 5.0, "pairs": [{"prompt": "p", "seed": 0}] * 2}  # fmt: skip
    json.dumps(result)  # quality.json stays plain JSON
    ref = np.zeros((2, 8, 8, 3), np.uint8)
    written = plot_quality(result, {}, ref, tmp_path, [0])
    assert "quality_vs_bytes.png" in written and (tmp_path / "quality_vs_bytes.png").stat().st_size


def test_exchanged_bytes_by_mode_and_codec(tiny_sdxl):
    """The study's bytes column: 0 on one device and for naive patches (any split), the
    displaced step's count otherwise, smaller with a codec."""
    from distrifusion_jax.eval.quality import exchanged_bytes
    from distrifusion_jax.parallel import ParallelConfig
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    def bytes_of(**kw):
        pipe = DistriSDXLPipeline.from_pretrained(tiny_sdxl.root, parallel=ParallelConfig(**kw))
        return exchanged_bytes(pipe, 64, 64)

    assert bytes_of(patches=1) == 0.0
    assert bytes_of(patches=2, mode="naive_patch", naive_split="alternate") == 0.0
    plain, coded = bytes_of(patches=2), bytes_of(patches=2, compress="int8")
    assert plain > coded > 0


@pytest.mark.parametrize("n_max", [2, 8])
def test_controlnet_rows(n_max):
    rows = [c for c in default_configs(n_max) if c.task == "controlnet"]
    assert sorted(c.n for c in rows) == [n for n in (2, 4, 8) if n <= n_max]
    assert all(c.mode == "corrected_async_gn" and "controlnet" in c.groups for c in rows)


def test_control_reference_and_edge_table(capsys):
    """The ControlNet reference scores its images and the plain ones against the same edges."""
    pytest.importorskip("skimage")
    from distrifusion_jax.eval.edges import canny_edges, edge_image
    from distrifusion_jax.eval.quality import control_reference, print_edge_table

    square = np.zeros((2, 64, 64, 3), np.uint8)
    square[:, 16:48, 16:48] = 255
    edges = canny_edges(square)
    blank = np.zeros_like(square)
    refs = {"controlnet": (square, None, 1.0), "txt2img": (blank, None, 1.0)}
    ref = control_reference("cn", refs, edges, np.zeros(2))
    assert ref["edge_f1"]["f1_tol0"] == 1.0
    assert ref["edge_f1_without_controlnet"]["f1_tol1"] == 0.0
    assert edge_image(edges, 64).shape == square.shape
    json.dumps(ref)
    row = {"name": "controlnet-corrected-n2", "edge_f1": ref["edge_f1"]}
    print_edge_table(ref, [row])
    out = capsys.readouterr().out
    assert "without ControlNet" in out and "controlnet-corrected-n2" in out
