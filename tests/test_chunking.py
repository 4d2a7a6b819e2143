"""Token windows, their character spans in the original text, and full-mode truncation, on the real
MiniLM tokenizer and weights. Expected windows and token ids are computed here, independently."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools
import random
import re

import numpy as np
import pytest
from tokenizers import Tokenizer

from longembed.encoder import load_model
from longembed.encoder.chunking import char_span, windows
from tests.jina_reference import minilm_folder
from tests.texts import varied_texts

ROOM = 254  # MiniLM: max_seq_length 256 minus [CLS] and [SEP]


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def ids_of(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def expected_windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of `size` tokens stepping by size - overlap until the end is reached; one empty window
    for an empty document."""
    starts = [0]
    while starts[-1] + size < n:
        starts.append(starts[-1] + size - overlap)
    return [(s, min(s + size, n)) for s in starts]


def word_texts(tokenizer: Tokenizer, count: int, seed: int = 0, max_words: int = 400) -> list[str]:
    """Texts whose every word is one token (vocabulary words, accented words, CJK characters, emoji
    as [UNK], attached punctuation), separated by varied whitespace: every token boundary is a word
    boundary, so any token window's text re-tokenises to exactly that window's tokens."""
    vocab = [w for w in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{2,12}", w)]
    extras = ["Café", "naïve", "RÉSUMÉ", "Über", "北", "京", "语", "😀", "PostgreSQL"]
    extras = [w for w in extras if len(ids_of(tokenizer, w)) == 1]
    assert len(extras) >= 5, extras  # the unicode cases are really in the test
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(30, max_words)):
            word = rng.choice(extras) if rng.random() < 0.1 else rng.choice(vocab)
            word = word.capitalize() if rng.random() < 0.1 else word
            word += rng.choice([",", ".", ";", "!", ""]) if rng.random() < 0.2 else ""
            parts.append(word + rng.choice([" ", " ", " ", "  ", "\n", "\t", " \n\n "]))
        texts.append(rng.choice(["", " ", "\n"]) + "".join(parts))
    return texts


# -- windows() and char_span() ------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 64])
def test_windows_cover_with_exact_overlap(size):
    for overlap in range(0, size):
        for n in [0, 1, size - 1, size, size + 1, 2 * size, 5 * size + 3, 101]:
            got = windows(n, size, overlap)
            assert got == expected_windows(n, size, overlap), (n, size, overlap)
            assert got[0][0] == 0 and got[-1][1] == n  # starts at the first token, ends at the last
            assert all(0 < b - a <= size for a, b in got) or n == 0
            for (a0, b0), (a1, _) in itertools.pairwise(got):
                assert b0 - a1 == overlap and b0 - a0 == size  # only the last window may be short


def test_empty_document_gets_one_empty_window():
    assert windows(0, 8, 2) == [(0, 0)]
    assert char_span([], 0, 0, 5) == (0, 5)


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (-3, 0), (4, 4), (4, 9), (4, -1)])
def test_windows_refuse_bad_arguments(size, overlap):
    with pytest.raises(ValueError, match=r"chunk size|overlap"):
        windows(10, size, overlap)


def test_char_span_uses_first_and_last_token_offsets():
    offsets = [(0, 3), (4, 9), (9, 10), (12, 15)]
    assert char_span(offsets, 1, 3, 15) == (4, 10)
    assert char_span(offsets, 0, 4, 15) == (0, 15)
    assert char_span(offsets, 3, 4, 15) == (12, 15)


# -- chunk mode on real text --------------------------------------------------------------------


@pytest.mark.parametrize(("size", "overlap"), [(16, 4), (50, 0), (1, 0), (ROOM, 32)])
def test_chunk_spans_retokenise_to_their_tokens(model, tokenizer, size, overlap):
    texts = word_texts(tokenizer, 6 if size > 1 else 2, seed=size)  # size 1: a chunk per token
    docs = model.embed_chunks(texts, mode="chunk", chunk_tokens=size, overlap=overlap)
    for text, chunks in zip(texts, docs, strict=True):
        ids = ids_of(tokenizer, text)
        spans = expected_windows(len(ids), size, overlap)
        assert [c.ordinal for c in chunks] == list(range(len(spans)))
        for chunk, (a, b) in zip(chunks, spans, strict=True):
            piece = text[chunk.start : chunk.end]
            assert chunk.n_tokens == b - a and not chunk.truncated
            assert ids_of(tokenizer, piece) == ids[a:b], (chunk, piece)
            assert piece == piece.strip()  # the span is exactly the tokens' characters
        covered = np.zeros(len(text), dtype=bool)
        for chunk in chunks:
            covered[chunk.start : chunk.end] = True
        assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())


def test_chunk_vectors_equal_embedding_their_text(model, tokenizer):
    [text] = word_texts(tokenizer, 1, seed=7)
    [chunks] = model.embed_chunks([text], mode="chunk", chunk_tokens=40, overlap=8)
    assert len(chunks) >= 3
    alone = model.embed([text[c.start : c.end] for c in chunks])
    assert np.abs(np.stack([c.vector for c in chunks]) - alone).max() <= 1e-5


def test_chunk_spans_on_varied_text(model, tokenizer):
    """Code, unicode, whitespace runs, long docstrings. Where a window boundary falls inside a word
    (a `##` piece) its text re-tokenises differently; every other window must match exactly."""
    texts = varied_texts(40)
    docs = model.embed_chunks(texts, mode="chunk", chunk_tokens=32, overlap=8)
    checked = 0
    for text, chunks in zip(texts, docs, strict=True):
        enc = tokenizer.encode(text, add_special_tokens=False)
        spans = expected_windows(len(enc.ids), 32, 8)
        assert [(c.n_tokens) for c in chunks] == [b - a for a, b in spans]
        for chunk, (a, b) in zip(chunks, spans, strict=True):
            assert 0 <= chunk.start <= chunk.end <= len(text)
            if a == b:
                continue
            assert (chunk.start, chunk.end) == (enc.offsets[a][0], enc.offsets[b - 1][1])
            cut_inside_word = enc.tokens[a].startswith("##") or (
                b < len(enc.ids) and enc.tokens[b].startswith("##")
            )
            if not cut_inside_word:
                assert ids_of(tokenizer, text[chunk.start : chunk.end]) == enc.ids[a:b], (chunk, text[:80])
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("mode", ["full", "chunk", "late"])
@pytest.mark.parametrize("text", ["", " \n\t "])
def test_empty_document_gives_one_chunk(model, mode, text):
    [[chunk]] = model.embed_chunks([text], mode=mode)
    assert (chunk.ordinal, chunk.n_tokens, chunk.truncated) == (0, 0, False)
    assert (chunk.start, chunk.end) == (0, len(text))
    np.testing.assert_allclose(chunk.vector, model.embed([""])[0], atol=1e-6)


def test_late_chunks_have_the_chunk_spans(model, tokenizer):
    """For documents that fit the window (one pass); longer ones restart windows per pass."""
    texts = word_texts(tokenizer, 4, seed=3, max_words=150)
    assert all(len(ids_of(tokenizer, t)) <= ROOM for t in texts)
    chunked = model.embed_chunks(texts, mode="chunk", chunk_tokens=30, overlap=5)
    late = model.embed_chunks(texts, mode="late", chunk_tokens=30, overlap=5)
    for a, b in zip(chunked, late, strict=True):
        assert [(c.start, c.end, c.n_tokens) for c in a] == [(c.start, c.end, c.n_tokens) for c in b]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"chunk_tokens": 0}, "chunk size"),
        ({"chunk_tokens": -5}, "chunk size"),
        ({"chunk_tokens": 10, "overlap": 10}, "overlap"),
        ({"chunk_tokens": 10, "overlap": -1}, "overlap"),
        ({"chunk_tokens": ROOM + 1}, "does not fit"),
        ({"mode": "sliding"}, "mode"),
    ],
)
def test_bad_chunk_arguments(model, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        model.embed_chunks(["some text to cut into pieces"], **{"mode": "chunk", **kwargs})


def test_chunk_tokens_must_leave_room_for_the_prefix(model):
    model.embed_chunks(["text"], chunk_tokens=ROOM)
    with pytest.raises(ValueError, match="prefix"):
        model.embed_chunks(["text"], chunk_tokens=ROOM, instruction="query: ")


# -- full mode ----------------------------------------------------------------------------------


def test_full_mode_truncates_only_past_the_window(model, tokenizer):
    word = "word "  # one token
    for n in (0, 1, ROOM - 1, ROOM, ROOM + 1, 3 * ROOM):
        [[chunk]] = model.embed_chunks([word * n], mode="full")
        assert chunk.truncated == (n > ROOM), n
        assert chunk.n_tokens == min(n, ROOM)
    texts = varied_texts(80)
    lengths = [len(ids_of(tokenizer, t)) for t in texts]
    assert min(lengths) < ROOM < max(lengths)
    for text, n, [chunk] in zip(texts, lengths, model.embed_chunks(texts, mode="full"), strict=True):
        assert chunk.truncated == (n > ROOM), text[:60]
        assert chunk.n_tokens == min(n, ROOM)
        if chunk.truncated:  # the span ends with the last kept token
            assert (
                chunk.start == 0
                and chunk.end == tokenizer.encode(text, add_special_tokens=False).offsets[ROOM - 1][1]
            )
        else:
            assert (chunk.start, chunk.end) == (0, len(text))


def test_full_mode_truncated_vector_is_the_kept_prefix(model, tokenizer):
    [text] = word_texts(tokenizer, 1, seed=11)
    text = text * 3
    [[chunk]] = model.embed_chunks([text], mode="full")
    assert chunk.truncated
    kept = text[chunk.start : chunk.end]
    assert ids_of(tokenizer, kept) == ids_of(tokenizer, text)[:ROOM]
    assert np.abs(chunk.vector - model.embed([kept])[0]).max() <= 1e-5


def test_a_prefix_shrinks_the_window(model):
    instruction = "query: "  # two tokens
    room = ROOM - 2
    [[fits]] = model.embed_chunks(["word " * room], mode="full", instruction=instruction)
    [[cut]] = model.embed_chunks(["word " * (room + 1)], mode="full", instruction=instruction)
    assert (fits.truncated, fits.n_tokens) == (False, room)
    assert (cut.truncated, cut.n_tokens) == (True, room)


def test_text_that_is_not_valid_unicode(model):
    """A lone surrogate (valid in a JSON string, not in UTF-8) gets an error naming the text."""
    for call in (model.embed, model.embed_chunks):
        with pytest.raises(ValueError, match=r"texts\[1\]"):
            call(["fine", "broken \ud800 text"])
