"""A toy UNet-shaped model built only from the three patch-aware layers (fast layer tests)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from distrifusion_jax.parallel import KVExchange, PatchContext, PatchConv, PatchGroupNorm


class ToySelfAttention(nn.Module):
    heads: int = 2
    patch: PatchContext | None = None

    @nn.compact
    def __call__(self, x):  # [B, h, W, C]
        b, h, w, c = x.shape
        tok = x.reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, name=n)(tok) for n in ("to_q", "to_k", "to_v"))
        k, v, mask = KVExchange(patch=self.patch, name="kv_exchange")(k, v)
        split = lambda a: a.reshape(b, a.shape[1], self.heads, c // self.heads)
        o = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask)
        return x + nn.Dense(c, name="to_out_0")(o.reshape(b, h * w, c)).reshape(b, h, w, c)


class ToyUNet(nn.Module):
    """conv_in -> GN/conv -> attn -> stride-2 conv -> GN -> upsample -> conv -> conv_out."""

    channels: int = 16
    groups: int = 4
    patch: PatchContext | None = None

    @nn.compact
    def __call__(self, x, t, ehs, added=None):
        p, c = self.patch, self.channels
        temb = nn.Dense(c, name="temb")(jnp.sin(t[:, None] / 100.0 + jnp.arange(4.0)))
        x = PatchConv(c, patch=p, exact=True, name="conv_in")(x)
        x = x + temb[:, None, None, :] + nn.Dense(c, name="ctx")(ehs.mean(1))[:, None, None, :]
        h = nn.silu(PatchGroupNorm(self.groups, patch=p, name="norm1")(x))
        x = x + PatchConv(c, patch=p, name="conv1")(h)
        x = ToySelfAttention(patch=p, name="attn1")(x)
        d = PatchConv(c, stride=2, patch=p, name="down")(x)
        d = nn.silu(PatchGroupNorm(self.groups, patch=p, name="norm2")(d))
        d = PatchConv(c, patch=p, name="conv2")(d)
        u = jnp.repeat(jnp.repeat(d, 2, axis=1), 2, axis=2)
        x = x + PatchConv(c, patch=p, name="up")(u)
        x = nn.silu(PatchGroupNorm(self.groups, patch=p, name="norm_out")(x))
        return PatchConv(4, patch=p, name="conv_out")(x)
