"""Compile the real displaced step and the whole sampler for an accelerator that is not here.

XLA compiles for GPU and TPU targets on a CPU-only host ("deviceless" ahead-of-time
compilation): `jax.experimental.topologies` describes the target's devices, the mesh is built
over them, inputs are `jax.ShapeDtypeStruct`s with shardings, and `.lower(...).compile()` gives
the target's real program: its schedule (`compiled.as_text()`) and memory analysis. Needs the
target's plugin: `jax-cuda12-plugin` + `jax-cuda12-pjrt` (GPU), `libtpu` (TPU; `jax[tpu]`).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from distrifusion_jax.aot import hlo
from distrifusion_jax.aot.overlap import Target, latency_profile
from distrifusion_jax.io.components import COMPONENTS
from distrifusion_jax.models import UNet2DConditionModel
from distrifusion_jax.models.controlled_unet import ControlledUNet, controlled_params
from distrifusion_jax.models.controlnet import ControlNetModel
from distrifusion_jax.models.controlnet_config import ControlNetConfig
from distrifusion_jax.models.unet_config import UNetConfig
from distrifusion_jax.parallel import ParallelConfig
from distrifusion_jax.parallel.mesh import make_mesh
from distrifusion_jax.parallel.state import state_shapes
from distrifusion_jax.parallel.step import STATE_SPEC, cond_spec, latent_spec, make_step
from distrifusion_jax.platform import traced_for
from distrifusion_jax.sampling import scheduler_from_config
from distrifusion_jax.sampling.sample import make_sampler

TARGET_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "targets"
TEXT_TOKENS = 77


def target_devices(target: Target) -> list:
    """The target's devices (abstract: compile-only) from its topology."""
    from jax.experimental import topologies

    if target.platform == "cuda":
        config = (TARGET_CONFIGS / target.config).read_text()
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=config, topology=target.topology
        )
    else:
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    return list(topo.devices)


def abstract_unet(
    config: UNetConfig, dtype=jnp.bfloat16, controlnets: tuple[ControlNetConfig, ...] = ()
) -> tuple[Any, Any]:
    """The UNet module and its parameter shapes (`jax.eval_shape`: no memory); with
    `controlnets`, the `ControlledUNet` of the UNet and those ControlNets."""
    model = UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype)
    params = COMPONENTS["unet"].target(model)
    if not controlnets:
        return model, params
    nets = [ControlNetModel(c, dtype=dtype, param_dtype=dtype) for c in controlnets]
    params = controlled_params(params, [COMPONENTS["controlnet"].target(m) for m in nets])
    return ControlledUNet(config, tuple(controlnets), dtype=dtype, param_dtype=dtype), params


def _placed(tree, mesh, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def abstract_inputs(
    model: UNet2DConditionModel, parallel: ParallelConfig, mesh, resolution: int, batch: int = 1
) -> tuple[jax.ShapeDtypeStruct, dict[str, jax.ShapeDtypeStruct]]:
    """Latents `[B, H/8, W/8, C]` (fp32) and CFG conditioning `[2, B, ...]` for a square image
    (with a `ControlledUNet`'s K ControlNets, `control_scales` `[2, B, K]` too)."""
    cfg = model.config
    h = resolution // 8
    latents = jax.ShapeDtypeStruct((batch, h, h, cfg.in_channels), jnp.float32)
    cond = {
        "encoder_hidden_states": jax.ShapeDtypeStruct(
            (2, batch, TEXT_TOKENS, cfg.cross_attention_dims[0]), model.dtype
        )
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond["text_embeds"] = jax.ShapeDtypeStruct((2, batch, pooled), model.dtype)
        cond["time_ids"] = jax.ShapeDtypeStruct((2, batch, 6), jnp.float32)
    k = len(getattr(model, "controlnets", ()))
    if k:
        cond["control_scales"] = jax.ShapeDtypeStruct((2, batch, k), jnp.float32)
    return _placed(latents, mesh, latent_spec("row")), _placed(cond, mesh, cond_spec(parallel))


def abstract_control(model: Any, mesh, resolution: int, batch: int = 1) -> tuple | None:
    """A `ControlledUNet`'s conditioning images, one `[B, res, res, C_k]` fp32 (as the pipeline
    passes them) per ControlNet, split by rows like the latents; None for a plain UNet."""
    nets = getattr(model, "controlnets", ())
    if not nets:
        return None
    shape = lambda c: (batch, resolution, resolution, c.conditioning_channels)
    images = tuple(jax.ShapeDtypeStruct(shape(c), jnp.float32) for c in nets)
    return _placed(images, mesh, latent_spec("row"))


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A compiled program for the target and how long compiling took (seconds, here)."""

    program: str  # "step" or "sampler"
    compiled: Any
    compile_s: float

    def memory(self) -> dict[str, int]:
        """Per-device bytes from XLA's memory analysis; peak = arguments + outputs + temps -
        aliased (donated) buffers."""
        m = self.compiled.memory_analysis()
        out = {
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
        }
        out["peak_bytes"] = (
            out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
        )
        return out


def compile_step(
    model: UNet2DConditionModel,
    params: Any,
    parallel: ParallelConfig,
    devices: list,
    resolution: int,
    batch: int = 1,
    compiler_options: dict[str, str] | None = None,
    target: Target | None = None,
) -> Compiled:
    """The displaced step of `parallel` (its state from the synchronous step, as shapes),
    compiled for `devices`. The state is donated, as the sampler's carry is."""
    mesh = make_mesh(parallel, devices)
    params = _placed(params, mesh, P())
    latents, cond = abstract_inputs(model, parallel, mesh, resolution, batch)
    control = abstract_control(model, mesh, resolution, batch)
    scalar = _placed(jax.ShapeDtypeStruct((), jnp.float32), mesh, P())
    sync = make_step(model, parallel, mesh, displaced=False)
    inputs = (latents, scalar, cond, scalar, control)
    state = _placed(state_shapes(sync, params, {}, *inputs), mesh, STATE_SPEC)
    step = make_step(model, parallel, mesh, displaced=True, donate_state=True)
    t0 = time.perf_counter()
    with traced_for(_platform(target, devices)):
        lowered = step.lower(params, state, *inputs)
    compiled = _compile(lowered, target, compiler_options)
    return Compiled("step", compiled, time.perf_counter() - t0)


def compile_sampler(
    model: UNet2DConditionModel,
    params: Any,
    parallel: ParallelConfig,
    devices: list,
    resolution: int,
    scheduler_config: dict,
    steps: int = 50,
    batch: int = 1,
    compiler_options: dict[str, str] | None = None,
    target: Target | None = None,
) -> Compiled:
    """The whole jitted sampling loop (`make_sampler`: warm-up scan + displaced scan)."""
    mesh = make_mesh(parallel, devices)
    params = _placed(params, mesh, P())
    latents, cond = abstract_inputs(model, parallel, mesh, resolution, batch)
    scalar = _placed(jax.ShapeDtypeStruct((), jnp.float32), mesh, P())
    key = _placed(jax.eval_shape(lambda: jax.random.PRNGKey(0)), mesh, P())
    sched = scheduler_from_config(scheduler_config, "euler")
    sample = make_sampler(model, sched, steps, parallel, mesh)
    t0 = time.perf_counter()
    with traced_for(_platform(target, devices)):
        lowered = sample.lower(params, latents, cond, scalar, key)
    compiled = _compile(lowered, target, compiler_options)
    return Compiled("sampler", compiled, time.perf_counter() - t0)


def _platform(target: Target | None, devices: list) -> str:
    """The platform the program is for: the target's, else its devices'."""
    return target.platform if target is not None else devices[0].platform


def _compile(lowered, target: Target | None, options: dict[str, str] | None):
    """Compile; on a GPU target twice: the second time XLA's latency-hiding scheduler reads the
    roofline profile of the first program (`overlap.latency_profile`) instead of its built-in
    transfer estimates, and starts each exchange early enough to cover it."""
    if target is not None and target.platform == "cuda":
        # No device, no autotuning: Triton's default GEMM tilings fail at large shapes
        # ("Couldn't find output tile sizes"); cuBLAS compiles every shape.
        options = {"xla_gpu_enable_triton_gemm": False, **(options or {})}
    compiled = lowered.compile(options or {})
    if target is None or target.platform != "cuda":
        return compiled
    comps = hlo.parse_module(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.pbtxt"
        path.write_text(latency_profile(comps, target))
        opts = {**(options or {}), "xla_gpu_pgle_profile_file_or_directory_path": str(path)}
        return lowered.compile(opts)
