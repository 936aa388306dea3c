"""The HLO schedule reader and the overlap measure on hand-written scheduled HLO (no compiler):
FLOPs of dots and convolutions, bytes of collectives, window and simulated hidden fractions."""

from __future__ import annotations

import pytest

from distrifusion_jax.aot import hlo
from distrifusion_jax.aot.overlap import TARGETS, Target, analyze, latency_profile

# A scheduled entry: a 1 MB all-gather in flight over two dots, a 2 MB one with nothing to
# hide behind, and a synchronous permute.
HLO = """HloModule m, is_scheduled=true

%fused (p0: f32[256,512], p1: f32[512,1024]) -> f32[256,1024] {
  %p0 = f32[256,512]{1,0} parameter(0)
  %p1 = f32[512,1024]{1,0} parameter(1)
  ROOT %d = f32[256,1024]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[256,512], b: f32[512,1024], x: bf16[8,4096], y: bf16[16,4096]) -> f32[256,1024] {
  %a = f32[256,512]{1,0} parameter(0)
  %b = f32[512,1024]{1,0} parameter(1)
  %x = bf16[8,4096]{1,0} parameter(2)
  %y = bf16[16,4096]{1,0} parameter(3)
  %ag = (bf16[8,4096]{1,0}, bf16[64,4096]{1,0}) all-gather-start(%x), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %f1 = f32[256,1024]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused
  %f2 = f32[256,1024]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused
  %agd = bf16[64,4096]{1,0} all-gather-done(%ag)
  %ag2 = (bf16[16,4096]{1,0}, bf16[128,4096]{1,0}) all-gather-start(%y), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %ag2d = bf16[128,4096]{1,0} all-gather-done(%ag2)
  %cp = bf16[16,4096]{1,0} collective-permute(%y), source_target_pairs={{0,1},{1,2}}
  ROOT %r = f32[256,1024]{1,0} copy(%f2)
}
"""
SLOW = Target("slow", "cuda", 8, "1x1x8", None, peak_flops=1e12, hbm_bytes_per_s=1e12,
              link_bytes_per_s=1e9, link_note="test", latency_s=0.0, memory_bytes=0)  # fmt: skip


def test_parse_and_costs():
    comps = hlo.parse_module(HLO)
    main = hlo.entry(comps)
    assert [i.opcode for i in main.instrs][4:7] == ["all-gather-start", "fusion", "fusion"]
    f1 = main.by_name["f1"]
    assert hlo.op_cost(f1, main, comps).flops == 2 * 256 * 1024 * 512
    pairs = list(hlo.iter_async_collectives(main))
    assert [(s, d) for s, d, _ in pairs] == [(4, 7), (8, 9), (10, 10)]


def test_window_and_simulated_fractions():
    comps = hlo.parse_module(HLO)
    ov = analyze(hlo.entry(comps), comps, SLOW)
    dot_s = 2 * 256 * 1024 * 512 / 1e12  # flop-bound on this target
    first, second, permute = ov.collectives
    assert first.bytes == 7 / 8 * 64 * 4096 * 2  # received: the other 7 shards
    assert first.window_s == pytest.approx(2 * dot_s)
    assert second.window_s == 0 and permute.window_s == 0
    hidden = min(first.window_s, first.transfer_s)
    assert ov.hidden_window == pytest.approx(hidden / ov.transfer_s)
    # Simulated: the second and the synchronous permute stall for their whole transfer.
    assert second.stall_s == pytest.approx(second.transfer_s)
    assert permute.stall_s == pytest.approx(permute.transfer_s)
    assert ov.hidden_simulated <= ov.hidden_window + 1e-12


def test_latency_profile_names_every_instruction_with_cost():
    comps = hlo.parse_module(HLO)
    text = latency_profile(comps, TARGETS["h200x8"])
    assert 'name: "ag"' in text and 'name: "f1"' in text and 'name: "agd"' not in text


# libtpu's async collective fusions: the all-gather sits inside a start fusion (custom-call
# AsyncCollectiveStart) and a done fusion; a compute fusion scheduled between them hides it.
TPU_HLO = """HloModule t, is_scheduled=true

%ag_start (p: bf16[8,4096]) -> (bf16[8,4096], bf16[64,4096]) {
  %p = bf16[8,4096]{1,0} parameter(0)
  %g = bf16[64,4096]{1,0} all-gather(%p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  ROOT %c = (bf16[8,4096]{1,0}, bf16[64,4096]{1,0}) custom-call(%g), custom_call_target="AsyncCollectiveStart"
}

%ag_done (p0: bf16[8,4096], p1: bf16[64,4096]) -> bf16[64,4096] {
  %p0 = bf16[8,4096]{1,0} parameter(0)
  %p1 = bf16[64,4096]{1,0} parameter(1)
  %g = bf16[64,4096]{1,0} all-gather(%p0), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  ROOT %c = bf16[64,4096]{1,0} custom-call(%p0, %p1, %g), custom_call_target="AsyncCollectiveDone"
}

%fused (p0: f32[256,512], p1: f32[512,1024]) -> f32[256,1024] {
  %p0 = f32[256,512]{1,0} parameter(0)
  %p1 = f32[512,1024]{1,0} parameter(1)
  ROOT %d = f32[256,1024]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[256,512], b: f32[512,1024], x: bf16[8,4096]) -> f32[256,1024] {
  %a = f32[256,512]{1,0} parameter(0)
  %b = f32[512,1024]{1,0} parameter(1)
  %x = bf16[8,4096]{1,0} parameter(2)
  %async-collective-start.3 = (bf16[8,4096]{1,0}, bf16[64,4096]{1,0}) fusion(%x), kind=kCustom, calls=%ag_start
  %f1 = f32[256,1024]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused
  %s0 = bf16[8,4096]{1,0} get-tuple-element(%async-collective-start.3), index=0
  %s1 = bf16[64,4096]{1,0} get-tuple-element(%async-collective-start.3), index=1
  %async-collective-done.3 = bf16[64,4096]{1,0} fusion(%s0, %s1), kind=kCustom, calls=%ag_done
  ROOT %r = f32[256,1024]{1,0} copy(%f1)
}
"""


def test_tpu_async_collective_fusions_pair_and_hide():
    comps = hlo.parse_module(TPU_HLO)
    main = hlo.entry(comps)
    assert list(hlo.iter_async_collectives(main)) == []  # the fusions need `comps` to be seen
    [(s, d, inner)] = list(hlo.iter_async_collectives(main, comps))
    assert (main.instrs[s].name, main.instrs[d].name) == (
        "async-collective-start.3",
        "async-collective-done.3",
    )
    assert inner.opcode == "all-gather"
    [c] = analyze(main, comps, SLOW).collectives
    dot_s = 2 * 256 * 1024 * 512 / 1e12
    assert c.bytes == 7 / 8 * 64 * 4096 * 2
    assert c.window_s == pytest.approx(dot_s)  # the start/done fusions themselves cost nothing
