"""Length-aware packing: sort sequences by length, cut batches by a token budget, concatenate.

A batch is one (total_tokens,) tensor with `cu_seqlens` offsets (the varlen layout of
flash-attention and TEI), so a batch never pays for padding, and one 8192-token document beside
fifty short queries costs exactly their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sequence:
    """One model input: token ids including [CLS]/[SEP], the row spans to pool (relative to the
    sequence) and, for each span, the index of the output vector it fills."""

    ids: list[int]
    pool_spans: list[tuple[int, int]]
    outputs: list[int]


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64, 0.. within each sequence
    cu_seqlens: torch.Tensor  # (n + 1,) int32
    max_seqlen: int
    pool_spans: torch.Tensor  # (m, 2) int64 row offsets into the packed batch
    outputs: list[int]  # output vector index of each pool span
    n_tokens: int


def plan_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into batches of at most `budget` tokens, longest first.

    A sequence longer than the budget gets a batch of its own rather than failing.
    """
    if budget <= 0:
        raise ValueError(f"batch token budget must be positive, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def pack(sequences: list[Sequence], device: torch.device) -> PackedBatch:
    lengths = [len(s.ids) for s in sequences]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    ids = [t for s in sequences for t in s.ids]
    positions = [p for n in lengths for p in range(n)]
    spans = [(o + a, o + b) for s, o in zip(sequences, offsets, strict=False) for a, b in s.pool_spans]
    outputs = [k for s in sequences for k in s.outputs]
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        position_ids=torch.tensor(positions, dtype=torch.long, device=device),
        cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=device),
        max_seqlen=max(lengths),
        pool_spans=torch.tensor(spans, dtype=torch.long, device=device).reshape(-1, 2),
        outputs=outputs,
        n_tokens=offsets[-1],
    )
