"""Varlen ALiBi flash attention (forward, bidirectional) for packed sequences, in Triton.

Layout follows the Triton fused-attention tutorial (python/tutorials/06-fused-attention.py): private
jit kernels -> autotune configs with a `keep()` filter -> public launcher -> naive PyTorch reference.

Differences from the tutorial: no causal mask (an encoder attends to every key of its sequence); many
sequences of very different lengths in one launch (packed (total_tokens, heads, head_dim) tensors with
`cu_seqlens` offsets, a host-built table maps each query block to its sequence so that no program is
spent on padding); the symmetric ALiBi bias -m_h * |i - j| of JinaBERT is computed per tile from one
slope per head and never materialised. Softmax runs online in fp32 in base 2: the softmax scale and the
ALiBi slope are both pre-multiplied by log2(e), so each score costs one exp2.

Row max/sum are spelled `tl.reduce(x, 1, tl.standard._elementwise_max / _sum_combine)`, which is what
`tl.max` / `tl.sum` compile to, and zeros are `tl.full(..., 0.0)`: Triton's interpreter cannot call
the @jit standard library (`tl.max`, `tl.sum`, `tl.zeros`) when `triton` was imported before
TRITON_INTERPRET was set (see triton_kernels/dispatch.py), while builtins always run.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl
from triton import knobs

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attn_tile(
    acc,
    l_i,
    m_i,
    q,
    K_seq,
    V_seq,
    offs_m,
    offs_n,
    offs_d,
    start_n,
    seqlen,
    stride_kt,
    stride_vt,
    qk_scale,
    slope,
    HAS_ALIBI: tl.constexpr,
    MASK_KEYS: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) step of the online softmax; keys start_n .. start_n + BLOCK_N."""
    cols = start_n + offs_n
    k_ptrs = K_seq + cols[None, :] * stride_kt + offs_d[:, None]  # (HEAD_DIM, BLOCK_N)
    v_ptrs = V_seq + cols[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, HEAD_DIM)
    if MASK_KEYS:  # only the last, partial key block pays for bounds checks
        k = tl.load(k_ptrs, mask=cols[None, :] < seqlen, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < seqlen, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, k) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if HAS_ALIBI:
        dist = tl.abs(offs_m[:, None] - cols[None, :]).to(tl.float32)
        qk -= slope * dist
    if MASK_KEYS:
        qk = tl.where(cols[None, :] < seqlen, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["SEQ_BUCKET"])  # only an autotune key: never worth a recompile
def _alibi_attn_fwd(
    Q,
    K,
    V,
    Out,
    Slopes,  # (heads,) fp32; unused without ALiBi
    CuSeqlens,  # (n + 1,) int32
    BlockSeq,  # (n_blocks,) int32: the sequence each query block belongs to
    BlockStart,  # (n_blocks,) int32: the block's first query row, relative to its sequence
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    qk_scale,  # softmax scale * log2(e)
    SEQ_BUCKET,  # power of two >= the longest sequence: autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    tl.static_assert(BLOCK_N <= 128)
    tl.static_assert(HEAD_DIM % 32 == 0)
    block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(BlockSeq + block)
    m_start = tl.load(BlockStart + block)
    seq_start = tl.load(CuSeqlens + seq)
    seqlen = tl.load(CuSeqlens + seq + 1) - seq_start

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seqlen
    # The sequence's base pointers carry the 64-bit part of the offset (a packed batch can pass 2^31
    # elements); offsets inside one sequence stay 32-bit, which keeps the pointer tiles in few registers.
    # The launcher checks that seqlen * token stride fits in int32.
    seq_start64 = seq_start.to(tl.int64)
    Q_seq = Q + seq_start64 * stride_qt + head * stride_qh
    K_seq = K + seq_start64 * stride_kt + head * stride_kh
    V_seq = V + seq_start64 * stride_vt + head * stride_vh
    O_seq = Out + seq_start64 * stride_ot + head * stride_oh
    q = tl.load(Q_seq + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok, other=0.0)

    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + head) * 1.4426950408889634  # bias in log2 units, like qk_scale
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)

    # Bidirectional: every query needs every key of its sequence, so nothing is skipped. Full key
    # blocks run unmasked; the partial tail (if any) runs once with masks.
    full_end = (seqlen // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, K_seq, V_seq, offs_m, offs_n, offs_d, start_n, seqlen, stride_kt, stride_vt,
            qk_scale, slope, HAS_ALIBI, False,
        )  # fmt: skip
    if full_end < seqlen:
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, K_seq, V_seq, offs_m, offs_n, offs_d, full_end, seqlen, stride_kt, stride_vt,
            qk_scale, slope, HAS_ALIBI, True,
        )  # fmt: skip

    out = acc / l_i[:, None]  # every row saw key 0 of its sequence, so l_i >= 1
    o_ptrs = O_seq + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok)


# Autotune candidates (BLOCK_N, num_warps, num_stages) per GPU family, head_dim and BLOCK_M. Kept
# only where the AOT compile check (bench/compile_check.py) shows no register spills and shared memory
# within the family's per-block limit: on sm_80, head_dim 128 spills with 4 warps or 128-row tiles, and
# head_dim 32 spills with 2 stages; on sm_90 wgmma keeps the accumulators in fewer registers, so 3 stages fit.
# 4 warps (one warpgroup) per 64 query rows otherwise.
TILE_TABLE: dict[str, dict[int, dict[int, list[tuple[int, int, int]]]]] = {
    "sm90": {
        32: {64: [(64, 4, 3), (128, 4, 3)], 128: [(64, 8, 3), (128, 8, 3)]},
        64: {64: [(64, 4, 3), (128, 4, 3)], 128: [(64, 8, 3), (128, 8, 3)]},
        128: {64: [(32, 4, 3), (64, 4, 3)], 128: [(32, 8, 3), (64, 8, 3)]},
    },
    "sm80": {
        32: {64: [(64, 4, 3), (128, 4, 3)], 128: [(64, 8, 3), (128, 8, 3)]},
        64: {64: [(64, 4, 2), (128, 4, 2)], 128: [(64, 8, 2), (128, 8, 2)]},
        128: {64: [(32, 8, 2), (64, 8, 2)]},  # every 128-row tile spills here
    },
}
INTERPRETER_TILE = (16, 16, 4, 1)  # BLOCK_M, BLOCK_N, warps, stages: the interpreter runs what it tunes


def gpu_family(capability: tuple[int, int]) -> str:
    """'sm90' for Hopper and newer, 'sm80' for Ampere/Ada (the two tuned tile tables)."""
    return "sm90" if capability[0] >= 9 else "sm80"


def keep(conf: triton.Config, family: str, head_dim: int, block_m: int) -> bool:
    """Whether the autotuner may try `conf` for this GPU family, head_dim and BLOCK_M."""
    tile = (conf.kwargs["BLOCK_N"], conf.num_warps, conf.num_stages)
    return tile in TILE_TABLE[family][head_dim][block_m]


if knobs.runtime.interpret:
    _, _bn, _w, _s = INTERPRETER_TILE
    ATTENTION_CONFIGS = [triton.Config({"BLOCK_N": _bn}, num_warps=_w, num_stages=_s)]
    BLOCK_MS = (INTERPRETER_TILE[0],)
else:
    _tiles = sorted(
        {t for fam in TILE_TABLE.values() for by_m in fam.values() for ts in by_m.values() for t in ts}
    )
    ATTENTION_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in _tiles]
    BLOCK_MS = (64, 128)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    if knobs.runtime.interpret:
        return configs
    args = {**named_args, **kwargs}
    family = gpu_family(torch.cuda.get_device_capability(args["Q"].device))
    return [c for c in configs if keep(c, family, args["HEAD_DIM"], args["BLOCK_M"])]


_alibi_attn_fwd_tuned = triton.autotune(
    configs=ATTENTION_CONFIGS,
    key=["SEQ_BUCKET", "HEAD_DIM", "BLOCK_M", "HAS_ALIBI"],
    prune_configs_by={"early_config_prune": _prune},
)(_alibi_attn_fwd)


def choose_block_m(lengths: torch.Tensor, family: str, head_dim: int) -> int:
    """The largest query tile the family has for head_dim, or the smallest when the sequences are short
    enough (mean < 128 tokens) that big tiles would be mostly padding."""
    if knobs.runtime.interpret:
        return INTERPRETER_TILE[0]
    available = sorted(TILE_TABLE[family][head_dim])
    mean_len = float(lengths.float().mean()) if lengths.numel() else 0.0
    return available[0] if mean_len < 128 else available[-1]


def _block_table(lengths: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first row) of every BLOCK_M-row query block, sequences in order (host tensors)."""
    n_blocks = (lengths + block_m - 1) // block_m
    seq = torch.repeat_interleave(torch.arange(len(lengths)), n_blocks)
    first_block = torch.cumsum(n_blocks, 0) - n_blocks
    start = (torch.arange(len(seq)) - first_block[seq]) * block_m
    return seq.to(torch.int32), start.to(torch.int32)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one (total_tokens, heads, head_dim) shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype among {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.float32 and q.is_cuda and not knobs.runtime.interpret:
        raise TypeError(
            "fp32 attention on CUDA belongs to the PyTorch path (LONGEMBED_KERNELS=auto or torch): an fp32 "
            "flash kernel spills registers on sm_80/sm_90; the fp32 variant serves the interpreter tests"
        )
    if q.shape[2] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {q.shape[2]}")
    if any(t.stride(2) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v need a contiguous last (head_dim) dimension")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise TypeError(
            f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if any(t.device != q.device for t in (k, v, cu_seqlens)):
        raise ValueError("q, k, v and cu_seqlens must be on one device")
    if alibi_slopes is not None and (alibi_slopes.shape != (q.shape[1],) or alibi_slopes.device != q.device):
        raise ValueError(
            f"alibi_slopes must be ({q.shape[1]},) on {q.device}, got {tuple(alibi_slopes.shape)}"
        )


def alibi_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional attention over packed sequences, ALiBi bias -slope_h * |i - j| computed in-kernel.

    q, k, v: (total_tokens, heads, head_dim) fp16/bf16 (fp32 only under TRITON_INTERPRET, for tests),
    head_dim 32/64/128, last dim contiguous;
    cu_seqlens: (n + 1,) int32 offsets of each sequence (first 0, last total_tokens, non-decreasing);
    max_seqlen: accepted for the varlen-attention signature; the launcher reads the true longest length
    from cu_seqlens (it picks the autotune bucket); alibi_slopes: (heads,) or None for plain attention;
    scale: softmax scale, default 1/sqrt(head_dim). Returns (total_tokens, heads, head_dim) in q's dtype.
    """
    _check_inputs(q, k, v, cu_seqlens, alibi_slopes)
    total, heads, head_dim = q.shape
    out = torch.empty_like(q)
    if total == 0:
        return out
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # One device->host copy per call: the checks, the tile choice and the block table all need host
    # values, and fetching them one by one would stall the GPU queue several times per layer.
    bounds = cu_seqlens.to("cpu", torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    if int(bounds[0]) != 0 or int(bounds[-1]) != total or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to total_tokens={total}, got {bounds.tolist()[:8]}...")
    longest = int(lengths.max())
    if longest * max(t.stride(0) for t in (q, k, v)) >= 2**31:
        raise ValueError(
            "a sequence spans more than 2^31 elements; the kernel's in-sequence offsets are int32"
        )
    family = gpu_family(torch.cuda.get_device_capability(q.device)) if q.is_cuda else "sm80"
    block_m = choose_block_m(lengths, family, head_dim)
    block_seq, block_start = (t.to(q.device) for t in _block_table(lengths, block_m))
    slopes = (
        alibi_slopes.to(torch.float32).contiguous()
        if alibi_slopes is not None
        else q.new_empty(0, dtype=torch.float32)
    )
    grid = (block_seq.numel(), heads)
    _alibi_attn_fwd_tuned[grid](
        q, k, v, out, slopes, cu_seqlens, block_seq, block_start,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E, triton.next_power_of_2(longest),
        HEAD_DIM=head_dim, BLOCK_M=block_m, HAS_ALIBI=alibi_slopes is not None,
    )  # fmt: skip
    return out


def alibi_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Naive PyTorch: per sequence, fp32 scores (heads, n, n) + dense ALiBi bias, softmax, @ v."""
    del max_seqlen  # same signature as the kernel; the reference reads lengths from cu_seqlens
    head_dim = q.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1).to(torch.float32) for t in (q, k, v))  # (heads, n, d)
        scores = qs @ ks.transpose(1, 2) * scale
        if alibi_slopes is not None:
            pos = torch.arange(end - start, device=q.device, dtype=torch.float32)
            scores = (
                scores - alibi_slopes.to(torch.float32)[:, None, None] * (pos[:, None] - pos[None, :]).abs()
            )
        out[start:end] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1).to(q.dtype)
    return out
