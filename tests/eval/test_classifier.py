"""eval/classifier.py: save/load keeps every parameter; images reach the net as gray."""

import jax
import numpy as np

from distrifusion_jax.eval.classifier import (
    Classifier,
    classify,
    load_classifier,
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
