"""Fused mean pooling + L2 normalisation over spans of a packed batch, in Triton.

One program per span: it walks the span's rows in BLOCK_T-row blocks, accumulates in fp32, and
normalises the mean before the single store, so the (m, dim) result is written once and the hidden
states are read once. Spans are [start, end) row offsets into the packed (total_tokens, dim) tensor
and may overlap (late chunking with overlapping windows), so this also pools whole sequences
(spans from `cu_seqlens`).

Sums are spelled `tl.reduce(x, axis, tl.standard._sum_combine)`, which is what `tl.sum` compiles to:
Triton's interpreter cannot call the @jit standard library (`tl.sum`, `tl.zeros`) when `triton` was
imported before TRITON_INTERPRET was set, while builtins (`tl.reduce`, `tl.full`) always run (see
triton_kernels/dispatch.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton import knobs

# F.normalize's default: x / max(||x||, eps).
NORM_EPS = 1e-12
MAX_DIM = 4096


@triton.jit
def _segment_mean_pool_normalize(
    Hidden,
    Spans,  # (m, 2) int32 [start, end) rows
    Out,  # (m, dim) fp32
    stride_ht,
    stride_om,
    dim,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    span = tl.program_id(0)
    start = tl.load(Spans + 2 * span)
    end = tl.load(Spans + 2 * span + 1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_d[None, :] < dim
    acc = tl.full([BLOCK_T, BLOCK_D], 0.0, dtype=tl.float32)  # reduced over rows once, after the loop
    for row in range(start, end, BLOCK_T):
        rows = row + offs_t
        ptrs = Hidden + rows.to(tl.int64)[:, None] * stride_ht + offs_d[None, :]
        acc += tl.load(ptrs, mask=(rows[:, None] < end) & col_ok, other=0.0).to(tl.float32)
    mean = tl.reduce(acc, 0, tl.standard._sum_combine) / (end - start).to(tl.float32)
    norm = tl.sqrt(tl.reduce(mean * mean, 0, tl.standard._sum_combine))
    tl.store(Out + span * stride_om + offs_d, mean / tl.maximum(norm, eps), mask=offs_d < dim)


def pool_config(dim: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for a hidden size: keep the fp32 accumulator near 32 values per thread."""
    if knobs.runtime.interpret:
        return 16, 4
    block_d = triton.next_power_of_2(dim)
    warps = 8 if block_d >= 2048 else 4
    return max(1, (32 * 32 * warps) // block_d), warps


def segment_mean_pool_normalize(hidden: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Mean of hidden rows [start, end) per span (fp32 accumulation), L2-normalised; (m, dim) float32.

    hidden: (total_tokens, dim) fp16/bf16/fp32 with contiguous rows, dim <= 4096; spans: (m, 2) integer
    row offsets, each 0 <= start < end <= total_tokens (checked: an empty span has no mean).
    """
    if hidden.dim() != 2 or hidden.stride(1) != 1:
        raise ValueError(
            f"hidden must be (total_tokens, dim) with contiguous rows, got {tuple(hidden.shape)}"
        )
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"hidden must be fp16, bf16 or fp32, got {hidden.dtype}")
    if spans.dim() != 2 or spans.shape[1] != 2 or spans.dtype.is_floating_point:
        raise ValueError(f"spans must be an (m, 2) integer tensor, got {spans.dtype} {tuple(spans.shape)}")
    total, dim = hidden.shape
    if dim > MAX_DIM:
        raise ValueError(f"hidden size {dim} is above the kernel's {MAX_DIM}")
    out = torch.empty((spans.shape[0], dim), dtype=torch.float32, device=hidden.device)
    if spans.shape[0] == 0:
        return out
    start, end = spans[:, 0], spans[:, 1]
    if bool(((start < 0) | (end <= start) | (end > total)).any()):
        raise ValueError(f"every span needs 0 <= start < end <= {total} (at least one token)")
    spans32 = spans.to(device=hidden.device, dtype=torch.int32).contiguous()
    block_t, warps = pool_config(dim)
    _segment_mean_pool_normalize[(spans32.shape[0],)](
        hidden, spans32, out, hidden.stride(0), out.stride(0), dim, NORM_EPS,
        BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(dim), num_warps=warps,
    )  # fmt: skip
    return out


def segment_mean_pool_normalize_reference(hidden: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Naive PyTorch: one fp32 mean per span, then F.normalize."""
    means = [hidden[int(s) : int(e)].to(torch.float32).mean(0) for s, e in spans.tolist()]
    if not means:
        return hidden.new_zeros((0, hidden.shape[1]), dtype=torch.float32)
    return F.normalize(torch.stack(means), p=2.0, dim=-1, eps=NORM_EPS)
