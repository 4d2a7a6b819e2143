"""Ahead-of-time compile check: every attention, pooling and rotary variant the launchers can pick,
compiled for sm_90 (H100) and sm_80 (A100) with fp16 and bf16 inputs, fits the hardware.

No GPU needed: Triton compiles to cubins for a named target, and cuobjdump reads the resources back
(tests/triton_aot.py). "Every variant" is the full tile table (triton_kernels/flash_attention.py
TILE_TABLE, both ALiBi on and off), the pooling tile for the supported hidden sizes and the rotary tile
for the NomicBERT head layouts (aot.ROTARY_SHAPES). The table for the report is printed by
bench/compile_check.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from longembed.triton_kernels import flash_attention
from tests import triton_aot as aot


@pytest.fixture(scope="module")
def usages() -> list[aot.Usage]:
    return aot.compile_all(aot.attention_variants() + aot.pooling_variants() + aot.rotary_variants())


def test_every_variant_is_enumerated():
    """The compiled set is what the launcher can run: each BLOCK_M x autotune config that its
    own pruning (flash_attention.keep) lets through, per GPU family and head_dim, x dtypes x ALiBi."""
    runnable = {
        (arch, head_dim, block_m, conf.kwargs["BLOCK_N"], conf.num_warps, conf.num_stages)
        for arch in (90, 80)
        for head_dim in flash_attention.HEAD_DIMS
        for block_m in flash_attention.BLOCK_MS
        for conf in flash_attention.ATTENTION_CONFIGS
        if block_m in flash_attention.TILE_TABLE[flash_attention.gpu_family((arch // 10, 0))][head_dim]
        and flash_attention.keep(conf, flash_attention.gpu_family((arch // 10, 0)), head_dim, block_m)
    }
    variants = aot.attention_variants()
    compiled = {
        (v.arch, c["HEAD_DIM"], c["BLOCK_M"], c["BLOCK_N"], v.num_warps, v.num_stages)
        for v in variants
        for c in [dict(v.constexprs)]
    }
    assert compiled == runnable
    assert len(variants) == len(runnable) * 2 * 2  # x fp16/bf16 x ALiBi on/off, no duplicates
    assert {v.arch for v in variants} == {90, 80} and {v.dtype for v in variants} == {"fp16", "bf16"}


def test_rotary_variants_cover_nomic_embed_text():
    variants = aot.rotary_variants()
    assert {v.arch for v in variants} == {90, 80} and {v.dtype for v in variants} == {"fp16", "bf16"}
    # nomic-embed-text: 12 heads of 64 -> all 16 (padded) heads and 32 rotation pairs in one tile.
    assert (("BLOCK_H", 16), ("BLOCK_HALF", 32)) in {v.constexprs for v in variants}


def test_no_register_spills(usages):
    spilling = [f"{u.variant.label()}: {u.spill_bytes} B" for u in usages if u.spill_bytes]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_shared_memory_within_each_architecture_limit(usages):
    over = [
        f"{u.variant.label()}: {u.shared_bytes} B > {aot.SMEM_PER_BLOCK[u.variant.arch]} B"
        for u in usages
        if u.shared_bytes > aot.SMEM_PER_BLOCK[u.variant.arch]
    ]
    assert not over, "shared memory over the per-block limit:\n" + "\n".join(over)


def test_every_variant_can_be_resident(usages):
    # A register count or tile that leaves zero resident blocks would fail at launch.
    assert all(0 < u.registers <= 255 for u in usages)
    assert all(u.occupancy > 0 for u in usages)


def test_occupancy_model():
    # 128 regs x 128 threads = 16K registers per block -> 4 blocks of 4 warps = 16/64 warps.
    assert aot.occupancy(90, registers=128, shared_bytes=0, num_warps=4) == 16 / 64
    # Shared memory binds first: 100 KB blocks on a 164 KB A100 SM -> 1 block.
    assert aot.occupancy(80, registers=32, shared_bytes=100 * 1024, num_warps=4) == 4 / 64
    # The warp limit: 32 regs x 1 warp blocks are capped at 32 blocks per SM.
    assert aot.occupancy(90, registers=32, shared_bytes=0, num_warps=1) == 32 / 64
