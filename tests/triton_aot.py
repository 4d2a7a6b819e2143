"""Ahead-of-time compilation of every kernel variant the launchers can pick, for real GPU targets.

No GPU is needed: `triton.compile` lowers a kernel to PTX and a cubin for sm_90 (H100) or sm_80
(A100), and the wheel's `cuobjdump --dump-resource-usage` reports registers, spill space (LOCAL /
STACK) and static shared memory. Triton's own metadata adds the dynamic shared memory of the
pipelined tiles. Used by tests/test_triton_compile.py (asserts) and bench/compile_check.py (table).
It reaches into Triton's compiler internals (ASTSource, GPUTarget), so it is test and benchmark
tooling beside the tests, not part of the installed product.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longembed.triton_kernels import flash_attention, pooling, rotary

ARCHS = (90, 80)
DTYPES = ("fp16", "bf16")
# Hardware limits per compute capability (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability"): opt-in shared memory per block, shared memory per SM, 64K 32-bit registers
# and at most 64 resident warps / 32 blocks per SM on both.
SMEM_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024}
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024  # the runtime keeps 1 KB per resident block for itself
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
POOL_DIMS = (384, 512, 768, 1024)  # MiniLM, jina-small, jina-base / BERT-base, BERT-large hidden sizes
ROTARY_SHAPES = ((12, 64), (16, 64), (8, 32))  # (heads, head_dim): nomic-embed-text, larger, smaller


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation: a kernel, its constexprs, launch options, dtype and target."""

    kernel: str  # "attention" | "pooling" | "rotary"
    dtype: str
    arch: int
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int

    def label(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel} sm_{self.arch} {self.dtype} {consts} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class Usage:
    variant: Variant
    registers: int
    spill_bytes: int  # LOCAL + STACK per thread
    shared_bytes: int  # static + dynamic per block
    occupancy: float  # resident warps / max warps per SM, from registers and shared memory

    def fits(self) -> bool:
        return self.spill_bytes == 0 and self.shared_bytes <= SMEM_PER_BLOCK[self.variant.arch]


def attention_variants() -> list[Variant]:
    """Every (dtype, target, head_dim, BLOCK_M, ALiBi on/off, autotune config) the launcher can run."""
    variants = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for head_dim in flash_attention.HEAD_DIMS:
                by_block_m = flash_attention.TILE_TABLE[flash_attention.gpu_family((arch // 10, 0))][head_dim]
                for block_m, tiles in by_block_m.items():
                    for has_alibi in (True, False):
                        for block_n, warps, stages in tiles:
                            consts = {
                                "HEAD_DIM": head_dim,
                                "BLOCK_M": block_m,
                                "BLOCK_N": block_n,
                                "HAS_ALIBI": has_alibi,
                            }
                            variants.append(
                                Variant("attention", dtype, arch, tuple(consts.items()), warps, stages)
                            )
    return variants


def pooling_variants() -> list[Variant]:
    variants = []
    tiles = sorted({(*pooling.pool_config(dim), triton.next_power_of_2(dim)) for dim in POOL_DIMS})
    for arch in ARCHS:
        for dtype in DTYPES:
            for block_t, warps, block_d in tiles:
                consts = {"BLOCK_T": block_t, "BLOCK_D": block_d}
                variants.append(Variant("pooling", dtype, arch, tuple(consts.items()), warps, 3))
    return variants


def rotary_variants() -> list[Variant]:
    variants = []
    tiles = sorted({rotary.rotary_config(heads, head_dim) for heads, head_dim in ROTARY_SHAPES})
    for arch in ARCHS:
        for dtype in DTYPES:
            for block_h, block_half, warps in tiles:
                consts = {"BLOCK_H": block_h, "BLOCK_HALF": block_half}
                variants.append(Variant("rotary", dtype, arch, tuple(consts.items()), warps, 3))
    return variants


def _signature(variant: Variant) -> tuple[triton.JITFunction, dict[str, str]]:
    consts = dict(variant.constexprs)
    if variant.kernel == "attention":
        fn = flash_attention._alibi_attn_fwd
        pointers = {"Q": variant.dtype, "K": variant.dtype, "V": variant.dtype, "Out": variant.dtype}
        pointers |= {"Slopes": "fp32", "CuSeqlens": "i32", "BlockSeq": "i32", "BlockStart": "i32"}
        floats = {"qk_scale"}
    elif variant.kernel == "pooling":
        fn = pooling._segment_mean_pool_normalize
        pointers = {"Hidden": variant.dtype, "Spans": "i32", "Out": "fp32"}
        floats = {"eps"}
    else:
        fn = rotary._rotary_qk
        pointers, floats = {"QKV": variant.dtype, "Cos": "fp32", "Sin": "fp32"}, set()
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    return fn, signature


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, LOCAL + STACK bytes, static shared bytes) from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[1]))
    return int(fields["REG"]), int(fields["STACK"]) + int(fields["LOCAL"]), int(fields["SHARED"])


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> float:
    """Theoretical occupancy: resident warps / 64, limited by registers, shared memory and block count."""
    regs_per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256 registers
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM[arch] // (shared_bytes + SMEM_RESERVED_PER_BLOCK)
    blocks = min(by_regs, by_smem, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps)
    return blocks * num_warps / MAX_WARPS_PER_SM


def compile_variant(variant: Variant) -> Usage:
    fn, signature = _signature(variant)
    # Mirror the launcher's runtime specialisation for the encoder's layouts: torch allocations are
    # 16-byte aligned and every token/head stride is a multiple of 16 elements (head_dim 32/64/128,
    # hidden sizes multiples of 16), so Triton marks pointers and those ints divisible by 16, which is
    # what lets it vectorise the tile loads. Without the hints the cubin would be a different, slower one.
    aligned = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or name.startswith("stride") or name == "dim"
    }
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=dict(variant.constexprs), attrs=aligned),
        target=GPUTarget("cuda", variant.arch, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
    registers, spills, static_shared = _resource_usage(kernel.asm["cubin"])
    shared = kernel.metadata.shared + static_shared  # dynamic (requested at launch) + static
    return Usage(
        variant, registers, spills, shared, occupancy(variant.arch, registers, shared, variant.num_warps)
    )


def compile_all(variants: list[Variant], workers: int | None = None) -> list[Usage]:
    """Compile in parallel processes (each compile is single-threaded LLVM/ptxas work)."""
    workers = workers or max(1, min(len(variants), os.cpu_count() or 1))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's warning; fusion is the default
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_variant, variants, chunksize=4))
