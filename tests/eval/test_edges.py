"""Edge maps and edge F1 (`eval/edges.py`): the ControlNet study's metric."""

import numpy as np
import pytest

from distrifusion_jax.eval.edges import canny_edges, edge_f1, edge_image, edge_scores

pytest.importorskip("skimage")


def square(size: int = 32, lo: int = 8, hi: int = 24) -> np.ndarray:
    """A white square on black, `[size, size]` in [0, 1]."""
    img = np.zeros((size, size))
    img[lo:hi, lo:hi] = 1.0
    return img


def test_canny_finds_the_square_outline_at_any_input_size():
    for scale in (1, 2, 4):  # 32, 64, 128 px inputs, pooled to 32
        img = np.kron(square(), np.ones((scale, scale)))
        rgb = np.repeat((img * 255).astype(np.uint8)[None, ..., None], 3, axis=-1)
        e = canny_edges(rgb)[0]
        assert e.shape == (32, 32)
        rows, cols = np.nonzero(e)
        # every edge pixel lies within 1 px of the square's border, and all four sides are hit
        border = (np.minimum(abs(rows - 8), abs(rows - 23)) <= 1) | (
            np.minimum(abs(cols - 8), abs(cols - 23)) <= 1
        )
        assert border.all() and e.sum() >= 4 * 12
        assert e[:6].sum() == 0 and e[26:].sum() == 0


def test_edge_f1_exact_shifted_and_disjoint():
    a = np.zeros((1, 32, 32), bool)
    a[0, 10, 5:25] = True  # a horizontal line
    shifted = np.roll(a, 1, axis=1)
    far = np.roll(a, 10, axis=1)
    assert edge_f1(a, a, 0)["f1"][0] == 1.0
    assert edge_f1(shifted, a, 0)["f1"][0] == 0.0
    assert edge_f1(shifted, a, 1)["f1"][0] == 1.0
    assert edge_f1(far, a, 1)["f1"][0] == 0.0
    half = a.copy()
    half[0, 10, 15:] = False  # half the line: precision 1, recall 10/20
    s = edge_f1(half, a, 0)
    assert s["precision"][0] == 1.0 and s["recall"][0] == 0.5
    assert s["f1"][0] == pytest.approx(2 / 3)
    assert edge_f1(np.zeros_like(a), a, 1)["f1"][0] == 0.0  # nothing drawn


def test_edge_image_and_scores_round_trip():
    e = canny_edges(square()[None])
    img = edge_image(e, 64)
    assert img.shape == (1, 64, 64, 3) and img.dtype == np.uint8
    assert set(np.unique(img)) == {0, 255}
    # the same square drawn at 64 px has exactly these edges
    sq = np.repeat((square(64, 16, 48) * 255).astype(np.uint8)[None, ..., None], 3, axis=-1)
    s = edge_scores(sq, e)
    assert s["f1_tol0"] == 1.0 and s["f1_tol1"] == 1.0
    blank = np.zeros_like(sq)
    assert edge_scores(blank, e)["f1_tol1"] == 0.0
