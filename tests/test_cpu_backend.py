"""The ONNX Runtime CPU backend (encoder/onnx_cpu.py): the same vectors as sentence-transformers and the
independent JinaBERT reference, its export cache (reuse, revision change, read-only model folder,
corrupt file), the fallbacks to PyTorch and their reasons, and bf16 against fp32."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from longembed.encoder import load_model, onnx_cpu
from tests.jina_reference import jina_config, reference_embed, write_checkpoint
from tests.texts import varied_texts

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["", "a", "hello world", "ice cream in the cold snow " * 12, "naïve café in 北京", "word " * 200]


@pytest.fixture(scope="module")
def minilm():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def minilm_torch():
    old = os.environ.get("LONGEMBED_CPU_BACKEND")
    os.environ["LONGEMBED_CPU_BACKEND"] = "torch"
    try:
        return load_model(device="cpu")
    finally:
        if old is None:
            del os.environ["LONGEMBED_CPU_BACKEND"]
        else:
            os.environ["LONGEMBED_CPU_BACKEND"] = old


@pytest.fixture
def jina(tmp_path, monkeypatch):
    """A tiny random-weight JinaBERT folder and its state; exports land in a private cache."""
    monkeypatch.setenv("LONGEMBED_CACHE", str(tmp_path / "cache"))
    config = jina_config(4, 64)
    folder = tmp_path / "jina"
    return folder, config, write_checkpoint(folder, config)


def exports(folder: Path) -> list[Path]:
    return sorted((folder / "longembed-onnx").glob("*.onnx"))


def fused_attention_nodes(path: Path) -> int:
    """ONNX Runtime's fused Attention nodes in an export (one per layer when the fusion held)."""
    import onnx

    return sum(node.op_type == "Attention" for node in onnx.load(str(path)).graph.node)


def test_minilm_on_onnx_runtime_matches_sentence_transformers(minilm, minilm_torch):
    from sentence_transformers import SentenceTransformer

    assert minilm.info.backend == "onnxruntime" and minilm.info.backend_note == ""
    assert fused_attention_nodes(minilm._onnx.path) == len(minilm.module.layers) == 6
    assert (
        minilm_torch.info.backend == "torch"
        and minilm_torch.info.backend_note == "LONGEMBED_CPU_BACKEND=torch"
    )
    texts = varied_texts(120)
    ours = minilm.embed(texts, batch_tokens=onnx_cpu.SMALL_BATCH_TOKENS)  # every batch on ONNX Runtime
    reference = SentenceTransformer(str(minilm._m.folder), device="cpu")
    theirs = reference.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    cosine = (ours * theirs).sum(axis=1)
    assert cosine.min() >= 0.99999, (int(np.argmin(cosine)), cosine.min())
    # The packed PyTorch path and the ONNX graph (attention padded per group) give the same vectors.
    assert np.abs(ours - minilm_torch.embed(texts)).max() < 1e-5
    # Padding never leaks: one text at a time equals the mixed-length batch.
    alone = np.concatenate([minilm._onnx.forward(minilm.prepare([t], "full").sequences) for t in texts[:20]])
    assert np.abs(alone - ours[:20]).max() < 1e-5


def test_single_queries_of_one_length_share_index_arrays_not_tokens(minilm):
    """A lone sequence's index arrays are kept per length (OnnxEncoder._single_feed): two queries of
    the same length, each run twice in turn, keep their own vectors, equal to the padded batch's."""
    texts = ["how do I reset my password", "where do I find the station"]
    sequences = [minilm.prepare([t], "full", kind="query").sequences for t in texts]
    assert len(sequences[0][0].ids) == len(sequences[1][0].ids)
    alone = [minilm._onnx.forward(s) for _ in range(2) for s in sequences]
    together = minilm._onnx.forward(sequences[0] + sequences[1])  # the general (padded) feed
    assert np.array_equal(alone[0], alone[2]) and np.array_equal(alone[1], alone[3])
    assert np.abs(np.concatenate(alone[:2]) - together).max() < 1e-5
    assert float((alone[0] * alone[1]).sum()) < 0.9  # different texts, different vectors


def test_late_chunk_spans_pool_the_same_rows(minilm, minilm_torch):
    docs = [varied_texts(40)[7] * 6, "short one"]
    a = minilm.embed_chunks(docs, mode="late", chunk_tokens=40, overlap=8, batch_tokens=256)
    b = minilm_torch.embed_chunks(docs, mode="late", chunk_tokens=40, overlap=8)
    assert [len(d) for d in a] == [len(d) for d in b] and len(a[0]) > 1
    for x, y in zip(a, b, strict=True):
        assert np.abs(np.stack([c.vector for c in x]) - np.stack([c.vector for c in y])).max() < 1e-5


def test_jinabert_on_onnx_runtime_matches_the_reference(jina):
    folder, config, state = jina
    model = load_model(folder, device="cpu")
    assert model.info.backend == "onnxruntime"
    assert fused_attention_nodes(model._onnx.path) == config["num_hidden_layers"]  # ALiBi as its bias
    long_text = "the quick brown fox jumps over the lazy dog " * 140  # a batch of its own: on PyTorch
    texts = [*TEXTS, long_text]
    assert model.count_tokens([long_text])[0] > onnx_cpu.SMALL_BATCH_TOKENS
    reference = reference_embed(folder, state, config, texts).numpy()
    assert np.abs(model.embed(texts, batch_tokens=onnx_cpu.SMALL_BATCH_TOKENS) - reference).max() <= 1e-5
    # The graph itself on a long sequence (padded attention, ALiBi built in the graph):
    long_only = model._onnx.forward(model.prepare([long_text], "full").sequences)
    assert np.abs(long_only - reference[-1:]).max() <= 1e-5


@pytest.mark.skipif(onnx_cpu.usable_cores() < 2, reason="one core: queries share the bulk session")
def test_short_batches_run_on_a_query_session_with_more_threads(jina):
    """As in the host (torch on one core less than the machine has): batches of at most QUERY_TOKENS
    may go to a second session with more threads; both give the reference's vectors."""
    import torch

    folder, config, state = jina
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model(folder, device="cpu")
    finally:
        torch.set_num_threads(threads)
    encoder = model._onnx
    assert encoder.query_session is not encoder.session
    assert encoder.query_session.get_session_options().intra_op_num_threads == min(
        onnx_cpu.QUERY_THREADS, onnx_cpu.usable_cores()
    )
    assert encoder.session.get_session_options().intra_op_num_threads == 1
    # Its workers spin only inside a run: no core is burnt between queries (ONNX Runtime's default
    # spinning kept one busy for ~35 ms after each run here).
    query = model.prepare(["how do I reset my password"], "full").sequences
    encoder.forward(query, session=encoder.query_session)
    time.sleep(0.3)  # let any earlier spinning (torch's OpenMP threads too) end
    for _ in range(5):
        encoder.forward(query, session=encoder.query_session)
        before = time.process_time()
        time.sleep(0.1)
        assert time.process_time() - before < 0.01
    reference = reference_embed(folder, state, config, TEXTS).numpy()
    small = []
    for i, text in enumerate(TEXTS):
        sequences = model.prepare([text], "full").sequences
        small.append(sum(len(s.ids) for s in sequences) <= onnx_cpu.QUERY_TOKENS)
        for session in (encoder.query_session, encoder.session):
            got = encoder.forward(sequences, session=session)
            assert np.abs(got - reference[i]).max() <= 1e-5
    assert small == [True, True, True, False, True, False]
    # With spare cores, a small batch goes to the session that has been faster per token; while that
    # is the bulk session, one in PROBE_EVERY to the query session; a larger one, or any without spare
    # cores, to the bulk session. (small_cost: [query session, bulk session])
    encoder.small_cost = [1.0, 0.5]  # the query session looked slower (busy cores)
    encoder._small_runs = 0
    for run in range(1, onnx_cpu.PROBE_EVERY + 1):
        before = list(encoder.small_cost)
        encoder.forward(query, spare_cores=True)
        changed = [a != b for a, b in zip(before, encoder.small_cost, strict=True)]
        assert changed == ([True, False] if run == onnx_cpu.PROBE_EVERY else [False, True]), run
        if run == onnx_cpu.PROBE_EVERY:  # the probe's cost replaces the stale one (seconds per token)
            assert encoder.small_cost[0] < 0.01
        encoder.small_cost[0] = 1.0  # keep the probed one looking slow
    encoder.small_cost = [0.5, 1.0]  # the query session faster: the one-thread session is not probed
    for run in range(2 * onnx_cpu.PROBE_EVERY):
        before = list(encoder.small_cost)
        encoder.forward(query, spare_cores=True)
        assert encoder.small_cost[0] != before[0] and encoder.small_cost[1] == 1.0, run
    encoder.small_cost[0] = 2.0  # until its own cost rises above the other's last one
    encoder.forward(query, spare_cores=True)
    assert encoder.small_cost[0] == 2.0 and encoder.small_cost[1] != 1.0
    before = list(encoder.small_cost)
    encoder.forward(model.prepare([TEXTS[-1]], "full").sequences, spare_cores=True)
    encoder.forward(query)  # the caller did not say the other cores are free
    assert encoder.small_cost == before  # both on the bulk session, outside the choice


def test_export_is_reused_and_replaced_when_the_weights_change(jina, caplog):
    folder, config, _ = jina
    caplog.set_level(logging.INFO, logger="longembed.encoder.onnx_cpu")
    load_model(folder, device="cpu")
    [first] = exports(folder)
    assert "exported" in caplog.text
    caplog.clear()
    stamp = first.stat().st_mtime_ns
    again = load_model(folder, device="cpu")
    assert again._onnx.path == first and first.stat().st_mtime_ns == stamp
    assert "exported" not in caplog.text  # reused, not exported again
    copy = folder.parent / "renamed-copy"
    shutil.copytree(folder, copy)
    caplog.clear()
    copied = load_model(copy, device="cpu")  # the export travels with the folder
    assert copied._onnx.path == exports(copy)[0] and "exported" not in caplog.text
    state = write_checkpoint(folder, config, seed=1)  # new weights: a new revision
    changed = load_model(folder, device="cpu")
    [second] = exports(folder)
    assert second != first and not first.exists() and changed._onnx.path == second
    assert changed.info.revision != again.info.revision
    reference = reference_embed(folder, state, config, TEXTS).numpy()
    assert np.abs(changed.embed(TEXTS) - reference).max() <= 1e-5


@pytest.mark.parametrize("how", ["read-only", "blocked"])
def test_an_unwritable_model_folder_exports_into_the_cache(jina, tmp_path, how):
    """`read-only`: mode 0555 (root writes anyway: skipped there); `blocked`: a file where the export
    folder would go, which stops root too."""
    folder, config, state = jina
    if how == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder anyway")
        folder.chmod(0o555)
    else:
        (folder / "longembed-onnx").write_text("not a folder")
    try:
        model = load_model(folder, device="cpu")
    finally:
        folder.chmod(0o755)
    assert model.info.backend == "onnxruntime"
    assert model._onnx.path.parent == tmp_path / "cache" / "onnx"
    assert not (folder / "longembed-onnx").is_dir()
    reference = reference_embed(folder, state, config, TEXTS).numpy()
    assert np.abs(model.embed(TEXTS) - reference).max() <= 1e-5
    again = load_model(folder, device="cpu")  # found in the cache next time
    assert again._onnx.path == model._onnx.path


def test_a_corrupt_cached_export_is_detected_and_exported_again(jina, caplog):
    folder, config, state = jina
    load_model(folder, device="cpu")
    [path] = exports(folder)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    model = load_model(folder, device="cpu")
    assert "sha256 does not match" in caplog.text
    assert model.info.backend == "onnxruntime"
    reference = reference_embed(folder, state, config, TEXTS).numpy()
    assert np.abs(model.embed(TEXTS) - reference).max() <= 1e-5
    digest = json.loads(path.with_suffix(".json").read_text())["sha256"]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()  # the file was written anew


def test_a_disagreeing_export_falls_back_to_pytorch_with_the_reason(jina, monkeypatch):
    folder, config, state = jina
    monkeypatch.setenv("LONGEMBED_ONNX_MIN_COSINE", "1.5")  # no export can agree this well
    model = load_model(folder, device="cpu")
    assert model.info.backend == "torch"
    assert "disagrees with the PyTorch forward" in model.info.backend_note
    reference = reference_embed(folder, state, config, TEXTS).numpy()
    assert np.abs(model.embed(TEXTS) - reference).max() <= 1e-5
    monkeypatch.setenv("LONGEMBED_CPU_BACKEND", "onnx")  # insisting on it makes the failure an error
    with pytest.raises(onnx_cpu.OnnxUnavailable, match="disagrees"):
        load_model(folder, device="cpu")


def test_without_onnxruntime_the_model_runs_on_pytorch(jina):
    folder, _, _ = jina
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"  # what an install without the wheel sees
        "from longembed.encoder import load_model\n"
        f"m = load_model({str(folder)!r}, device='cpu')\n"
        "print(m.info.backend, '|', m.info.backend_note, '|', m.embed(['hello world']).shape)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, check=True
    )
    backend, note, shape = (part.strip() for part in out.stdout.strip().split("|"))
    assert backend == "torch" and "onnxruntime does not import" in note and shape == "(1, 64)"
    assert "stays on PyTorch" in out.stderr  # logged as a warning


def test_backend_setting_is_checked(jina, monkeypatch):
    folder, _, _ = jina
    monkeypatch.setenv("LONGEMBED_CPU_BACKEND", "gpu")
    with pytest.raises(ValueError, match="LONGEMBED_CPU_BACKEND"):
        load_model(folder, device="cpu")
    monkeypatch.setenv("LONGEMBED_CPU_BACKEND", "torch")
    model = load_model(folder, device="cpu")
    assert model.info.backend == "torch" and not exports(folder)


def test_bf16_stays_on_pytorch_within_tolerance_of_fp32(minilm):
    bf16 = load_model(device="cpu", dtype="bf16")
    assert bf16.info.backend == "torch" and "bf16" in bf16.info.backend_note
    texts = varied_texts(60)
    cosine = (bf16.embed(texts) * minilm.embed(texts)).sum(axis=1)
    assert cosine.min() >= 0.999, cosine.min()
