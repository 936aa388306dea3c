"""Codecs for the displaced exchange: what a stale buffer is sent as, and what the peer rebuilds.

A codec turns one buffer's local value `x` `[..., C]` (conv halo rows `[B, p, W, C]`, K or V
`[B, L/n, C]`, PCPP edge tokens `[2, B, r, C]`) into a few arrays, its "parts", each with the
leading axes of `x` and only the last axis changed, so every part follows the buffer's exchange
rule (`exchange.RULES`: gathered along the token axis, or `ppermute`d) and the peer decodes the
received parts with the same per-row arithmetic:

- `bf16`: `{"q": x in bf16}`; |err| <= |x| * 2^-8;
- `fp8`: float8 e4m3 (`float8_e4m3fn`) of `x / s`, with a scale `s = max|x| / 448` per
  channel group, moved bitcast to uint8 (XLA's CPU backend widens f8 collectives to f16:
  twice the bytes, jax 0.10): `{"q": [..., C] u8, "scale": [..., C/g] f32}`;
  |err| <= max(|x| * 2^-4, s * 2^-10) (3 mantissa bits; subnormals below 2^-6);
- `int8`, `int4`, `int2`: symmetric integers `q = round(x / s)`, `|q| <= 2^(b-1) - 1`
  (127, 7, 1), `s = max|x| / (2^(b-1) - 1)` per channel group; |err| <= s / 2. `int4`/`int2`
  pack two/four values per uint8 (`q + 2^(b-1)` in b bits): `{"q": [..., ceil(C*b/8)] u8 or
  [..., C] i8, "scale": [..., C/g] f32}`.

A channel group is `group` (64) consecutive channels of a row when C is a multiple of it, else
the whole row. A part of zeros (what a band with no neighbour receives) decodes to zeros.
`residual+CODEC` (error feedback) codes the change since the last send instead of the value:
see `exchange.receive_residual`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from distrifusion_jax.parallel.config import parse_compress

Parts = dict[str, jax.Array]

_INT_BITS = {"int8": 8, "int4": 4, "int2": 2}
_FP8 = jnp.float8_e4m3fn
_FP8_MAX = 448.0


@dataclasses.dataclass(frozen=True)
class Codec:
    """How a stale buffer travels.

    Attributes:
      base: "bf16", "fp8", "int8", "int4" or "int2".
      residual: send the change since the last send (error feedback), not the value.
      group: channels per scale (when C is a multiple of it; else one scale per row).
    """

    base: str
    residual: bool = False
    group: int = 64

    @classmethod
    def parse(cls, spec: str) -> Codec:
        """`"int8"`, `"residual+int4"`, ... (`config.parse_compress` checks the name)."""
        base, residual = parse_compress(spec)
        return cls(base, residual)

    @property
    def bits(self) -> int:
        """Bits per value of the payload (scales not counted)."""
        return {"bf16": 16, "fp8": 8}.get(self.base) or _INT_BITS[self.base]

    def group_size(self, channels: int) -> int:
        """Channels sharing one scale in a row of `channels`."""
        return self.group if channels % self.group == 0 else max(channels, 1)

    def encode(self, x: jax.Array) -> Parts:
        """`x` `[..., C]` -> parts (see the module docstring), computed in fp32."""
        x = x.astype(jnp.float32)
        if self.base == "bf16":
            return {"q": x.astype(jnp.bfloat16)}
        qmax = _FP8_MAX if self.base == "fp8" else 2.0 ** (self.bits - 1) - 1
        c = x.shape[-1]
        g = self.group_size(c)
        xg = x.reshape(x.shape[:-1] + (c // g, g))  # [..., C/g, g]
        scale = jnp.max(jnp.abs(xg), axis=-1) / qmax  # [..., C/g]
        safe = jnp.where(scale > 0, scale, 1.0)[..., None]
        y = jnp.clip(xg / safe, -qmax, qmax).reshape(x.shape)  # [..., C]
        if self.base == "fp8":
            return {"q": jax.lax.bitcast_convert_type(y.astype(_FP8), jnp.uint8), "scale": scale}
        q = jnp.round(y)
        if self.bits == 8:
            return {"q": q.astype(jnp.int8), "scale": scale}
        return {"q": _pack(q.astype(jnp.int32) + 2 ** (self.bits - 1), self.bits), "scale": scale}

    def decode(self, parts: Parts, channels: int, dtype=jnp.float32) -> jax.Array:
        """Parts (possibly gathered or shifted: leading axes free) -> `[..., channels]` in
        `dtype`. `channels`: C of the encoded buffer (packed parts may carry padding)."""
        q = parts["q"]
        if self.base == "bf16":
            return q.astype(dtype)
        if self.base == "fp8":
            y = jax.lax.bitcast_convert_type(q, _FP8).astype(jnp.float32)
        elif self.base == "int8":
            y = q.astype(jnp.float32)
        else:
            y = (_unpack(q, self.bits, channels) - 2 ** (self.bits - 1)).astype(jnp.float32)
        g = self.group_size(channels)
        yg = y.reshape(y.shape[:-1] + (channels // g, g))  # [..., C/g, g]
        return (yg * parts["scale"][..., None]).reshape(y.shape).astype(dtype)

    def bound(self, x: jax.Array) -> jax.Array:
        """Per-element bound on `|decode(encode(x)) - x|`, `[..., C]` fp32 (exact arithmetic;
        allow a few fp32 ulps more)."""
        x = jnp.abs(x.astype(jnp.float32))
        if self.base == "bf16":
            return x * 2.0**-8
        c = x.shape[-1]
        g = self.group_size(c)
        amax = jnp.max(x.reshape(x.shape[:-1] + (c // g, g)), axis=-1, keepdims=True)
        amax = jnp.broadcast_to(amax, x.shape[:-1] + (c // g, g)).reshape(x.shape)
        if self.base == "fp8":
            return jnp.maximum(x * 2.0**-4, amax / _FP8_MAX * 2.0**-10)
        return amax / (2.0 ** (self.bits - 1) - 1) / 2

    def payload_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of the parts of one `shape` buffer (what one send moves)."""
        *lead, c = shape
        rows = math.prod(lead)
        if self.base == "bf16":
            return rows * c * 2
        per = 8 // min(self.bits, 8)
        q = rows * (c if self.bits == 8 else -(-c // per))
        return q + rows * (c // self.group_size(c)) * 4


def _pack(u: jax.Array, bits: int) -> jax.Array:
    """Unsigned `[..., C]` values of `bits` bits -> `[..., ceil(C * bits / 8)]` uint8, low bits
    first (value j of a byte in bits [j*bits, (j+1)*bits))."""
    per = 8 // bits
    c = u.shape[-1]
    pad = -c % per
    if pad:
        u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
    u = u.reshape(u.shape[:-1] + ((c + pad) // per, per)).astype(jnp.uint8)  # [..., C/per, per]
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    return jnp.sum(u << shifts, axis=-1, dtype=jnp.uint8)


def _unpack(p: jax.Array, bits: int, channels: int) -> jax.Array:
    """Inverse of `_pack`: `[..., ceil(C * bits / 8)]` uint8 -> `[..., channels]` int32."""
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    u = (p[..., None] >> shifts) & jnp.uint8(2**bits - 1)  # [..., C/per, per]
    return u.reshape(p.shape[:-1] + (p.shape[-1] * per,))[..., :channels].astype(jnp.int32)
