"""PyTorch implementations of the packed (varlen) ops: the path used on CPU and wherever Triton is off.

Same signatures as the Triton kernels. These are the fast PyTorch paths, not the naive references the
kernels are tested against: attention runs on `scaled_dot_product_attention`, and the ALiBi bias is
materialised only for a bounded block of queries at a time, so one 8192-token document costs
O(block x seqlen) extra memory instead of O(heads x seqlen^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on elements of a materialised score/bias block (fp32: 4 bytes each, so 128 MiB).
_BLOCK_ELEMENTS = 32 * 1024 * 1024
# Segments up to this length are gathered into a padded batch (one SDPA call for many short
# texts); longer ones are attended one by one. Batches are length-sorted, so padding stays small.
_PAD_MAX_SEQLEN = 512


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Symmetric ALiBi bias -m_h * |i - j| as (heads, len(q_pos), len(k_pos)) in fp32."""
    dist = (q_pos[:, None] - k_pos[None, :]).abs().to(torch.float32)
    return -slopes.to(torch.float32)[:, None, None] * dist


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
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if max_seqlen <= _PAD_MAX_SEQLEN:
        return _attention_padded(q, k, v, cu_seqlens, lengths, max_seqlen, alibi_slopes, scale)
    out = torch.empty_like(q)
    starts = cu_seqlens[:-1].tolist()
    for start, length in zip(starts, lengths, strict=True):
        seg = slice(start, start + length)
        out[seg] = _attention_one(q[seg], k[seg], v[seg], alibi_slopes, scale)
    return out


def _attention_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """One sequence (n, heads, head_dim); with ALiBi, queries go in blocks to bound the bias size."""
    n, heads, _ = q.shape
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, n, head_dim)
    if slopes is None:
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale)[0].transpose(0, 1)
    block = max(1, min(n, _BLOCK_ELEMENTS // (heads * n)))
    pos = torch.arange(n, device=q.device)
    out = torch.empty_like(qh)
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        bias = alibi_bias(slopes, pos[b0:b1], pos).to(q.dtype)  # (heads, block, n)
        out[:, :, b0:b1] = F.scaled_dot_product_attention(
            qh[:, :, b0:b1], kh, vh, attn_mask=bias.unsqueeze(0), scale=scale
        )
    return out[0].transpose(0, 1)


def _attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    lengths: list[int],
    max_seqlen: int,
    slopes: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Short sequences: gather into (n, heads, L, d), one masked SDPA per group, scatter back."""
    n = len(lengths)
    heads = q.shape[1]
    device = q.device
    length_t = torch.tensor(lengths, device=device)
    pos = torch.arange(max_seqlen, device=device)
    valid = pos[None, :] < length_t[:, None]  # (n, L)
    rows = (cu_seqlens[:-1, None].to(torch.long) + pos[None, :]).clamp(max=q.shape[0] - 1)
    bias = alibi_bias(slopes, pos, pos).to(q.dtype) if slopes is not None else None
    group = max(1, _BLOCK_ELEMENTS // (heads * max_seqlen * max_seqlen))
    out = torch.empty_like(q)
    for g0 in range(0, n, group):
        g1 = min(n, g0 + group)
        idx, ok = rows[g0:g1], valid[g0:g1]
        qg, kg, vg = (t[idx].transpose(1, 2) for t in (q, k, v))  # (g, heads, L, d)
        # Padding keys get -inf; padding queries still see real keys, so no row is all -inf.
        mask = torch.zeros(ok.shape, dtype=q.dtype, device=device).masked_fill_(~ok, float("-inf"))
        mask = mask[:, None, None, :]  # (g, 1, 1, L)
        if bias is not None:
            mask = mask + bias.unsqueeze(0)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
        out[idx[ok]] = og.transpose(1, 2)[ok]
    return out


def mean_pool_normalize_torch(hidden: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Mean of hidden rows [start, end) per span, accumulated in fp32, then L2-normalised.

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
    sums = torch.zeros((len(spans), hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, span_id, hidden[rows].to(torch.float32))
    return F.normalize(sums / length[:, None].to(torch.float32), p=2.0, dim=-1)


def segment_spans(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (n + 1,) -> (n, 2) spans covering each whole sequence."""
    return torch.stack((cu_seqlens[:-1], cu_seqlens[1:]), dim=1)
