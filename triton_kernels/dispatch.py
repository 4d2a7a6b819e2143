"""Pick the Triton kernel or the PyTorch path for each op."""

from __future__ import annotations

import os

import torch

from triton_kernels.torch_ops import mean_pool_normalize_torch, varlen_attention_torch

_CHOICES = ("auto", "triton", "torch")


def backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`, honouring LONGEMBED_KERNELS."""
    choice = os.environ.get("LONGEMBED_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"LONGEMBED_KERNELS must be one of {_CHOICES}, got {choice!r}")
    return "torch" if choice == "auto" else choice


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional attention on packed (total_tokens, heads, head_dim) tensors."""
    return varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, scale)


def mean_pool_normalize(hidden: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Per-span mean (fp32 accumulation) fused with L2 normalisation; (m, dim) float32."""
    return mean_pool_normalize_torch(hidden, spans)
