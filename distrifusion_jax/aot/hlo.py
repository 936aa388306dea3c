"""Read a compiled (scheduled) HLO module: computations, instructions in schedule order, shapes,
and a roofline cost of each instruction.

The text is `compiled.as_text()` of a program compiled for an accelerator (possibly without the
device: `aot/compile.py`). In a scheduled module each computation lists its instructions in
execution order, so the position of an async collective's `*-start` and `*-done` says what runs
while its transfer is in flight.

Cost of one instruction (`op_cost`): FLOPs of the matrix work it contains (dots, convolutions,
also inside fusions and cuBLAS/cuDNN custom calls: `2 * output elements * contracted size`) and
bytes it moves (operands + results, an upper bound for fusions that read slices). Shape-only
instructions (parameter, bitcast, tuple, get-tuple-element, constant) cost nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator

# dtype -> bytes per element
DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "token": 0,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_NAME = re.compile(r"%([\w.\-]+)")
FREE_OPS = {
    "parameter", "constant", "bitcast", "tuple", "get-tuple-element", "partition-id",
    "replica-id", "after-all", "opt-barrier", "add-dependency",
}  # fmt: skip
COLLECTIVES = ("all-gather", "collective-permute", "all-reduce", "all-to-all", "reduce-scatter")


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def bytes(self) -> float:
        # f8e4m3fn, f8e5m2, ...: one byte
        per = DTYPE_BYTES.get(self.dtype, 1 if self.dtype.startswith("f8") else 4)
        return self.size * per


@dataclasses.dataclass(frozen=True)
class Instr:
    """One HLO instruction: `%name = <shape> opcode(operands), attributes`."""

    name: str
    opcode: str
    arrays: tuple[Array, ...]  # the leaves of the result shape, in order
    operands: tuple[str, ...]
    attrs: str
    args: str = ""  # the text between the parentheses (e.g. a parameter's number)

    @property
    def result_bytes(self) -> float:
        return sum(a.bytes for a in self.arrays)

    def attr(self, key: str) -> str | None:
        """`key=value` attribute (value up to the next top-level comma), or None."""
        m = re.search(rf"\b{re.escape(key)}=", self.attrs)
        if not m:
            return None
        return _balanced_prefix(self.attrs[m.end() :])


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    entry: bool = False

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instrs}


def _matching(text: str, start: int) -> int:
    """Index of the bracket that closes the one at `start`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i
    return len(text) - 1


def _balanced_prefix(text: str) -> str:
    """`text` up to its first comma outside brackets and quotes."""
    depth, quote = 0, False
    for i, c in enumerate(text):
        if c == '"':
            quote = not quote
        elif not quote and c in "({[":
            depth += 1
        elif not quote and c in ")}]":
            depth -= 1
        elif not quote and c == "," and depth == 0:
            return text[:i]
    return text


def parse_instr(line: str) -> Instr | None:
    m = _DEF.match(line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # tuple shape
        end = _matching(rest, 0)
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, paren, rest = rest.partition("(")
    if not paren:
        return None
    close = _matching("(" + rest, 0) - 1
    operands = tuple(_NAME.findall(rest[:close]))
    arrays = tuple(Array(d, tuple(int(x) for x in s.split(",") if x)) for d, s in _ARRAY.findall(shape))
    attrs = rest[close + 1 :].lstrip(", ")
    return Instr(m.group(1), opcode.strip(), arrays, operands, attrs, rest[:close])


def parse_module(text: str) -> dict[str, Computation]:
    """All computations of an HLO module text, instructions in (schedule) order."""
    comps: dict[str, Computation] = {}
    current: list[Instr] | None = None
    name, entry = "", False
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current, name, entry = [], m.group(2), bool(m.group(1))
            continue
        if line.startswith("}"):
            comps[name] = Computation(name, current, entry)
            current = None
            continue
        ins = parse_instr(line)
        if ins is not None:
            current.append(ins)
    return comps


def entry(comps: dict[str, Computation]) -> Computation:
    return next(c for c in comps.values() if c.entry)


def called(ins: Instr) -> list[str]:
    """Computations an instruction calls (fusions, calls, while bodies, async wrappers)."""
    names = []
    for key in ("calls", "body", "to_apply", "branch_computations", "condition"):
        v = ins.attr(key)
        if v:
            names += _NAME.findall(v)
    return names


# ---- cost ---------------------------------------------------------------------------------


def _shape_of(comp: Computation, name: str) -> tuple[int, ...] | None:
    ins = comp.by_name.get(name)
    return ins.arrays[0].dims if ins and ins.arrays else None


def _dims_attr(ins: Instr, key: str) -> list[int]:
    v = ins.attr(key)
    return [int(x) for x in re.findall(r"\d+", v)] if v else []


def dot_flops(ins: Instr, comp: Computation) -> float:
    lhs = _shape_of(comp, ins.operands[0]) if ins.operands else None
    if lhs is None:
        return 0.0
    k = math.prod(lhs[d] for d in _dims_attr(ins, "lhs_contracting_dims") if d < len(lhs))
    return 2.0 * ins.arrays[0].size * k


def conv_flops(ins: Instr, comp: Computation) -> float:
    """2 * output elements * (kernel elements / output features)."""
    if len(ins.operands) < 2:
        return 0.0
    kernel = _shape_of(comp, ins.operands[1])
    labels = ins.attr("dim_labels") or ""
    m = re.match(r"[^_]+_([^-]+)->", labels)
    if kernel is None or not m or "o" not in m.group(1):
        return 0.0
    o = kernel[m.group(1).index("o")]
    return 2.0 * ins.arrays[0].size * math.prod(kernel) / o


def gemm_flops(ins: Instr, comp: Computation) -> float:
    """cuBLAS custom call: contracting dims from its backend config."""
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
    lhs = _shape_of(comp, ins.operands[0]) if ins.operands else None
    if not m or lhs is None:
        return 0.0
    dims = [int(x) for x in json.loads("[" + m.group(1) + "]")]
    return 2.0 * ins.arrays[0].size * math.prod(lhs[d] for d in dims)


def instr_flops(ins: Instr, comp: Computation, comps: dict[str, Computation]) -> float:
    if ins.opcode == "dot":
        return dot_flops(ins, comp)
    if ins.opcode == "convolution":
        return conv_flops(ins, comp)
    if ins.opcode == "custom-call":
        target = ins.attr("custom_call_target") or ""
        if "conv" in target:
            return conv_flops(ins, comp)
        if "gemm" in target or "matmul" in target:
            return gemm_flops(ins, comp)
        return 0.0
    if ins.opcode in ("fusion", "call", "async-start"):
        return sum(
            instr_flops(i, comps[c], comps) for c in called(ins) if c in comps for i in comps[c].instrs
        )
    return 0.0


@dataclasses.dataclass(frozen=True)
class OpCost:
    flops: float
    bytes: float


def trip_count(ins: Instr) -> int:
    """A while loop's known trip count (XLA's backend config), 1 if unknown."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    return int(m.group(1)) if m else 1


def op_cost(ins: Instr, comp: Computation, comps: dict[str, Computation]) -> OpCost:
    """FLOPs and HBM bytes of one instruction of a scheduled computation (loops: body x trips;
    conditionals: the most expensive branch)."""
    if ins.opcode in FREE_OPS or ins.opcode.startswith(COLLECTIVES):
        return OpCost(0.0, 0.0)
    if ins.opcode in ("while", "conditional", "call"):
        parts = [computation_cost(comps[c], comps) for c in called(ins) if c in comps]
        if not parts:
            return OpCost(0.0, 0.0)
        if ins.opcode == "conditional":
            return max(parts, key=lambda c: c.flops + c.bytes)
        n = trip_count(ins) if ins.opcode == "while" else 1
        return OpCost(n * sum(c.flops for c in parts), n * sum(c.bytes for c in parts))
    read = [comp.by_name[o].result_bytes if o in comp.by_name else 0.0 for o in ins.operands]
    if ins.opcode == "fusion":
        read = _sliced_reads(ins, comps, read)
    if ins.opcode in ("dynamic-slice", "slice"):
        read = [ins.result_bytes]
    return OpCost(instr_flops(ins, comp, comps), sum(read) + ins.result_bytes)


_SLICES = ("dynamic-slice", "slice", "gather")


def _sliced_reads(ins: Instr, comps: dict[str, Computation], read: list[float]) -> list[float]:
    """Operand bytes a fusion reads: an operand whose every use inside is a slice costs the
    slices (a loop body reading one block of a large buffer), not the whole buffer."""
    fused = next((comps[c] for c in called(ins) if c in comps), None)
    if fused is None:
        return read
    params = {}
    for i in fused.instrs:
        if i.opcode == "parameter":
            params[i.name] = int(i.args) if i.args.strip().isdigit() else None
    users: dict[str, list[Instr]] = {}
    for i in fused.instrs:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    out = list(read)
    for name, k in params.items():
        uses = users.get(name, [])
        if k is not None and k < len(out) and uses and all(u.opcode in _SLICES for u in uses):
            out[k] = min(out[k], sum(u.result_bytes for u in uses))
    return out


def computation_cost(comp: Computation, comps: dict[str, Computation]) -> OpCost:
    costs = [op_cost(i, comp, comps) for i in comp.instrs]
    return OpCost(sum(c.flops for c in costs), sum(c.bytes for c in costs))


def _tpu_async_collective(ins: Instr, comps: dict[str, Computation], target: str) -> Instr | None:
    """The collective inside a TPU async collective fusion (libtpu's `async-collective-start` /
    `-done`: a fusion whose computation ends in a custom-call to `AsyncCollectiveStart` /
    `AsyncCollectiveDone`), or None for any other instruction."""
    if ins.opcode != "fusion":
        return None
    for name in called(ins):
        inner = comps.get(name)
        if inner and any(f'custom_call_target="{target}"' in i.attrs for i in inner.instrs):
            return next((i for i in inner.instrs if i.opcode in COLLECTIVES), None)
    return None


def iter_async_collectives(
    comp: Computation, comps: dict[str, Computation] | None = None
) -> Iterator[tuple[int, int, Instr]]:
    """(start position, done position, start instruction) of each async collective pair; a
    synchronous collective is its own start and done.

    GPU (and TPU collective-permutes): `*-start` / `*-done` instructions. TPU all-gathers with
    `xla_tpu_enable_async_collective_fusion`: a start fusion and a done fusion (`comps` needed to
    see inside them), paired by libtpu's names (`async-collective-start.N` ends at
    `async-collective-done.N`); the collective inside the start fusion is yielded, and the
    fusions between them that carry the transfer's later steps count as compute.
    """
    where = {ins.name: i for i, ins in enumerate(comp.instrs)}
    fused_starts: dict[str, tuple[int, Instr]] = {}
    for i, ins in enumerate(comp.instrs):
        if ins.opcode in COLLECTIVES:
            yield i, i, ins
        elif ins.opcode.endswith("-done") and ins.operands and ins.operands[0] in where:
            j = where[ins.operands[0]]
            start = comp.instrs[j]
            if start.opcode.startswith(COLLECTIVES):
                yield j, i, start
        elif comps is not None and ins.opcode == "fusion":
            inner = _tpu_async_collective(ins, comps, "AsyncCollectiveStart")
            if inner is not None:
                fused_starts[ins.name.replace("-start", "-done", 1)] = (i, inner)
            elif ins.name in fused_starts and _tpu_async_collective(
                ins, comps, "AsyncCollectiveDone"
            ):
                j, inner = fused_starts.pop(ins.name)
                yield j, i, inner
