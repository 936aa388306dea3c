"""Programs traced for an absent accelerator pick that accelerator's kernels (aot/compile.py)."""

import jax

from distrifusion_jax.models.attention_ops import choose_impl
from distrifusion_jax.platform import trace_platform, traced_for


def test_traced_for_sets_and_restores_the_platform():
    assert trace_platform() == jax.default_backend() == "cpu"
    with traced_for("cuda"):
        assert trace_platform() == "cuda"
        assert choose_impl(trace_platform(), 1 << 20) == "xla"  # not the CPU's "blocked"
        with traced_for("tpu"):
            assert trace_platform() == "tpu"
        assert trace_platform() == "cuda"
    assert trace_platform() == "cpu"
