"""tiny/check.py: the clean-image numbers on hand-made images (no model)."""

import numpy as np

from distrifusion_jax.tiny.check import LIMITS, image_stats, summarize


def _clean(n: int = 2, size: int = 64) -> np.ndarray:
    """Gray squares on a black frame: `[n, size, size, 3]` uint8, every metric 0."""
    x = np.zeros((n, size, size, 3), np.uint8)
    b = size // 16
    x[:, b + 3 : size - b - 3, b + 3 : size - b - 3] = 200
    return x


def test_clean_images_are_zero():
    for size in (32, 64):
        stats = image_stats(_clean(size=size))
        for name, v in stats.items():
            np.testing.assert_array_equal(v, 0.0, err_msg=name)
        assert summarize(_clean(size=size))["pass"]


def test_each_defect_is_caught_in_its_image():
    x = _clean(3)
    x[0, 30, 30] = (255, 200, 200)  # one colour pixel: spread 55
    x[1, :4] = 60  # a grey top frame
    x[2, 63, 63] = 90  # a bright bottom-right corner, neighbours black
    s = image_stats(x)
    assert s["spread"].tolist() == [55.0, 0.0, 0.0]
    # gray 218.33: |RGB - gray| = 36.67, 18.33, 18.33 at one of 4096 pixels
    np.testing.assert_allclose(s["gray_dev"][0], (110 / 3) * 2 / 3 / 64**2, rtol=1e-5)
    assert s["border"][1] == 60 * 4 * 64 / (64**2 - 56**2) and s["border"][0] == 0
    assert s["corner_excess"].tolist() == [0.0, 0.0, 90.0]  # image 1: corner = neighbours
    out = summarize(x.reshape(1, 3, 64, 64, 3), np.array([1.0]))
    assert not out["pass"]
    assert out["spread"]["images_over"] == 1 and out["spread"]["limit"] == LIMITS["spread"]
    assert out["border"]["images_over"] == 1 and out["corner_excess"]["images_over"] == 1
    assert out["accuracy"]["mean"] == 1.0


def test_accuracy_under_the_bar_fails():
    out = summarize(_clean(2).reshape(2, 1, 64, 64, 3), np.array([1.0, 0.6]))
    assert out["accuracy"]["mean"] == 0.8 and not out["pass"]
