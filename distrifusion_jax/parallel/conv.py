"""PatchConv: a 2-D convolution that, on a row band, gets its halo rows from the neighbours.

Sync step: `ppermute` this step's own boundary rows to the neighbours and convolve with
them now (exact). Displaced step: convolve with the neighbours' rows from step t-1 (state
collection "stale", received at the start of this step) and park this step's rows for t+1.

The convolution itself (`conv2d`) is XLA's, except on CPU where the output has no more pixels
than channels (`choose_conv`): there it is one GEMM of the k*k shifted copies of the input
(im2col), 2-5x faster than XLA's CPU convolution at SDXL's 8x8 and 16x16 levels of a 32x32
latent (jax 0.10; a 3x3 1280 -> 1280 conv on 8x8: 8 ms vs 38 ms), where the kernel, not the
pixels, is most of the bytes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.parallel.config import PatchContext
from distrifusion_jax.parallel.exchange import exchange, send, store
from distrifusion_jax.parallel.state import STALE
from distrifusion_jax.platform import trace_platform

Dtype = Any


def choose_conv(backend: str, out_pixels: int, out_channels: int) -> str:
    """The conv "auto" runs: im2col on CPU when `out_pixels` (B * H_out * W_out) are at most
    `out_channels` (the patches are no larger than the kernel), else XLA's."""
    return "im2col" if backend == "cpu" and out_pixels <= out_channels else "xla"


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    pads: tuple[tuple[int, int], tuple[int, int]],
    impl: str = "auto",
) -> jax.Array:
    """NHWC `[B, H, W, C]` x HWIO `[k, k, C, F]` -> `[B, H_out, W_out, F]` in fp32.

    `impl`: "xla" (`lax.conv_general_dilated`), "im2col", or "auto" (`choose_conv` on
    `platform.trace_platform()`).
    """
    b, h, w, c = x.shape
    k = kernel.shape[0]
    ho = (h + sum(pads[0]) - k) // stride + 1
    wo = (w + sum(pads[1]) - k) // stride + 1
    if impl == "auto":
        impl = choose_conv(trace_platform(), b * ho * wo, kernel.shape[-1])
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=(stride, stride), padding=pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32,
        )  # fmt: skip
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    rows, cols = (ho - 1) * stride + 1, (wo - 1) * stride + 1
    taps = [xp[:, i : i + rows : stride, j : j + cols : stride] for i in range(k) for j in range(k)]
    patches = jnp.concatenate(taps, axis=-1) if k > 1 else taps[0]  # [B, Ho, Wo, k*k*C]
    return jax.lax.dot_general(
        patches, kernel.reshape(k * k * c, -1), (((3,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )  # fmt: skip


def halo_rows(kernel: int, stride: int, pad: int, h: int) -> tuple[int, int]:
    """Rows a band of h rows needs from above and from below for a conv along H.

    The band's outputs are rows [i*h/s, (i+1)*h/s) of the image; the last one reads padded rows
    up to (h/s - 1)*s + kernel - 1, so a stride-2 3x3 conv needs nothing from below.
    """
    out_h = h // stride
    last = (out_h - 1) * stride + kernel  # exclusive end, in padded-band coordinates
    return pad, max(0, last - (pad + h))


class PatchConv(nn.Module):
    """Conv2d on NHWC input `[B, H, W, C]` (H: a row band when `patch` is set).

    Parameters are `kernel` `[kh, kw, C_in, C_out]` (HWIO) and `bias` `[C_out]`, as `nn.Conv`.
    `exact=True` (conv_in) always exchanges its halo synchronously. Input and halo are in
    `dtype`; the conv accumulates and adds the bias in fp32 and rounds once, to `out_dtype`
    (default `dtype`; fp32 for a caller that goes on in fp32), as torch's bf16 conv does.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    use_bias: bool = True
    patch: PatchContext | None = None
    exact: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel_size, self.stride, self.padding
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        ctx = self.patch
        if ctx is None or ctx.n == 1 or k == 1:
            pads = ((p, p), (p, p))
        else:
            x = self._with_halo(x, ctx)
            pads = ((0, 0), (p, p))
        y = conv2d(x, kernel.astype(self.dtype), s, pads)  # fp32
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.out_dtype or self.dtype)

    def _with_halo(self, x: jax.Array, ctx: PatchContext) -> jax.Array:
        """Concatenate halo rows above and below the band: `[B, h, W, C] -> [B, a + h + b, W, C]`."""
        n_above, n_below = halo_rows(self.kernel_size, self.stride, self.padding, x.shape[1])
        top, bottom = x[:, :n_below], x[:, x.shape[1] - n_above :]
        if self.exact or ctx.sync_exchange:
            above = exchange("above", bottom, ctx.axis, ctx.n)
            below = exchange("below", top, ctx.axis, ctx.n)
            if not self.exact:  # conv_in never reads stale rows: it keeps no state
                store(
                    self, ctx, local={"above": bottom, "below": top},
                    received={"above": above, "below": below},
                )  # fmt: skip
        else:
            above = self.get_variable(STALE, "above")
            below = self.get_variable(STALE, "below")
            send(self, ctx, above=bottom, below=top)  # exchanged at the start of step t+1
        return jnp.concatenate([above.astype(x.dtype), x, below.astype(x.dtype)], axis=1)
