"""Token windows over a document and their character spans in the original text."""

from __future__ import annotations

MODES = ("full", "chunk", "late")  # one vector per text | token windows | windows of one pass
# Tokens per chunk unless a collection or call sets it: capped by what fits in the model's window next
# to [CLS], [SEP] and the document prefix (`default_chunk_tokens`). The encoder, collections and the CLI
# all use this rule; the schema has no default of its own.
DEFAULT_CHUNK_TOKENS = 512


def default_chunk_tokens(room: int) -> int:
    """The chunk size used when none is given; `room` = content tokens per sequence (window minus
    [CLS], [SEP] and the prefix's tokens)."""
    return min(room, DEFAULT_CHUNK_TOKENS)


def check_mode(mode: str, pooling: str, model_name: str) -> None:
    """ValueError unless a model pooling with `pooling` can embed in `mode` (encoder and collections).

    Late chunking pools windows of token rows from one pass: it needs mean pooling (any architecture;
    ALiBi models just see more context per pass)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "late" and pooling != "mean":
        raise ValueError(f"late chunking needs mean pooling; {model_name} pools with {pooling!r}")


def windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token windows of at most `size` tokens, consecutive ones sharing `overlap` tokens.

    An empty document still gets one (empty) window, so every document yields at least one chunk.
    """
    if size <= 0:
        raise ValueError(f"chunk size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, chunk size {size}), got {overlap}")
    out = []
    start = 0
    while True:
        end = min(start + size, n_tokens)
        out.append((start, end))
        if end >= n_tokens:
            return out
        start = end - overlap


def char_span(offsets: list[tuple[int, int]], start: int, end: int, text_length: int) -> tuple[int, int]:
    """Characters [first token's start, last token's end) of tokens [start, end); (0, len) if empty."""
    if end <= start:
        return 0, text_length
    return offsets[start][0], offsets[end - 1][1]
