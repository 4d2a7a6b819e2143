"""Rotary position embedding applied in place to the q and k parts of a packed QKV projection, in Triton.

One program per token: it loads the token's cos/sin row once and rotates every head of q and of k
(GPT-NeoX halves: the pair (i, i + head_dim / 2) turns by angle i), in fp32, storing back into the
projection. So q and k are read and written once, with no fp32 copies, no concatenation and no
separate q / k tensors; v is not touched. The PyTorch path is `torch_ops.rotary_qk_torch_`.

cos and sin are (total_tokens, head_dim / 2) fp32 tables: the encoder computes the angles (position x
inverse frequency, per sequence under dynamic NTK) in fp32 once per batch and every layer reuses them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256


@triton.jit
def _rotary_qk(
    QKV,  # (T, 3, heads, head_dim), last dim contiguous
    Cos,  # (T, half) fp32
    Sin,
    stride_t,
    stride_which,  # q -> k
    stride_h,
    stride_c,
    heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < half)
    cos = tl.load(Cos + token * stride_c + offs_d, mask=offs_d < half, other=1.0)[None, :]
    sin = tl.load(Sin + token * stride_c + offs_d, mask=offs_d < half, other=0.0)[None, :]
    first = QKV + token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    for which in range(2):  # q, then k
        lo = first + which * stride_which
        x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(lo + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(lo, (x1 * cos - x2 * sin).to(QKV.dtype.element_ty), mask=mask)
        tl.store(lo + half, (x2 * cos + x1 * sin).to(QKV.dtype.element_ty), mask=mask)


def rotary_config(heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): all heads of one token in one tile, about 4 values of each of the
    tile's tensors per thread (x1, x2 of q and of k, cos, sin stay in registers)."""
    block_h, block_half = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim // 2)
    return block_h, block_half, max(1, min(8, block_h * block_half // 128))


def rotary_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q = qkv[:, 0] and k = qkv[:, 1] in place; qkv: (T, 3, heads, head_dim) fp16/bf16/fp32
    with contiguous head rows, head_dim even and <= 256; cos, sin: (T, head_dim / 2) fp32."""
    if qkv.dim() != 4 or qkv.shape[1] != 3 or qkv.stride(3) != 1:
        raise ValueError(f"qkv must be (T, 3, heads, head_dim) with contiguous heads, got {tuple(qkv.shape)}")
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"qkv must be fp16, bf16 or fp32, got {qkv.dtype}")
    total, _, heads, head_dim = qkv.shape
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be even and <= {MAX_HEAD_DIM}, got {head_dim}")
    half = head_dim // 2
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (total, half) or table.dtype != torch.float32 or table.stride(1) != 1:
            got = f"{table.dtype} {tuple(table.shape)}"
            raise ValueError(f"{name} must be ({total}, {half}) float32 with contiguous rows, got {got}")
    if cos.stride(0) != sin.stride(0):
        raise ValueError("cos and sin must share a row stride")
    if total == 0:
        return
    block_h, block_half, warps = rotary_config(heads, head_dim)
    _rotary_qk[(total,)](
        qkv, cos, sin, qkv.stride(0), qkv.stride(1), qkv.stride(2), cos.stride(0), heads, half,
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=warps,
    )  # fmt: skip
