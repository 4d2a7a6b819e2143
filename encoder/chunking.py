"""Token windows over a document and their character spans in the original text."""

from __future__ import annotations

MODES = ("full", "chunk", "late")  # one vector per text | token windows | windows of one pass


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
