"""Our BERT path on the real all-MiniLM-L6-v2 weights, against sentence-transformers on the same folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from longembed.encoder import load_model
from tests.texts import varied_texts


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def texts():
    return varied_texts(240)


@pytest.fixture(scope="module")
def ours(model, texts):
    return model.embed(texts)


def test_matches_sentence_transformers(model, texts, ours):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model._m.folder), device="cpu")
    assert reference.max_seq_length == model.info.max_tokens == 256
    theirs = reference.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    cosine = (ours * theirs).sum(axis=1)
    worst = int(np.argmin(cosine))
    assert cosine.min() >= 0.99999, f"text {worst} ({texts[worst][:60]!r}) cosine {cosine[worst]}"
    assert ours.dtype == np.float32 and ours.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_packed_batch_equals_one_at_a_time(model, texts, ours):
    picks = list(range(0, len(texts), 4))  # a spread of every length class, keeps the test short
    single = np.stack([model.embed([texts[i]])[0] for i in picks])
    assert np.abs(single - ours[picks]).max() <= 1e-5


def test_order_preserved_under_shuffled_lengths_and_budgets(model, texts, ours):
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = [texts[i] for i in perm]
    for budget in (300, 1 << 20):  # many small batches, one
        got = model.embed(shuffled, batch_tokens=budget)
        assert np.abs(got - ours[perm]).max() <= 1e-5, budget


def test_truncation_is_reported_and_cheap(model):
    huge = "token " * 200_000
    [[chunk]] = model.embed_chunks([huge], mode="full")
    assert chunk.truncated and chunk.n_tokens == model.info.max_tokens - 2
    assert huge[chunk.start : chunk.end].split() == ["token"] * chunk.n_tokens
    [[short]] = model.embed_chunks(["short text"], mode="full")
    assert not short.truncated and (short.start, short.end) == (0, len("short text"))


def test_bf16_is_close_to_fp32(texts, ours):
    bf16 = load_model(device="cpu", dtype="bf16")
    assert bf16.info.dtype == "bf16"
    got = bf16.embed(texts)
    cosine = (got * ours).sum(axis=1)
    assert cosine.min() >= 0.999, cosine.min()
    assert np.median(cosine) >= 0.9999


def test_empty_input_and_bad_arguments(model):
    assert model.embed([]).shape == (0, 384)
    assert model.embed_chunks([]) == []
    with pytest.raises(TypeError, match="list of strings"):
        model.embed("a single string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        model.embed(["ok", None])
    with pytest.raises(ValueError, match="kind"):
        model.embed(["x"], kind="question")
    with pytest.raises(ValueError, match="mode"):
        model.embed_chunks(["x"], mode="sentences")
    with pytest.raises(ValueError, match="budget"):
        model.embed(["x"], batch_tokens=0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        model.embed_chunks(["x"], mode="chunk", chunk_tokens=10_000)
    with pytest.raises(ValueError, match="overlap"):
        model.embed_chunks(["x"], mode="chunk", chunk_tokens=10, overlap=10)
    with pytest.raises(ValueError, match="dtype"):
        load_model(dtype="int8")
    with pytest.raises(ValueError, match="fp16"):
        load_model(device="cpu", dtype="fp16")


def test_info_describes_the_model(model):
    info = model.info
    assert (info.name, info.architecture, info.dim, info.pooling) == (
        "sentence-transformers/all-MiniLM-L6-v2",
        "bert",
        384,
        "mean",
    )
    assert info.prefixes == {"query": "", "document": ""}
    assert len(info.revision) == 16 and info.revision == load_model().info.revision
    assert info.device == "cpu" and info.dtype == "fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(texts, ours):
    gpu = load_model(device="cuda")
    cosine = (gpu.embed(texts) * ours).sum(axis=1)
    assert cosine.min() >= 0.999


def test_full_mode_tokenises_only_the_head_with_the_same_tokens(model, texts):
    """Full mode tokenises a long text up to a whitespace boundary; the kept tokens must be exactly
    those of tokenising the whole text, including texts whose head is too short (long 'words')."""
    keep = model.info.max_tokens - 2
    tricky = [
        "x" * 5000 + " tail",  # no whitespace inside the head limit: falls back to the whole text
        "a-b.c/d " * 2000,  # punctuation splits: many tokens per whitespace word
        "日本語のテキスト" * 1500,  # no whitespace at all
        " \n".join(["word"] * 3000),
    ]
    long_texts = [t for t in texts if len(t) > 1000] + tricky
    whole = model._tokenize(long_texts, None)
    heads = model._tokenize(long_texts, keep)
    for text, a, b in zip(long_texts, whole, heads, strict=True):
        assert a.ids[:keep] == b.ids[:keep], text[:40]
        assert a.offsets[:keep] == b.offsets[:keep]
        assert (len(a.ids) > keep) == (len(b.ids) > keep)
