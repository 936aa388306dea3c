"""The denoising step under `shard_map`: the only place that writes partition specs.

Per device, `local_eps` runs the UNet on the device's row band `[B_l, H/n, W, C]` of the
latent, with the stale state of the previous step as input, and returns the guided noise
prediction of the band and the new state. `make_step` wraps one step for callers that hold
global arrays (tests, benchmarks); `sampling/sample.py` wraps the whole loop the same way.

Conditioning `cond` is a dict of arrays with a leading CFG axis G (1 without guidance,
2 = (unconditional, conditional) with guidance) and then the batch:
`encoder_hidden_states [G, B, S, D]`, optional `text_embeds [G, B, P]`, `time_ids [G, B, 6]`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distrifusion_jax.parallel.config import ParallelConfig
from distrifusion_jax.parallel.exchange import merge, receive_state
from distrifusion_jax.parallel.mesh import AXES, exchange_compiler_options, shard
from distrifusion_jax.parallel.state import OUTBOX, RECON, STALE, TEXT_KV, State

Cond = dict[str, jax.Array]


def local_eps(
    model: nn.Module,
    params: Any,
    state: State,
    x: jax.Array,
    t: jax.Array,
    cond: Cond,
    guidance_scale: jax.Array | float,
    parallel: ParallelConfig,
    displaced: bool,
    control_images: tuple[jax.Array, ...] | None = None,
) -> tuple[jax.Array, State]:
    """Guided noise prediction of this device's band. Runs inside shard_map.

    Args:
      model: the UNet module (its `patch` field is replaced for this step).
      state: variable collections from the previous step (`{}` before the first step):
        "outbox" (the layers' local values of the previous step, exchanged at the start of a
        displaced step and read by its layers as "stale"; `no_sync` carries "stale" itself,
        frozen) and "text_kv" (the cross-attention K,V of the text, computed in the first
        step and read afterwards).
      x: `[B_l, h, W, C]` latent band (already scaled for the model input).
      t: scalar timestep.
      cond: local conditioning, leading axes `[G_l, B_l]`.
      guidance_scale: CFG scale (used when G = 2).
      displaced: False for a synchronous step.
      control_images: ControlNet conditioning images, one `[B_l, h*f, W*f, C_k]` band per
        ControlNet (the rows of this latent band), for a `ControlledUNet`; their scales for this
        step are `cond["control_scales"]` `[G_l, B_l, K]`.

    Returns:
      eps `[B_l, h, W, C]` (fp32) and the new state.
    """
    ctx = parallel.context(displaced)
    ehs = cond["encoder_hidden_states"]
    g_local = ehs.shape[0]
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    added = {k: flat(cond[k]) for k in ("text_embeds", "time_ids") if k in cond} or None
    xin = jnp.concatenate([x] * g_local, axis=0)
    tt = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (xin.shape[0],))
    mutable = [TEXT_KV] if TEXT_KV not in state else []
    variables = {"params": params, **state}
    carried = {}  # a residual codec's "stale" and "recon" after a displaced step's exchange
    if parallel.tracks_state:
        if parallel.rule.refresh:
            mutable.append(OUTBOX)
            if displaced:  # last step's local values, exchanged now, read by this step's layers
                stale, carried = receive_state(state, ctx)
                variables = {**variables, STALE: stale}
            elif parallel.residual:  # exact "stale" and "recon": where the coded changes start
                mutable += [STALE, RECON]
        elif not displaced:  # no_sync: what the warm-up steps receive stays frozen
            mutable.append(STALE)
    extra = {}
    if control_images is not None:  # same images for every CFG half, scales per half
        images = tuple(jnp.concatenate([im] * g_local, axis=0) for im in control_images)
        extra["control"] = {"images": images, "scales": flat(cond["control_scales"])}
    out, updates = model.clone(patch=ctx).apply(
        variables, xin, tt, flat(ehs), added, mutable=mutable, **extra
    )
    state = dict(state)
    for name, tree in updates.items():
        if tree:
            state[name] = merge(state[name], tree) if name in state else dict(tree)
    state.update(carried)
    out = out.reshape((g_local, -1) + out.shape[1:]).astype(jnp.float32)
    if parallel.cfg_split:
        out = jax.lax.all_gather(out[0], "cfg")  # the two CFG halves meet: [2, B_l, h, W, C]
    if out.shape[0] == 2:
        return out[0] + guidance_scale * (out[1] - out[0]), state
    return out[0], state


def cond_spec(parallel: ParallelConfig) -> P:
    """Conditioning arrays `[G, B, ...]`: G over `cfg` when split, B over `data`."""
    return P("cfg" if parallel.cfg_split else None, "data")


def latent_spec(split: str = "row") -> P:
    """Latents `[B, H, W, C]`: B over `data`, rows (or columns) over `patch`."""
    return P("data", "patch") if split == "row" else P("data", None, "patch")


STATE_SPEC = P(AXES)  # every state leaf has a leading axis with one slot per device


def make_step(
    model: nn.Module,
    parallel: ParallelConfig,
    mesh: Mesh,
    displaced: bool,
    donate_state: bool = False,
) -> Callable[..., tuple[jax.Array, State]]:
    """A jitted global step `(params, state, latents, t, cond, guidance_scale) -> (eps, state)`.

    `latents`/`eps` are `[B, H, W, C]` sharded by rows over `patch` (as `control_images`, the
    ControlNets' conditioning images of a `ControlledUNet`); `state` leaves carry a
    leading device axis `[data*cfg*patch, ...]` (pass `{}` to the first synchronous step).
    For `naive_patch` with split `col` the latents are split by columns; `alternate` is a
    sampler-level schedule (use `row`/`col` steps). `donate_state`: the state given is updated
    in place (as the sampler's carry is); do not reuse it after the call.
    """
    split = parallel.naive_split if parallel.naive else "row"
    if split == "alternate":
        raise ValueError("make_step runs one split; build 'row' and 'col' steps for alternate.")

    def body(params, state, x, t, cond, g, control):
        state = jax.tree.map(lambda a: a[0], state)
        eps, state = local_eps(model, params, state, x, t, cond, g, parallel, displaced, control)
        return eps, jax.tree.map(lambda a: a[None], state)

    @functools.partial(
        jax.jit,
        donate_argnums=(1,) if donate_state else (),
        compiler_options=exchange_compiler_options(mesh),
    )
    def step(params, state, latents, t, cond, guidance_scale=1.0, control_images=None):
        spec_x = latent_spec(split)
        fn = shard(
            body,
            mesh,
            in_specs=(P(), STATE_SPEC, spec_x, P(), cond_spec(parallel), P(), spec_x),
            out_specs=(spec_x, STATE_SPEC),
        )
        return fn(params, state, latents, t, cond, guidance_scale, control_images)

    return step


def make_decode(vae: nn.Module, parallel: ParallelConfig, mesh: Mesh) -> Callable[..., jax.Array]:
    """A jitted VAE decode on row bands: `(params, latents [B, h, w, C]) -> image [B, H, W, 3]`.

    The decoder runs exactly (`full_sync`) on the `patch` axis: halo rows and GroupNorm
    statistics are exchanged in place, so the image equals the single-device decode.
    """
    ctx = ParallelConfig(patches=parallel.patches, mode="full_sync").context(False)
    module = vae.clone(patch=ctx)
    spec = latent_spec("row")

    def body(params, z):
        return module.apply({"params": params}, z, method=module.decode)

    return jax.jit(shard(body, mesh, in_specs=(P(), spec), out_specs=spec))


def make_encode(
    vae: nn.Module, parallel: ParallelConfig, mesh: Mesh
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A jitted VAE encode on row bands: `(params, image [B, H, W, 3]) -> (mean, logvar)`,
    each `[B, H/f, W/f, C]`, split by rows like the latents.

    As `make_decode`, exact (`full_sync`): the stride-2 downsamplers fetch their bottom pad row
    from the band below, so the result equals the single-device encode.
    """
    ctx = ParallelConfig(patches=parallel.patches, mode="full_sync").context(False)
    module = vae.clone(patch=ctx)
    spec = latent_spec("row")

    def body(params, x):
        return module.apply({"params": params}, x, method=module.encode)

    return jax.jit(shard(body, mesh, in_specs=(P(), spec), out_specs=(spec, spec)))
