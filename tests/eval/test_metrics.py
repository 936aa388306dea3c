"""eval/metrics.py: PSNR of known arrays, summaries, and the numpy-only unpickler."""

import io
import os
import pickle

import numpy as np
import pytest

from distrifusion_jax.eval.metrics import NumpyOnlyUnpickler, load_numpy_pickle, psnr, summarize


def test_psnr_known_values():
    ref = np.zeros((4, 4, 3), np.uint8)
    assert psnr(ref, ref) is None  # identical: no finite PSNR
    img = ref.copy()
    img[0, 0, 0] = 255  # mse = 255^2 / 48 -> PSNR = 10 log10(48)
    assert psnr(ref, img) == pytest.approx(10 * np.log10(48.0), abs=1e-12)
    assert psnr(ref, np.full_like(ref, 255)) == pytest.approx(0.0, abs=1e-12)


def test_psnr_matches_scikit_image():
    skimage = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    want = skimage.peak_signal_noise_ratio(a, b, data_range=255)
    assert psnr(a, b) == pytest.approx(want, rel=1e-12)


def test_summarize_skips_identical_images():
    ref = np.zeros((2, 4, 4, 3), np.uint8)
    img = ref.copy()
    img[1, 0, 0, 0] = 3
    per = {"psnr": [None, 40.0], "ssim": [1.0, 0.5], "lpips": [0.0, 0.2]}
    s = summarize(per, ref, img)
    assert s["n_identical"] == 1 and s["psnr_mean"] == 40.0 and s["psnr_std"] == 0.0
    assert s["max_abs_diff"] == 3
    assert s["ssim_mean"] == 0.75 and s["lpips_mean"] == pytest.approx(0.1)


def test_unpickler_loads_numpy_arrays(tmp_path):
    tree = {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [np.ones(2)]}
    path = tmp_path / "w.ckpt"
    path.write_bytes(pickle.dumps(tree))
    out = load_numpy_pickle(path)
    np.testing.assert_array_equal(out["conv"]["kernel"], tree["conv"]["kernel"])
    np.testing.assert_array_equal(out["b"][0], np.ones(2))


def test_unpickler_refuses_other_globals():
    payload = pickle.dumps(os.getcwd)  # any callable outside numpy's array reconstruction
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()
