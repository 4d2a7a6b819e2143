"""PyTorch implementations of the packed (varlen) ops: the path used on CPU and wherever Triton is off.

Same signatures as the Triton kernels. These are the fast PyTorch paths, not the naive references the
kernels are tested against: attention runs on `scaled_dot_product_attention`, and the ALiBi bias is
materialised only for a bounded block of queries at a time, so one 8192-token document costs
O(block x seqlen) extra memory instead of O(heads x seqlen^2).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# Upper bound on elements of a materialised bias/score block (fp32: 4 bytes each, so 128 MiB).
_BLOCK_ELEMENTS = 32 * 1024 * 1024


def varlen_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional attention over packed sequences.

    q, k, v: (total_tokens, heads, head_dim); cu_seqlens: (n + 1,) int offsets of each sequence;
    alibi_slopes: (heads,) or None for plain attention. Returns (total_tokens, heads, head_dim).

    Consecutive sequences of equal length are viewed as one (count, heads, length, head_dim) batch:
    no gather, no padding, no mask. The encoder sorts batches by length, so runs are long.
    """
    _, heads, head_dim = q.shape
    out = torch.empty_like(q)
    for start, count, length in _equal_length_runs(cu_seqlens):
        rows = slice(start, start + count * length)
        qr, kr, vr = (t[rows].view(count, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        ctx = _attend(qr, kr, vr, alibi_slopes, scale)  # (count, heads, length, head_dim)
        out[rows] = ctx.transpose(1, 2).reshape(count * length, heads, head_dim)
    return out


def _equal_length_runs(cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first row, number of sequences, length) for each maximal run of equal-length sequences."""
    offsets = cu_seqlens.tolist()
    runs: list[tuple[int, int, int]] = []
    for a, b in itertools.pairwise(offsets):
        if runs and runs[-1][2] == b - a:
            first, count, length = runs[-1]
            runs[-1] = (first, count + 1, length)
        else:
            runs.append((a, 1, b - a))
    return runs


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """(count, heads, n, head_dim) sequences of one length; with ALiBi, scores are built for a bounded
    block of sequences and queries at a time, so memory stays O(block x n), not O(heads x n^2)."""
    if slopes is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    count, heads, n, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    q_block = max(1, min(n, _BLOCK_ELEMENTS // (heads * n)))
    seq_block = max(1, _BLOCK_ELEMENTS // (heads * n * n))
    pos = torch.arange(n, device=q.device)
    neg_slopes = -slopes.to(device=q.device, dtype=torch.float32).view(heads, 1, 1)
    out = torch.empty_like(q)
    for b0 in range(0, n, q_block):
        b1 = min(n, b0 + q_block)
        dist = (pos[b0:b1, None] - pos[None, :]).abs_().to(torch.float32)  # (block, n)
        for s0 in range(0, count, seq_block):
            s1 = min(count, s0 + seq_block)
            qb, kb, vb = q[s0:s1, :, b0:b1], k[s0:s1], v[s0:s1]
            if q.dtype == torch.float32:
                # Bias added in place into the score buffer: no (heads, block, n) bias tensor, and no
                # masked-SDPA math path (1.85x faster at 8192 tokens, jina-base shape, on CPU).
                scores = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale).addcmul_(neg_slopes, dist)
                torch.softmax(scores, dim=-1, out=scores)  # in place: one buffer per block
                out[s0:s1, :, b0:b1] = torch.matmul(scores, vb)
            else:  # bf16/fp16: SDPA keeps the softmax in fp32
                bias = (neg_slopes * dist).to(q.dtype)
                out[s0:s1, :, b0:b1] = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=scale)
    return out


def mean_pool_normalize_torch(hidden: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Mean of hidden rows [start, end) per span, accumulated in fp64, then L2-normalised.

    hidden: (total_tokens, dim); spans: (m, 2) int row offsets into the packed batch. Spans may
    overlap (late chunking with overlap). Returns (m, dim) float32.
    """
    if spans.numel() == 0:
        return hidden.new_zeros((0, hidden.shape[1]), dtype=torch.float32)
    start, end = spans[:, 0].to(torch.long), spans[:, 1].to(torch.long)
    length = end - start
    if bool((length <= 0).any()):
        raise ValueError("every pooling span must cover at least one token")
    span_id = torch.repeat_interleave(torch.arange(len(spans), device=hidden.device), length)
    first = torch.cumsum(length, 0) - length  # position of each span's first row in `rows`
    rows = start[span_id] + torch.arange(len(span_id), device=hidden.device) - first[span_id]
    # index_add_ sums row after row: in fp32 the alike rows of a long repetitive text round the same way
    # thousands of times (2e-5 off at 8192 tokens); fp64 keeps the mean exact to fp32.
    sums = torch.zeros((len(spans), hidden.shape[1]), dtype=torch.float64, device=hidden.device)
    sums.index_add_(0, span_id, hidden[rows].to(torch.float64))
    return F.normalize(sums / length[:, None].to(torch.float64), p=2.0, dim=-1).to(torch.float32)


def rotary_qk_torch_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q = qkv[:, 0] and k = qkv[:, 1] of a (T, 3, heads, head_dim) projection in place: the pair
    (i, i + head_dim / 2) turns by the angle whose cos/sin are column i of the (T, head_dim / 2) tables
    (GPT-NeoX halves, as Nomic's and transformers' rotate_half). Computed in fp32 (fp64 for fp64)."""
    qk = qkv[:, :2]  # (T, 2, heads, head_dim) view
    x1, x2 = qk.to(torch.promote_types(qkv.dtype, torch.float32)).chunk(2, dim=-1)
    c, s = cos[:, None, None], sin[:, None, None]
    qk.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))


def segment_spans(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (n + 1,) -> (n, 2) spans covering each whole sequence."""
    return torch.stack((cu_seqlens[:-1], cu_seqlens[1:]), dim=1)
