"""Dense: `nn.Dense` with one rounding to `dtype` (fp32 accumulation and bias).

`nn.Dense` in bf16 rounds the matmul to bf16 and then the bias add again; torch's bf16 Linear
(one GEMM with the bias in its fp32 accumulator) rounds once. Same parameters as `nn.Dense`
(`kernel` `[C_in, features]`, `bias` `[features]`), so checkpoints map unchanged; in fp32 the
result is the same as `nn.Dense`'s.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class Dense(nn.Module):
    """`[..., C_in] -> [..., features]`: `x @ kernel + bias` accumulated in fp32, cast once.

    `out_dtype` (default `dtype`) is the result's dtype: fp32 skips the rounding for a caller
    that goes on in fp32 (GEGLU).
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype
        )
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (((x.ndim - 1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.out_dtype or self.dtype)
