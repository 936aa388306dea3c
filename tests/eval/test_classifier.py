"""eval/classifier.py: save/load keeps every parameter; images reach the net as gray."""

import jax
import numpy as np

from distrifusion_jax.eval.classifier import (
    Classifier,
    classify,
    classify_images,
    load_classifier,
    pool_to_32,
    save_classifier,
    to_gray,
)


def test_save_load_round_trip(tmp_path):
    params = Classifier().init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32))["params"]
    path = tmp_path / "classifier.npz"
    save_classifier(path, params)
    loaded = load_classifier(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
    np.testing.assert_array_equal(classify(loaded, x), classify(params, x))


def test_to_gray():
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    gray = to_gray(rgb)  # uint8 -> [-1, 1], then the channel mean
    assert gray.shape == (2, 4, 4, 1)
    np.testing.assert_allclose(gray, (1.0 - 1.0 - 1.0) / 3)
    np.testing.assert_allclose(to_gray(np.ones((1, 2, 2, 3), np.float32)), 1.0)


def test_upscaled_images_pool_back_to_32():
    # The shipped model's 64 px images are 2x nearest-upscaled 32 px ones: pooling undoes it.
    from distrifusion_jax.tiny.fashion_mnist import upscale

    params = Classifier().init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32))["params"]
    x = np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 1)).astype(np.float32)
    np.testing.assert_array_equal(pool_to_32(upscale(x, 2)), x)
    np.testing.assert_array_equal(classify(params, upscale(x, 2)), classify(params, x))
    rgb = np.zeros((2, 48, 48, 3), np.uint8)
    assert classify_images(params, rgb) is None  # not 32k pixels
    assert classify_images(params, np.zeros((2, 64, 64, 3), np.uint8)).shape == (2,)
