"""Parallel configuration: the DistriFusion mode table, the per-layer patch context, shape checks.

Imports no JAX: command-line entry points read `MODES` before they set XLA flags.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModeRule:
    """What a mode does in a displaced step (steps 0..w are always exact and fill the buffers).

    Attributes:
      name: the original's name (distrifuser `--sync_mode`), or `naive_patch`.
      exchange: conv halo rows and self-attention K,V: `"exact"` (exchanged and used in the same
        step), `"stale"` (read from step t-1; this step's values are sent for t+1), or `"none"`
        (the plain model on each band, nothing exchanged: the naive baseline).
      groupnorm: statistics over the whole image: `"exact"` (all bands' moments of this step),
        `"corrected"` (`mean_j s_j^{t-1} + (s_i^t - s_i^{t-1})`), `"stale"`
        (`(sum_{j != i} s_j^{t-1} + s_i^t) / n`) or `"local"` (this band's moments only).
      refresh: displaced steps send their values for step t+1 (False: buffers frozen after
        warm-up).
    """

    name: str
    exchange: str
    groupnorm: str
    refresh: bool = True

    @property
    def keeps_state(self) -> bool:
        """Steps carry stale buffers from one step to the next."""
        return self.exchange == "stale"

    @property
    def stale_moments(self) -> bool:
        """GroupNorm keeps every band's moments across steps."""
        return self.groupnorm in ("corrected", "stale")


# The one list of modes. Names are the original's, plus the naive baseline.
MODE_RULES: dict[str, ModeRule] = {
    r.name: r
    for r in (
        ModeRule("full_sync", exchange="exact", groupnorm="exact"),
        ModeRule("corrected_async_gn", exchange="stale", groupnorm="corrected"),
        ModeRule("stale_gn", exchange="stale", groupnorm="stale"),
        ModeRule("sync_gn", exchange="stale", groupnorm="exact"),
        ModeRule("separate_gn", exchange="stale", groupnorm="local"),
        ModeRule("no_sync", exchange="stale", groupnorm="local", refresh=False),
        ModeRule("naive_patch", exchange="none", groupnorm="local", refresh=False),
    )
}
MODES = tuple(MODE_RULES)
DEFAULT_MODE = MODES[1]  # corrected_async_gn
NAIVE_SPLITS = ("row", "col", "alternate")
# Codecs of the displaced exchange (`parallel/codec.py`); "residual+" prefixes any of them.
COMPRESS_CODECS = ("bf16", "fp8", "int8", "int4", "int2")
RESIDUAL = "residual+"


def parse_compress(spec: str) -> tuple[str, bool]:
    """`"int8"` -> ("int8", False); `"residual+int4"` -> ("int4", True); ValueError otherwise."""
    residual = spec.startswith(RESIDUAL)
    base = spec[len(RESIDUAL) :] if residual else spec
    if base not in COMPRESS_CODECS:
        raise ValueError(
            f"unknown compress codec {spec!r}; choose one of {list(COMPRESS_CODECS)}, "
            f"optionally prefixed by {RESIDUAL!r} (e.g. 'residual+int4')."
        )
    return base, residual


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How one generation is spread over the mesh `("data", "cfg", "patch")`.

    Attributes:
      patches: n, the number of row bands (devices on the `patch` axis).
      cfg_split: put the unconditional and conditional CFG halves on the two `cfg` groups.
      data: devices on the `data` axis (images of one call are split over it).
      mode: one of MODES; `naive_patch` runs the plain model on each band with no exchange.
      naive_split: `row`, `col` or `alternate` (rows on even steps, columns on odd ones).
      warmup_steps: w; steps 0..w are synchronous (w + 1 steps), later steps are displaced.
      fused_exchange: a displaced step exchanges what the previous step parked in a few
        concatenated collectives at its start instead of one per buffer: for hosts whose
        collectives block and cost a fixed latency each (CPU processes); on accelerators the
        per-buffer collectives overlap with the compute before each reader.
      pcpp: PCPP portion p in [0, 1] (arXiv 2412.02962; the paper uses 0.3): in displaced steps
        self-attention on band i sees its own tokens and the nearest p of the tokens of bands
        i-1 and i+1 (stale), and only those are sent; None: DistriFusion (every band's K,V).
      compress: codec of the displaced exchange's halo rows and K,V (`parallel/codec.py`):
        "bf16", "fp8", "int8", "int4", "int2", or "residual+" one of them (error feedback: the
        change since the last send is coded; the state then also carries what was received
        and what the peers rebuilt). GroupNorm moments and warm-up steps stay exact. None:
        sent as they are.
    """

    patches: int = 1
    cfg_split: bool = False
    data: int = 1
    mode: str = DEFAULT_MODE
    naive_split: str = "row"
    warmup_steps: int = 4
    fused_exchange: bool = False
    pcpp: float | None = None
    compress: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}.")
        if self.pcpp is not None:
            if not 0.0 <= self.pcpp <= 1.0:
                raise ValueError(f"pcpp={self.pcpp} is a portion of a band: use 0 <= p <= 1.")
            if not self.rule.keeps_state:
                raise ValueError(
                    f"pcpp changes displaced steps; mode {self.mode!r} has none: use it with "
                    "corrected_async_gn (or another displaced mode), or drop pcpp."
                )
        if self.compress is not None:
            parse_compress(self.compress)
            if not (self.rule.keeps_state and self.rule.refresh):
                raise ValueError(
                    f"compress codes the displaced exchange; mode {self.mode!r} sends nothing "
                    "displaced: use it with corrected_async_gn (or another displaced mode), or "
                    "drop compress."
                )
        if self.naive_split not in NAIVE_SPLITS:
            raise ValueError(
                f"unknown naive_split {self.naive_split!r}; choose one of {list(NAIVE_SPLITS)}."
            )
        if self.patches < 1 or self.data < 1:
            raise ValueError(
                f"patches={self.patches} and data={self.data} must be >= 1 (devices per axis)."
            )
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0.")

    @property
    def cfg(self) -> int:
        return 2 if self.cfg_split else 1

    @property
    def num_devices(self) -> int:
        return self.data * self.cfg * self.patches

    @property
    def rule(self) -> ModeRule:
        """What the mode does (`MODE_RULES`)."""
        return MODE_RULES[self.mode]

    @property
    def naive(self) -> bool:
        """The naive-patch baseline: the plain model per band, no exchange."""
        return self.rule.exchange == "none"

    @property
    def residual(self) -> bool:
        """The exchange codes changes (`residual+` codec): steps also carry the received values
        ("stale") and what the peers rebuilt of this device's sends ("recon")."""
        return self.tracks_state and self.compress is not None and parse_compress(self.compress)[1]

    @property
    def tracks_state(self) -> bool:
        """Steps carry stale buffers (a displaced mode on more than one band)."""
        return self.patches > 1 and self.rule.keeps_state

    def context(self, displaced: bool) -> PatchContext | None:
        """The PatchContext the model is built with for a sync or a displaced step (None: the
        plain model, for one band or the naive baseline)."""
        if self.patches == 1 or self.naive:
            return None
        return PatchContext(self, displaced=displaced)

    def check_shapes(
        self,
        latent_hw: tuple[int, int],
        num_downsamplers: int,
        guidance_scale: float | None = None,
        batch: int | None = None,
    ) -> None:
        """Raise ValueError naming the bad number and the fix if the shapes cannot be split.

        Args:
          latent_hw: (H_lat, W_lat), latent rows and columns.
          num_downsamplers: stride-2 convs in the UNet (2 for SDXL, 3 for SD 1.x/2.x).
          guidance_scale: CFG scale; cfg_split needs guidance > 1.
          batch: images per call; must divide over the `data` axis.
        """
        h, w = latent_hw
        down = 2**num_downsamplers
        n = self.patches
        if self.cfg_split and guidance_scale is not None and guidance_scale <= 1.0:
            raise ValueError(
                f"cfg_split needs classifier-free guidance (guidance_scale > 1, got "
                f"{guidance_scale}); disable cfg_split or raise the guidance scale."
            )
        if batch is not None and batch % self.data:
            raise ValueError(
                f"batch {batch} is not divisible by the data axis size {self.data}; "
                f"use a multiple of {self.data} images."
            )
        if w % down:
            raise ValueError(
                f"latent width {w} (image width {8 * w}) must be divisible by {down} for a UNet "
                f"with {num_downsamplers} downsamplers; use an image width divisible by {8 * down}."
            )
        if self.naive and self.naive_split in ("col", "alternate") and w % (down * n):
            raise ValueError(
                f"naive_patch split {self.naive_split!r} needs latent width {w} divisible by "
                f"{down}*n = {down * n}; change the width or the patch count."
            )
        if h % down:
            raise ValueError(
                f"latent height {h} must be divisible by {down}; use an image height divisible "
                f"by {8 * down}."
            )
        if h // down < n:
            raise ValueError(
                f"{n} patches exceed the {h // down} rows of the smallest UNet level "
                f"(latent height {h}); use at most {h // down} patches or a taller image."
            )
        if h % (down * n):
            raise ValueError(
                f"latent height {h} must be divisible by {down}*n = {down * n} for n={n} row "
                f"bands; use an image height divisible by {8 * down * n}, or fewer patches."
            )


@dataclasses.dataclass(frozen=True)
class PatchContext:
    """What a patch-aware layer knows: its `ParallelConfig`, the phase, the mesh axis of the bands.

    Built by `ParallelConfig.context`; a model built with `patch=None` is the plain model.
    `displaced=False` is a synchronous step (exact, fills the stale state); `displaced=True`
    reads last step's state and follows `parallel.rule`.
    """

    parallel: ParallelConfig
    displaced: bool = False
    axis: str = "patch"

    @property
    def n(self) -> int:
        return self.parallel.patches

    @property
    def rule(self) -> ModeRule:
        return self.parallel.rule

    @property
    def fused_exchange(self) -> bool:
        """The previous step's parked values are exchanged in a few concatenated collectives."""
        return self.parallel.fused_exchange

    @property
    def pcpp(self) -> float | None:
        """PCPP portion p (displaced self-attention sees its neighbours' nearest p), or None."""
        return self.parallel.pcpp

    @property
    def sync_exchange(self) -> bool:
        """Conv halos and attention K,V are exchanged and used in this step."""
        return not self.displaced or self.rule.exchange == "exact"

    @property
    def sync_groupnorm(self) -> bool:
        """GroupNorm statistics are exact (collective consumed in this step)."""
        return not self.displaced or self.rule.groupnorm == "exact"

    @property
    def refresh_state(self) -> bool:
        """Displaced layers send this step's values for the next step (False: frozen buffers)."""
        return self.rule.refresh

    def replace(self, **kw) -> PatchContext:
        return dataclasses.replace(self, **kw)
