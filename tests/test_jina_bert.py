"""JinaBERT on packed batches against an independent padded dense-ALiBi reference (tests/jina_reference.py),
on tiny random checkpoints written in the jina-embeddings-v2 Hugging Face layout."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from longembed.encoder import ModelLoadError, load_model
from longembed.encoder.jina_bert import alibi_slopes
from tests.jina_reference import (
    jina_config,
    mean_pool_l2,
    press_alibi_slopes,
    reference_embed,
    reference_hidden,
    write_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]

# Hand-written from Press et al.'s formula (geometric sequence from 2^(-8/n) for a power of two n;
# otherwise that for the closest smaller power of two, then every other slope of the next one).
EXPECTED_SLOPES = {
    4: [2**-2, 2**-4, 2**-6, 2**-8],
    6: [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3],
    8: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8],
    12: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8, 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
}
# (heads, hidden): head dims 16, 8, 8 and 8; 6 is the non-power-of-two case.
SHAPES = [(4, 64), (8, 64), (12, 96), (6, 48)]

TEXTS = [
    "",
    "a",
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 30,
    "naïve café in 北京, 😀; code: `x = f(y) + 1`\n\n\tindented   spaces",
    "Late chunking pools token rows of one pass over the whole document. " * 6,
]
LONG_DOC = " ".join(
    f"Section {i}: the encoder packs sequences of different lengths into one batch, and ALiBi "
    f"biases attention by distance, so position {i} sees its neighbours most."
    for i in range(12)
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, tuple[Path, dict, dict]]:
    """heads -> (folder, config, state) for each of SHAPES."""
    out = {}
    for heads, hidden in SHAPES:
        folder = tmp_path_factory.mktemp(f"jina-h{heads}")
        config = jina_config(heads, hidden)
        out[heads] = (folder, config, write_checkpoint(folder, config, seed=heads))
    return out


@pytest.fixture(scope="module")
def jina4(checkpoints):
    folder, config, state = checkpoints[4]
    return load_model(folder, device="cpu"), folder, config, state


@pytest.mark.parametrize("heads", sorted(EXPECTED_SLOPES))
def test_alibi_slopes_exact(heads):
    expected = torch.tensor(EXPECTED_SLOPES[heads], dtype=torch.float32)
    assert torch.equal(alibi_slopes(heads), expected)
    # The reference's own slopes (written from the paper's code) agree with the hand-written list.
    assert press_alibi_slopes(heads) == pytest.approx(EXPECTED_SLOPES[heads], rel=1e-12)


@pytest.mark.parametrize(("heads", "hidden"), SHAPES)
def test_matches_dense_reference(checkpoints, heads, hidden):
    folder, config, state = checkpoints[heads]
    model = load_model(folder, device="cpu")
    assert model.info.architecture == "jina_bert"
    assert (model.info.dim, model.info.max_tokens, model.info.pooling) == (hidden, 8192, "mean")
    assert torch.equal(model.module.slopes, torch.tensor(EXPECTED_SLOPES[heads], dtype=torch.float32))
    ours = model.embed(TEXTS)
    reference = reference_embed(folder, state, config, TEXTS).numpy()
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), hidden)
    assert np.abs(ours - reference).max() <= 1e-5


def test_reference_detects_wrong_slopes(checkpoints):
    """The 1e-5 tolerance has teeth: plausible mistakes move the vectors by far more."""
    folder, config, state = checkpoints[6]
    ours = load_model(folder, device="cpu").embed(TEXTS)
    mistakes = {
        "2^(-8i/6) for 6 heads": [2 ** (-8 * (i + 1) / 6) for i in range(6)],
        "no ALiBi": [0.0] * 6,
        "slopes in reverse order": EXPECTED_SLOPES[6][::-1],
    }
    for name, slopes in mistakes.items():
        wrong = reference_embed(folder, state, config, TEXTS, slopes=slopes).numpy()
        assert np.abs(ours - wrong).max() > 1e-3, name


def test_bert_prefixed_checkpoint_with_mlm_head(tmp_path, jina4):
    """`JinaBertForMaskedLM` saves keys under `bert.` next to `cls.predictions.*`: same model."""
    model, _, config, state = jina4
    write_checkpoint(tmp_path, config, state=state, bert_prefix=True)
    prefixed = load_model(tmp_path, device="cpu")
    np.testing.assert_array_equal(prefixed.embed(TEXTS), model.embed(TEXTS))


def test_1024_tokens_in_a_mixed_batch_match_reference(jina4):
    model, folder, config, state = jina4
    long_text = "word " * 1022  # "word" is one token: [CLS] + 1022 + [SEP] = 1024 rows
    texts = [long_text, "short", LONG_DOC]
    assert model.count_tokens([long_text]) == [1022]
    ours = model.embed(texts)
    reference = reference_embed(folder, state, config, texts).numpy()
    assert np.abs(ours - reference).max() <= 1e-5


EMBED_8192 = """
import json, resource, sys, time
import numpy as np
from longembed.encoder import load_model

model = load_model(sys.argv[1], device="cpu")
shorts = ["a short query", "another one"]
alone = model.embed(shorts)
text = "word " * 8190
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
[first], [chunk], [last] = model.embed_chunks([shorts[0], text, shorts[1]], mode="full")
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({
    "n_tokens": chunk.n_tokens,
    "truncated": chunk.truncated,
    "finite": bool(np.isfinite(chunk.vector).all()),
    "norm": float(np.linalg.norm(chunk.vector)),
    "short_diff": float(np.abs(np.stack([first.vector, last.vector]) - alone).max()),
    "extra_peak_mib": (after - before) / 1024,
    "seconds": seconds,
}))
"""


@pytest.mark.slow
def test_8192_tokens_run_on_cpu_with_bounded_memory(tmp_path):
    """One full-context document in a fresh process, so the peak-RSS delta is this embed's own.

    With 4 heads, a dense (heads, n, n) fp32 ALiBi bias alone is 1 GiB at n = 8192, and the
    matching score matrix another 1 GiB; a blocked implementation needs a fraction of that.
    """
    config = jina_config(4, 64, layers=1)
    write_checkpoint(tmp_path, config)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EMBED_8192), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["n_tokens"] == 8190 and not result["truncated"]
    assert result["finite"] and abs(result["norm"] - 1.0) < 1e-5
    assert result["short_diff"] <= 1e-5  # the short texts beside it are unaffected by packing
    assert result["extra_peak_mib"] < 1024, result
    print(f"8192 tokens: {result['seconds']:.1f} s, extra peak RSS {result['extra_peak_mib']:.0f} MiB")


def _windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows written out independently of encoder/chunking.py."""
    starts = [0]
    while starts[-1] + size < n:
        starts.append(starts[-1] + size - overlap)
    return [(s, min(s + size, n)) for s in starts]


def _encode(folder: Path, text: str) -> list[int]:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer.encode(text, add_special_tokens=False).ids


def _span_means(state, config, ids: list[int], spans: list[tuple[int, int]]) -> np.ndarray:
    """Reference late chunking: hidden states of the whole sequence, mean over each row span, L2."""
    input_ids = torch.tensor([ids])
    hidden = reference_hidden(state, config, input_ids, torch.ones_like(input_ids))[0]
    rows = [hidden[a:b].mean(dim=0) for a, b in spans]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1).numpy()


def test_late_chunking_pools_spans_of_one_pass(jina4):
    model, folder, config, state = jina4
    tokenizer_ids = _encode(folder, LONG_DOC)
    cls, sep = _encode(folder, "[CLS] [SEP]")
    windows = _windows(len(tokenizer_ids), 64, 16)
    assert len(windows) >= 4
    [chunks] = model.embed_chunks([LONG_DOC], mode="late", chunk_tokens=64, overlap=16)
    assert [(c.ordinal, c.n_tokens) for c in chunks] == [(i, b - a) for i, (a, b) in enumerate(windows)]
    expected = _span_means(state, config, [cls, *tokenizer_ids, sep], [(1 + a, 1 + b) for a, b in windows])
    got = np.stack([c.vector for c in chunks])
    assert np.abs(got - expected).max() <= 1e-5
    # Late chunks see the whole document, so they differ from the same windows embedded alone.
    [alone] = model.embed_chunks([LONG_DOC], mode="chunk", chunk_tokens=64, overlap=16)
    assert [(c.start, c.end) for c in alone] == [(c.start, c.end) for c in chunks]
    assert np.abs(np.stack([c.vector for c in alone]) - got).max() > 1e-3


def test_late_chunking_with_an_instruction_pools_text_rows_only(jina4):
    model, folder, config, state = jina4
    instruction = "Represent this document: "
    ids = _encode(folder, instruction + LONG_DOC)
    cls, sep = _encode(folder, "[CLS] [SEP]")
    first = 1 + len(_encode(folder, instruction))
    windows = _windows(len(ids) - first + 1, 100, 0)
    [chunks] = model.embed_chunks(
        [LONG_DOC], mode="late", chunk_tokens=100, overlap=0, instruction=instruction
    )
    expected = _span_means(state, config, [cls, *ids, sep], [(first + a, first + b) for a, b in windows])
    assert np.abs(np.stack([c.vector for c in chunks]) - expected).max() <= 1e-5


def test_late_chunking_longer_than_the_window_runs_in_blocks(checkpoints):
    """Past max_tokens, late chunking makes one pass per window-sized block of the text."""
    folder, config, state = checkpoints[8]
    model = load_model(folder, device="cpu", max_tokens=128)
    room = 126
    ids = _encode(folder, LONG_DOC)
    cls, sep = _encode(folder, "[CLS] [SEP]")
    assert len(ids) > 2 * room
    [chunks] = model.embed_chunks([LONG_DOC], mode="late", chunk_tokens=50, overlap=10)
    expected, spans = [], []
    for block_start in range(0, len(ids), room):
        block = ids[block_start : block_start + room]
        local = _windows(len(block), 50, 10)
        expected.append(_span_means(state, config, [cls, *block, sep], [(1 + a, 1 + b) for a, b in local]))
        spans += [(block_start + a, block_start + b) for a, b in local]
    assert [c.n_tokens for c in chunks] == [b - a for a, b in spans]
    assert np.abs(np.stack([c.vector for c in chunks]) - np.concatenate(expected)).max() <= 1e-5


def test_full_mode_truncates_at_max_tokens(checkpoints):
    folder, config, state = checkpoints[12]
    model = load_model(folder, device="cpu", max_tokens=64)
    fits, too_long = "word " * 62, "word " * 63
    [[a]], [[b]] = model.embed_chunks([fits], mode="full"), model.embed_chunks([too_long], mode="full")
    assert (a.truncated, a.n_tokens, a.end) == (False, 62, len(fits))
    assert (b.truncated, b.n_tokens) == (True, 62)
    assert too_long[b.start : b.end] == fits.rstrip()
    reference = reference_embed(folder, state, config, [fits]).numpy()[0]
    assert np.abs(b.vector - reference).max() <= 1e-5 and np.abs(a.vector - reference).max() <= 1e-5


def test_qk_post_norm_variant_refused_by_config(tmp_path):
    variant = "jinaai/jina-bert-v2-qk-post-norm"
    config = jina_config(4, 64, _name_or_path=variant, vocab_size=30528)
    config["auto_map"] = {
        "AutoConfig": f"{variant}--configuration_bert.JinaBertConfig",
        "AutoModel": f"{variant}--modeling_bert.JinaBertModel",
    }
    write_checkpoint(tmp_path, config)
    with pytest.raises(ModelLoadError, match="jina-bert-v2-qk-post-norm"):
        load_model(tmp_path, device="cpu")


def test_qk_post_norm_variant_refused_by_weights(tmp_path):
    """A config that looks plain but weights with the q/k LayerNorms of the code model."""
    config = jina_config(4, 64)
    state = write_checkpoint(tmp_path / "plain", config)
    for i in range(config["num_hidden_layers"]):
        for which in ("q", "k"):
            state[f"encoder.layer.{i}.attention.self.layer_norm_{which}.weight"] = torch.ones(64)
            state[f"encoder.layer.{i}.attention.self.layer_norm_{which}.bias"] = torch.zeros(64)
    write_checkpoint(tmp_path / "qk", config, state=state)
    with pytest.raises(ModelLoadError, match="layer_norm_q"):
        load_model(tmp_path / "qk", device="cpu")


def test_mean_pool_reference_ignores_padding():
    """The reference's pooling is what the comparisons rely on: padded rows must not count."""
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]], dtype=torch.float64)
    pooled = mean_pool_l2(hidden, torch.tensor([[1, 1, 0]]))
    np.testing.assert_allclose(pooled.numpy(), [[2.0 / np.hypot(2.0, 2.0), 2.0 / np.hypot(2.0, 2.0)]])


def test_equal_length_runs_and_small_budgets_match_reference(jina4):
    """Sequences of equal length are attended as one batch: runs of them, cut by token budgets."""
    model, folder, config, state = jina4
    texts = ["word " * k for k in (5, 5, 5, 9, 9, 1, 1, 1, 1, 30, 5, 9)] + ["ice cream", "cold snow"]
    reference = reference_embed(folder, state, config, texts).numpy()
    for budget in (16, 40, 1 << 16):
        assert np.abs(model.embed(texts, batch_tokens=budget) - reference).max() <= 1e-5, budget


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_triton_kernels_in_the_interpreter_match_reference(tmp_path, monkeypatch):
    """The GPU path (flash ALiBi attention + span pooling kernels) run by Triton's CPU interpreter
    through the whole model, against the same reference; head_dim 32 is one the kernel has."""
    config = jina_config(2, 64)
    state = write_checkpoint(tmp_path, config)
    model = load_model(tmp_path, device="cpu")
    monkeypatch.setenv("LONGEMBED_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    texts = ["", "a", "hello world", LONG_DOC[:300], "naïve café in 北京"]
    reference = reference_embed(tmp_path, state, config, texts).numpy()
    assert np.abs(model.embed(texts) - reference).max() <= 1e-5
    [chunks] = model.embed_chunks([LONG_DOC[:300]], mode="late", chunk_tokens=20, overlap=5)
    ids = _encode(tmp_path, LONG_DOC[:300])
    cls, sep = _encode(tmp_path, "[CLS] [SEP]")
    spans = [(1 + a, 1 + b) for a, b in _windows(len(ids), 20, 5)]
    expected = _span_means(state, config, [cls, *ids, sep], spans)
    assert np.abs(np.stack([c.vector for c in chunks]) - expected).max() <= 1e-5


def test_bf16_keeps_fp32_slopes_and_stays_close(checkpoints):
    """Slopes multiply distances up to 8191: casting the model to bf16 must not round them."""
    folder, config, state = checkpoints[8]
    model = load_model(folder, device="cpu", dtype="bf16")
    assert model.module.word_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(model.module.slopes, torch.tensor(EXPECTED_SLOPES[8], dtype=torch.float32))
    texts = ["word " * 500, *TEXTS]
    reference = reference_embed(folder, state, config, texts).numpy()
    got = model.embed(texts)
    assert got.dtype == np.float32
    assert (got * reference).sum(axis=1).min() >= 0.999
