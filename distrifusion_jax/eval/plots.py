"""Plots of the quality study (`quality.json`) and of the benchmarks (matplotlib, `bench` extra).

Each function writes PNG files; `plot_quality` returns the names of those it wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distrifusion_jax.eval.quality import PCPP, STRENGTH


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sdxl(rows: list[dict], path: Path) -> None:
    """FLOPs per device vs n (with 1/n) and projected vs measured speedup, per resolution."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for res in sorted({r["resolution"] for r in rows}):
        rs = [r for r in rows if r["resolution"] == res]
        ns = [r["n"] for r in rs]
        ax1.plot(ns, [r["flops_ratio_vs_1"] for r in rs], "o-", label=f"{res}^2")
        proj = [r.get("projected_speedup_displaced") for r in rs]
        line = ax2.plot(ns, proj, "o-", label=f"{res}^2 projected (upper bound)")[0]
        paper = [(r["n"], r["paper_speedup"]) for r in rs if r.get("paper_speedup")]
        if paper:
            ax2.plot(
                [1] + [p[0] for p in paper],
                [1] + [p[1] for p in paper],
                "s--",
                color=line.get_color(),
                label=f"{res}^2 paper (measured)",
            )
    ns = sorted({r["n"] for r in rows})
    ax1.plot(ns, [1 / n for n in ns], "k:", label="ideal 1/n")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="devices n",
        ylabel="FLOPs per device / 1 device",
        title="SDXL step FLOPs per device (XLA cost analysis)",
    )
    ax2.plot(ns, ns, "k:", label="linear")
    ax2.set(
        xlabel="devices n", ylabel="speedup vs 1 A100", title="SDXL on A100s: projection vs paper"
    )
    for ax in (ax1, ax2):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_model(res: dict, path: Path) -> None:
    """Step latency and speedup vs n (model mode)."""
    plt = _pyplot()
    rows = res["rows"]
    ns = [r["n"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(ns, [r["median_step_seconds"] * 1e3 for r in rows], "o-", label="median step")
    ax1.set(xlabel="devices n", ylabel="ms per step", title="step latency")
    ax2.plot(ns, [r["speedup_vs_1"] for r in rows], "o-", label="measured")
    ax2.plot(ns, [1 / r["flops_ratio_vs_1"] for r in rows], "s--", label="1 / FLOPs ratio")
    ax2.set(xlabel="devices n", ylabel="speedup vs n = 1", title="speedup")
    for ax in (ax1, ax2):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(res['model']).name}: {res['device_note']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(res: dict, path: Path) -> None:
    """Median displaced step per run and speedup vs 1 process (scaling mode)."""
    plt = _pyplot()
    runs = res["runs"]
    names = [r["name"].replace("2 processes, n=2, ", "2 proc: ") for r in runs]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.bar(range(len(runs)), [r["median_step_s"] for r in runs], color="tab:blue")
    for b, r in zip(bars, runs):
        ax.text(
            b.get_x() + b.get_width() / 2,
            b.get_height(),
            f"{r['speedup_vs_1']:.2f}x",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(range(len(runs)), names, rotation=20, ha="right", fontsize=8)
    ax.set(
        ylabel="median step (s)",
        title=f"1 vs 2 processes on this CPU, {res['height']}x{res['width']}, one core each"
        + (f", loopback at {res['link_rate']}" if res.get("link_rate") else "")
        + "\n(label: speedup vs 1 process)",
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, labels, values, errs, ylabel, color):
    ax.bar(range(len(labels)), values, yerr=errs, color=color, capsize=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot_quality(
    result: dict,
    images: dict[str, np.ndarray],
    ref: np.ndarray,
    out_dir: Path,
    grid_pairs: list[int],
) -> list[str]:
    """quality_vs_mode/_vs_warmup/_vs_n.png and quality_grid.png of a quality.json `result`.

    Args:
      images: config name -> uint8 `[N, H, W, 3]`; ref: the single-device images.
      grid_pairs: pair indices shown in the grid.
    Returns:
      the file names written in `out_dir`.
    """
    plt = _pyplot()

    rows = {c["name"]: c for c in result["configs"]}
    title = (
        f"tiny SDXL-architecture model, {result['height']}x{result['width']}, "
        f"{result['steps']} {result['scheduler']} steps, CFG {result['guidance_scale']:g}; "
        f"vs single device, {len(result['pairs'])} images"
    )
    written = []

    def psnr_val(c):  # identical images: plot at 60 dB (drawn hatched)
        return c["psnr_mean"] if c["psnr_mean"] is not None else 60.0

    # quality vs mode (n = the largest)
    mode_rows = [
        c
        for c in result["configs"]
        if c["n"] == max(r["n"] for r in result["configs"])
        and ({"gn", "naive", "exact", "pcpp"} & set(c["groups"]))
    ]
    if mode_rows:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        labels = [c["name"] for c in mode_rows]
        _bars(
            axes[0],
            labels,
            [psnr_val(c) for c in mode_rows],
            [c["psnr_std"] or 0 for c in mode_rows],
            "PSNR (dB), higher = closer",
            "tab:blue",
        )
        _bars(
            axes[1],
            labels,
            [c["ssim_mean"] for c in mode_rows],
            [c["ssim_std"] for c in mode_rows],
            "SSIM, higher = closer",
            "tab:green",
        )
        _bars(
            axes[2],
            labels,
            [c["lpips_mean"] for c in mode_rows],
            [c["lpips_std"] for c in mode_rows],
            "LPIPS (AlexNet), lower = closer",
            "tab:red",
        )
        fig.suptitle(f"quality vs mode (n = {mode_rows[0]['n']}, w = 4)\n{title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "quality_vs_mode.png", dpi=110)
        plt.close(fig)
        written.append("quality_vs_mode.png")

    warm = sorted(
        [c for c in result["configs"] if "warmup" in c["groups"]], key=lambda c: c["warmup_steps"]
    )
    if warm:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        ws = [c["warmup_steps"] for c in warm]
        for ax, key, lab, col in zip(
            axes,
            ("psnr", "ssim", "lpips"),
            ("PSNR (dB)", "SSIM", "LPIPS (AlexNet)"),
            ("tab:blue", "tab:green", "tab:red"),
        ):
            vals = [psnr_val(c) if key == "psnr" else c[f"{key}_mean"] for c in warm]
            errs = [(c[f"{key}_std"] or 0) for c in warm]
            ax.errorbar(ws, vals, yerr=errs, marker="o", color=col, capsize=3)
            ax.set_xlabel("warm-up steps w (synchronous steps = w + 1)")
            ax.set_ylabel(lab)
            ax.set_xticks(ws)
            ax.grid(alpha=0.3)
        fig.suptitle(
            f"quality vs warm-up, corrected_async_gn, n = {warm[0]['n']}\n{title}", fontsize=9
        )
        fig.tight_layout()
        fig.savefig(out_dir / "quality_vs_warmup.png", dpi=110)
        plt.close(fig)
        written.append("quality_vs_warmup.png")

    series = {
        "DistriFusion (corrected_async_gn, w=4)": [
            c
            for c in result["configs"]
            if c["mode"] == "corrected_async_gn" and "n" in c["groups"] and c.get("pcpp") is None
        ],
        f"PCPP (p={PCPP}, corrected_async_gn, w=4)": [
            c for c in result["configs"] if c.get("pcpp") is not None
        ],
        "naive patch (alternate)": [
            c for c in result["configs"] if c["naive_split"] == "alternate"
        ],
        f"img2img (strength {STRENGTH}), DistriFusion": [
            c for c in result["configs"] if "img2img" in c["groups"]
        ],
        "ControlNet (Canny), DistriFusion": [
            c for c in result["configs"] if "controlnet" in c["groups"]
        ],
    }
    if any(series.values()):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for (label, cs), style in zip(series.items(), ("o-", "s--", "^-.", "d:", "v-")):
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

    if any("compress" in c["groups"] for c in result["configs"]):
        written.append(_plot_bytes(plt, result, title, out_dir))

    cols = [("single device", None, ref)]
    big = max(c["n"] for c in result["configs"])
    for name, label in (
        (f"corrected-n{big}", f"DistriFusion n={big}\n(corrected_async_gn, w=4)"),
        (f"naive_alternate-n{big}", f"naive patch n={big}\n(alternate)"),
        (f"naive_row-n{big}", f"naive patch n={big}\n(row)"),
    ):
        if name in images:
            cols.append((label, name, images[name]))
    idx = [i for i in grid_pairs if i < len(ref)] or list(range(min(4, len(ref))))
    if len(cols) > 1:
        fig, axes = plt.subplots(
            len(idx), len(cols), figsize=(2.0 * len(cols), 2.1 * len(idx)), squeeze=False
        )
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
                    ax.set_xlabel(
                        f"PSNR {p:.1f}  LPIPS {row['per_image']['lpips'][i]:.3f}"
                        if p is not None
                        else "identical",
                        fontsize=7,
                    )
        fig.suptitle("single device vs DistriFusion vs naive patch", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "quality_grid.png", dpi=110)
        plt.close(fig)
        written.append("quality_grid.png")
    return written


def _plot_bytes(plt, result: dict, title: str, out_dir: Path) -> str:
    """quality_vs_bytes.png: LPIPS vs the bytes a device receives per displaced step, for the
    uncompressed exchange and every codec at the same n (naive patch: a line, it sends none)."""
    rows = [c for c in result["configs"] if "compress" in c["groups"]]
    n = rows[0]["n"]
    base = next((c for c in result["configs"] if c["name"] == f"corrected-n{n}"), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c in ([base] if base else []) + rows:
        codec = c["compress"] or "none (fp32)"
        colour = "tab:green" if codec.startswith("residual") else "tab:blue"
        colour = "black" if c is base else colour
        mb = c["exchanged_bytes_per_step"] / 1e6
        ax.errorbar(mb, c["lpips_mean"], yerr=c["lpips_std"], fmt="o", color=colour, capsize=3)
        ax.annotate(codec, (mb, c["lpips_mean"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    naive = next((c for c in result["configs"] if c["name"] == f"naive_alternate-n{n}"), None)
    if naive:
        ax.axhline(naive["lpips_mean"], ls="--", color="tab:red", lw=1)
        ax.text(ax.get_xlim()[0], naive["lpips_mean"], " naive patch (no exchange)", fontsize=7,
                va="bottom", color="tab:red")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("MB received per device per displaced step (jaxpr count)")
    ax.set_ylabel("LPIPS (AlexNet) vs single device, lower = closer")
    ax.grid(alpha=0.3)
    fig.suptitle(
        f"compressed exchange, n = {n} (blue: plain codec, green: residual + error feedback)"
        f"\n{title}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out_dir / "quality_vs_bytes.png", dpi=110)
    plt.close(fig)
    return "quality_vs_bytes.png"
