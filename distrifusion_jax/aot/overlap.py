"""How much of a compiled step's exchange its compute hides: a roofline model of the schedule.

For a scheduled computation (`aot/hlo.py`), every compute instruction gets a time on the
target, `max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)`, and every async collective a transfer
time, `latency + received bytes / link bandwidth` (per device, per direction). Two measures:

- window (the issue's definition): for each collective, the compute scheduled between its
  `*-start` and `*-done`; hidden = sum_i min(window_i, transfer_i) / sum_i transfer_i, so
  weighted by bytes;
- simulated: the step is replayed on one compute stream and one link: the bytes of the
  transfers cross the link in start order, one at a time (they share it), while their fixed
  latencies overlap; a `*-done` whose transfer has not finished stalls the compute. hidden = 1 - stalls / sum of transfers. Stricter than the window measure when
  several collectives are in flight at once.

What this cannot see: real kernel times (no autotuning without the device; peak rates are
optimistic for small ops), NCCL kernels taking SMs from compute, link contention with other
traffic, and launch overheads. Peak rates make compute look fast, which makes hiding look
harder (conservative); link figures are derated to 80% of the peak per direction.
"""

from __future__ import annotations

import dataclasses
import re
import statistics

from distrifusion_jax.aot import hlo


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator node to compile for, and the rates the overlap model uses.

    Attributes:
      name: e.g. `h100x8`.
      platform: `cuda` or `tpu`.
      devices: devices in the node (the `patch` axis spans them).
      topology: `get_topology_desc` topology: `1x1x8` (GPU: partitions x hosts x devices) or a
        TPU slice name such as `v5e:2x4`.
      config: GPU target-config file under `distrifusion_jax/assets/targets/` (None for TPU).
      peak_flops: dense bf16 FLOP/s per device.
      hbm_bytes_per_s: memory bandwidth per device.
      link_bytes_per_s: what one device receives per second from its peers (per direction,
        derated to 80% of the peak).
      link_note: where the link figure comes from.
      latency_s: fixed cost of one collective.
      memory_bytes: device memory.
    """

    name: str
    platform: str
    devices: int
    topology: str
    config: str | None
    peak_flops: float
    hbm_bytes_per_s: float
    link_bytes_per_s: float
    link_note: str
    latency_s: float
    memory_bytes: float


GiB = 1024**3
TARGETS = {
    t.name: t
    for t in (
        Target("h100x8", "cuda", 8, "1x1x8", "h100_sxm.txtpb", 989e12, 3.35e12, 0.8 * 450e9,
               "NVLink 4 via NVSwitch: 900 GB/s per GPU both ways, 450 GB/s per direction",
               10e-6, 80 * GiB),
        Target("h200x8", "cuda", 8, "1x1x8", "h200.txtpb", 989e12, 4.8e12, 0.8 * 450e9,
               "NVLink 4 via NVSwitch: 900 GB/s per GPU both ways, 450 GB/s per direction",
               10e-6, 141 * GiB),
        Target("a100x8", "cuda", 8, "1x1x8", "a100_sxm_80.txtpb", 312e12, 2.04e12, 0.8 * 300e9,
               "NVLink 3 via NVSwitch: 600 GB/s per GPU both ways, 300 GB/s per direction",
               10e-6, 80 * GiB),
        Target("v5e-8", "tpu", 8, "v5e:2x4", None, 197e12, 819e9, 0.8 * 100e9,
               "ICI 1,600 Gbit/s per chip = 200 GB/s both ways, 100 GB/s per direction",
               5e-6, 16 * GiB),
        Target("v5p-8", "tpu", 8, "v5p:2x2x2", None, 459e12, 2.765e12, 0.8 * 300e9,
               "ICI 4,800 Gbit/s per chip = 600 GB/s both ways, 300 GB/s per direction",
               5e-6, 95 * GiB),
    )
}  # fmt: skip


def received_bytes(start: hlo.Instr) -> float:
    """Bytes one device receives from an async collective's `*-start` instruction."""
    arrays = [a for a in start.arrays if a.dims or a.dtype not in ("u32", "s32")]
    groups = re.findall(r"\{([\d,]+)\}", start.attr("replica_groups") or "")
    n = len(groups[0].split(",")) if groups else 2
    if start.opcode.startswith("all-reduce"):
        return 2 * (n - 1) / n * sum(a.bytes for a in arrays)
    if start.opcode in hlo.COLLECTIVES:  # synchronous: the result only
        total = sum(a.bytes for a in arrays)
        return (n - 1) / n * total if start.opcode == "all-gather" else total
    half = len(arrays) // 2  # (operands..., results...)
    ins, outs = arrays[:half], arrays[half:]
    if start.opcode.startswith("all-gather"):
        return sum(a.bytes for a in outs) - sum(a.bytes for a in ins)
    return sum(a.bytes for a in outs)


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    kind: str  # all-gather, collective-permute, ...
    start: int  # schedule positions
    done: int
    bytes: float  # received per device
    transfer_s: float
    window_s: float  # compute scheduled between start and done
    compute_ops_in_window: int
    start_time_s: float  # on the compute timeline
    done_time_s: float
    stall_s: float  # simulated wait at the done


@dataclasses.dataclass(frozen=True)
class Overlap:
    computation: str
    compute_s: float  # sum of compute op times
    flops: float
    collectives: list[Collective]
    op_times: list[float]  # per scheduled instruction (0 for free ops and collectives)

    @property
    def transfer_s(self) -> float:
        return sum(c.transfer_s for c in self.collectives)

    @property
    def hidden_window(self) -> float:
        """sum(min(window, transfer)) / sum(transfer); 1.0 when nothing is exchanged."""
        total = self.transfer_s
        return sum(min(c.window_s, c.transfer_s) for c in self.collectives) / total if total else 1.0

    @property
    def hidden_simulated(self) -> float:
        total = self.transfer_s
        return 1.0 - sum(c.stall_s for c in self.collectives) / total if total else 1.0

    @property
    def step_s(self) -> float:
        """Compute plus simulated stalls."""
        return self.compute_s + sum(c.stall_s for c in self.collectives)

    def summary(self) -> dict:
        by_kind: dict[str, int] = {}
        for c in self.collectives:
            by_kind[c.kind] = by_kind.get(c.kind, 0) + 1
        n = len(self.op_times)
        return {
            "computation": self.computation,
            "compute_ms": 1e3 * self.compute_s,
            "tflops": self.flops / 1e12,
            "exchanged_mb": sum(c.bytes for c in self.collectives) / 1e6,
            "transfer_ms": 1e3 * self.transfer_s,
            "collectives": by_kind,
            "median_compute_ops_in_window": (
                statistics.median(c.compute_ops_in_window for c in self.collectives)
                if self.collectives
                else 0
            ),
            "first_start_position": (
                min(c.start for c in self.collectives) / n if self.collectives and n else None
            ),
            "hidden_fraction_window": self.hidden_window,
            "hidden_fraction_simulated": self.hidden_simulated,
            "step_ms_simulated": 1e3 * self.step_s,
        }


def op_time(cost: hlo.OpCost, target: Target) -> float:
    return max(cost.flops / target.peak_flops, cost.bytes / target.hbm_bytes_per_s)


def analyze(comp: hlo.Computation, comps: dict[str, hlo.Computation], target: Target) -> Overlap:
    """The overlap of every async collective in one scheduled computation."""
    pairs = sorted(hlo.iter_async_collectives(comp, comps))
    # TPU async collective fusions (start, done) are communication, not compute.
    comm = {k for s, d, _ in pairs for k in (s, d) if comp.instrs[k].opcode == "fusion"}
    times, flops = [], 0.0
    for k, ins in enumerate(comp.instrs):
        cost = hlo.OpCost(0.0, 0.0) if k in comm else hlo.op_cost(ins, comp, comps)
        flops += cost.flops
        times.append(op_time(cost, target))
    clock = [0.0]  # compute time before instruction i, without stalls
    for t in times:
        clock.append(clock[-1] + t)
    wire = {s: received_bytes(ins) / target.link_bytes_per_s for s, _, ins in pairs}
    transfer = {s: target.latency_s + w for s, w in wire.items()}
    # Replay with stalls: the bytes cross one link in start order; latencies overlap.
    done_at = {d: s for s, d, _ in pairs}
    started: dict[int, float] = {}
    finish: dict[int, float] = {}
    stall: dict[int, float] = {}
    link_free, now = 0.0, 0.0
    for i, t in enumerate(times):
        if i in transfer:
            started[i] = now
            link_free = max(now, link_free) + wire[i]
            finish[i] = max(link_free, now + transfer[i])
        if i in done_at:
            s = done_at[i]
            stall[s] = max(0.0, finish[s] - now)
            now += stall[s]
        now += t
    out = []
    for s, d, ins in pairs:
        window = [times[k] for k in range(s + 1, d)]
        out.append(
            Collective(
                name=ins.name,
                kind=ins.opcode.removesuffix("-start"),
                start=s,
                done=d,
                bytes=received_bytes(ins),
                transfer_s=transfer[s],
                window_s=sum(window),
                compute_ops_in_window=sum(1 for w in window if w > 0),
                start_time_s=clock[s],
                done_time_s=clock[d],
                stall_s=stall[s],
            )
        )
    return Overlap(comp.name, clock[-1], flops, out, times)


def busiest(comps: dict[str, hlo.Computation]) -> hlo.Computation:
    """The computation with the most async collectives (the step, or a sampler loop's body)."""
    return max(
        comps.values(),
        key=lambda c: (sum(1 for _ in hlo.iter_async_collectives(c, comps)), c.entry),
    )


def latency_profile(comps: dict[str, hlo.Computation], target: Target) -> str:
    """A profile for XLA GPU's profile-guided latency estimator (`ProfiledInstructionsProto`
    text) from the roofline model: every compute instruction's time and every collective's
    transfer time, so the latency-hiding scheduler starts each transfer early enough to cover
    it (its built-in estimate of a transfer is a few microseconds, whatever its size)."""
    lines = []
    for comp in comps.values():
        for ins in comp.instrs:
            if ins.opcode.endswith("-start") and ins.opcode.startswith(hlo.COLLECTIVES):
                seconds = target.latency_s + received_bytes(ins) / target.link_bytes_per_s
            elif ins.opcode in hlo.FREE_OPS or ins.opcode.endswith("-done"):
                continue
            else:
                seconds = op_time(hlo.op_cost(ins, comp, comps), target)
            lines.append(f'costs {{ name: "{ins.name}" cost_us: {1e6 * seconds:.3f} }}')
    return "\n".join(lines) + "\n"
