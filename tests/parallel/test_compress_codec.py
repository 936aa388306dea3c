"""Codecs of the compressed displaced exchange, alone (no collectives): each decode(encode(x))
within its stated bound, packing, zeros, and what error feedback buys on a drifting signal."""

import jax.numpy as jnp
import numpy as np
import pytest

from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.codec import Codec, _pack, _unpack
from distrifusion_jax.parallel.config import COMPRESS_CODECS

# decode(encode(x)) is computed in fp32: allow the bound a few ulps of x on top.
ULPS = 4 * 2.0**-23


def signal(shape, seed=0, scale=3.0):
    """Gaussian rows with a spread of magnitudes per row (and an all-zero row)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale * np.exp(rng.standard_normal(shape[:-1] + (1,)))
    x[(0,) * (len(shape) - 1)] = 0.0
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("base", COMPRESS_CODECS)
@pytest.mark.parametrize("shape", [(2, 6, 128), (2, 3, 5, 16), (3, 7)], ids=str)
def test_roundtrip_within_bound(base, shape):
    """128 channels: two scale groups per row; 16: one per row; 7: odd (int4/int2 padding)."""
    codec = Codec(base)
    x = signal(shape)
    parts = codec.encode(x)
    for a in parts.values():  # leading axes kept: every part follows the buffer's rule
        assert a.shape[:-1] == x.shape[:-1]
    assert sum(a.nbytes for a in parts.values()) == codec.payload_bytes(x.shape)
    y = codec.decode(parts, x.shape[-1])
    assert y.shape == x.shape and y.dtype == jnp.float32
    err = np.abs(np.asarray(y) - np.asarray(x))
    bound = np.asarray(codec.bound(x)) + ULPS * np.abs(np.asarray(x))
    assert np.all(err <= bound), float(np.max(err - bound))
    assert np.all(np.asarray(y)[(0,) * (len(shape) - 1)] == 0)  # zero row: zero scale, exact


@pytest.mark.parametrize("base", ["int8", "int4", "int2"])
def test_int_bound_is_half_a_step_and_reached(base):
    """|err| <= s/2 with s = max|x| / (2^(b-1) - 1) per row; max error close to it on noise."""
    codec = Codec(base)
    x = signal((64, 64), seed=1)
    s = np.max(np.abs(np.asarray(x)), axis=-1, keepdims=True) / (2.0 ** (codec.bits - 1) - 1)
    err = np.abs(np.asarray(codec.decode(codec.encode(x), 64)) - np.asarray(x))
    assert np.all(err <= s / 2 * (1 + 1e-6))
    assert np.max(err / np.where(s > 0, s, 1)) > 0.45


def test_bf16_input_and_dtype():
    """Buffers in the model dtype (bf16 on accelerators) decode back to it."""
    x = signal((2, 4, 64)).astype(jnp.bfloat16)
    for base in COMPRESS_CODECS:
        codec = Codec(base)
        y = codec.decode(codec.encode(x), 64, jnp.bfloat16)
        assert y.dtype == jnp.bfloat16
        bound = codec.bound(x) + 2.0**-8 * jnp.abs(x.astype(jnp.float32))  # + the final cast
        assert bool(jnp.all(jnp.abs(y.astype(jnp.float32) - x.astype(jnp.float32)) <= bound))


@pytest.mark.parametrize("base", COMPRESS_CODECS)
def test_zero_parts_decode_to_zero(base):
    """What the band with no neighbour receives (a ppermute's zeros) decodes to zeros."""
    codec = Codec(base)
    parts = {k: jnp.zeros_like(a) for k, a in codec.encode(signal((2, 3, 16))).items()}
    assert not np.any(np.asarray(codec.decode(parts, 16)))


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    u = jnp.asarray(rng.integers(0, 2**bits, size=(3, 2, 11)), jnp.int32)
    packed = _pack(u, bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 2, -(-11 * bits // 8))
    np.testing.assert_array_equal(np.asarray(_unpack(packed, bits, 11)), np.asarray(u))


def test_parse_and_config_errors():
    assert Codec.parse("int8") == Codec("int8")
    assert Codec.parse("residual+int4") == Codec("int4", residual=True)
    for bad in ("int3", "residual+", "fp16", "int8+residual"):
        with pytest.raises(ValueError, match="unknown compress codec"):
            ParallelConfig(patches=2, compress=bad)
    for mode in ("full_sync", "naive_patch", "no_sync"):
        with pytest.raises(ValueError, match="sends nothing displaced") as e:
            ParallelConfig(patches=2, mode=mode, compress="int8")
        assert "\n" not in str(e.value)
    for mode in ("corrected_async_gn", "stale_gn", "sync_gn", "separate_gn"):
        assert ParallelConfig(patches=2, mode=mode, compress="residual+int2").residual
    assert not ParallelConfig(patches=2, compress="int8").residual
    assert not ParallelConfig(patches=1, compress="residual+int8").residual  # one band: no-op


def track(codec: Codec, xs: np.ndarray, residual: bool, feedback: bool = True) -> np.ndarray:
    """Max |received - x_t| per step when x_t is sent each step (the receiver's view).

    residual with feedback: send encode(x - r), r += decode (sender and receiver alike);
    residual without feedback (open loop): send encode(x_t - x_{t-1}), the receiver sums.
    The first value is sent exactly (a warm-up step)."""
    got, r, prev = xs[0], xs[0], xs[0]
    errs = [0.0]
    for x in xs[1:]:
        if not residual:
            got = np.asarray(codec.decode(codec.encode(jnp.asarray(x)), x.shape[-1]))
        else:
            delta = x - (r if feedback else prev)
            d = np.asarray(codec.decode(codec.encode(jnp.asarray(delta)), x.shape[-1]))
            got = got + d
            r, prev = r + d, x
        errs.append(float(np.max(np.abs(got - x))))
    return np.asarray(errs)


def drifting(steps=60, shape=(8, 64), rate=0.02, seed=0) -> np.ndarray:
    """x_t: a fixed field plus a slow random walk (about `rate` of its size per step)."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(shape)
    walk = np.cumsum(rate * rng.standard_normal((steps,) + shape), axis=0)
    return (x0 + walk).astype(np.float32)


@pytest.mark.parametrize("base", ["int8", "int4", "int2"])
def test_error_feedback_tracks_a_drifting_signal(base):
    """residual+intb: the error is the last change's coding error (half a quantization step of
    the change, not of the value), it does not grow over 60 steps, and it is far below plain
    intb's; open-loop residuals (no feedback) accumulate their errors instead."""
    codec = Codec(base)
    xs = drifting()
    fb = track(codec, xs, residual=True)
    plain = track(codec, xs, residual=False)
    open_loop = track(codec, xs, residual=True, feedback=False)
    step = np.max(np.abs(np.diff(xs, axis=0)))  # the largest change of one step
    # e_t <= max|x_t - x_{t-1} + e_{t-1}| / (2 qmax): at most step / (2 qmax - 1)
    assert np.all(fb[1:] <= step / (2.0**codec.bits - 3) * 1.01 + 1e-6)
    assert fb[40:].max() <= 1.5 * fb[1:20].max()  # not growing
    assert fb[1:].max() < 0.3 * plain[1:].min()
    if base != "int8":  # int8's open-loop drift stays tiny over 60 steps
        assert open_loop[-10:].mean() > 2 * fb[-10:].mean()
