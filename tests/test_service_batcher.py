"""The batcher: rows equal single-input results, interactive before ingestion, bounded queue, no wait
for a lone request. Real MiniLM; a gate in front of the forward pass holds the batcher busy so that
work queues up deterministically."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from longembed.plugin.models import get_model
from longembed.plugin.service.batcher import INGESTION, INTERACTIVE, Batcher, BatcherStopped, QueueFull
from tests.texts import varied_texts

MIXED_TEXTS = [t for t in varied_texts(60) if t.strip()]


@pytest.fixture(scope="module")
def model():
    return get_model()


class Gated:
    """The real forward pass behind a gate; records the sequences of every batch."""

    def __init__(self, model) -> None:
        self.model = model
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list] = []

    def __call__(self, sequences):
        self.batches.append(list(sequences))
        self.entered.set()
        self.gate.wait(30)
        return self.model.forward_batch(sequences)


def plan(model, texts, **kw):
    return model.prepare(texts, "full", None, 0, kw.get("kind", "document"), kw.get("instruction"))


def submit(batcher, model, texts, priority=INTERACTIVE):
    p = plan(model, texts)
    return batcher.submit(p.sequences, p.n_out, priority)


def test_rows_of_a_shared_batch_equal_single_input_results(model):
    gated = Gated(model)
    stats = []
    batcher = Batcher(gated, model.info.dim, batch_tokens=4096, on_batch=stats.append)
    try:
        blocker = submit(batcher, model, ["holding the batcher busy"], INGESTION)  # never run inline
        assert gated.entered.wait(10)
        texts = [*MIXED_TEXTS[:14], "same length one", "same length two"]
        futures = [submit(batcher, model, [t]) for t in texts]  # queued while the first batch runs
        gated.gate.set()
        blocker.result(30)
        rows = np.concatenate([f.result(30) for f in futures])
    finally:
        batcher.stop()
    assert [s.sequences for s in stats] == [1, 16]  # all sixteen requests shared one forward pass
    for text, row in zip(texts, rows, strict=True):
        single = model.embed([text])[0]
        assert np.abs(row - single).max() < 1e-5
        assert float(row @ single) >= 0.99999


def test_one_job_of_equal_length_sequences(model):
    texts = ["same length one", "same length two", "same length six"]
    batcher = Batcher(model.forward_batch, model.info.dim)
    try:
        rows = submit(batcher, model, texts).result(30)
    finally:
        batcher.stop()
    assert np.abs(rows - model.embed(texts)).max() < 1e-5


def test_interactive_work_runs_before_queued_ingestion(model):
    gated = Gated(model)
    batcher = Batcher(gated, model.info.dim, batch_tokens=8)  # tiny budget: one sequence per batch
    try:
        blocker = submit(batcher, model, ["busy"], INGESTION)  # on the batcher thread, never inline
        assert gated.entered.wait(10)
        ingestion = submit(batcher, model, ["an ingested document", "another one"], INGESTION)
        query = submit(batcher, model, ["a user's query"], INTERACTIVE)
        gated.gate.set()
        for f in (blocker, ingestion, query):
            f.result(30)
    finally:
        batcher.stop()
    query_ids = plan(model, ["a user's query"]).sequences[0].ids
    order = [batch[0].ids for batch in gated.batches]
    assert order[1] == query_ids  # right after the running batch, ahead of the earlier ingestion job
    assert len(order) == 4


def test_full_queue_refuses_interactive_work_with_retry_after(model):
    gated = Gated(model)
    batcher = Batcher(gated, model.info.dim, max_queued_tokens=40)
    try:
        blocker = submit(batcher, model, ["busy"], INGESTION)  # on the batcher thread, never inline
        assert gated.entered.wait(10)
        first = submit(batcher, model, ["a" * 20])  # about 20 tokens: fits
        with pytest.raises(QueueFull) as info:
            submit(batcher, model, ["b " * 30])
        assert info.value.retry_after >= 1
        ingestion = submit(batcher, model, ["c " * 30], INGESTION)  # the worker's one job is never refused
        gated.gate.set()
        for f in (blocker, first, ingestion):
            assert f.result(30).shape == (1, model.info.dim)
    finally:
        batcher.stop()
    with pytest.raises(BatcherStopped):
        submit(batcher, model, ["after stop"])


def test_a_lone_request_does_not_wait_for_the_window(model):
    batcher = Batcher(model.forward_batch, model.info.dim, max_wait=5.0)
    try:
        submit(batcher, model, ["warm up"]).result(30)
        t0 = time.perf_counter()
        submit(batcher, model, ["how do I reset my password"]).result(30)
        assert time.perf_counter() - t0 < 2.0  # far below the 5 s window
    finally:
        batcher.stop()


def test_embed_chunks_is_prepare_run_assemble(model):
    docs = [MIXED_TEXTS[0] * 8, "short", MIXED_TEXTS[3]]
    direct = model.embed_chunks(docs, mode="chunk", chunk_tokens=40, overlap=8)
    p = model.prepare(docs, "chunk", 40, 8)
    batcher = Batcher(model.forward_batch, model.info.dim, batch_tokens=100)
    try:
        via = p.assemble(batcher.submit(p.sequences, p.n_out).result(30))
    finally:
        batcher.stop()
    assert [[(c.start, c.end, c.n_tokens) for c in d] for d in via] == [
        [(c.start, c.end, c.n_tokens) for c in d] for d in direct
    ]
    for a, b in zip(via, direct, strict=True):
        assert np.abs(np.stack([c.vector for c in a]) - np.stack([c.vector for c in b])).max() < 1e-5
    assert p.n_tokens == [sum(c.n_tokens + 2 for c in doc) for doc in direct]  # + [CLS], [SEP]


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on(model):
    calls = []

    def forward(sequences):  # the real model, given a sequence longer than its window once
        calls.append(len(sequences))
        return model.forward_batch(sequences)

    batcher = Batcher(forward, model.info.dim)
    try:
        too_long = plan(model, ["x"]).sequences[0]
        too_long = type(too_long)(too_long.ids[:1] + [1000] * 600 + too_long.ids[-1:], [(0, 602)], [0])
        failed = batcher.submit([too_long], 1)
        with pytest.raises(Exception):  # noqa: B017 - whatever the model raises reaches the caller
            failed.result(30)
        assert submit(batcher, model, ["still working"]).result(30).shape == (1, model.info.dim)
    finally:
        batcher.stop()
    assert calls == [1, 1]


def test_cancelled_work_is_not_run(model):
    gated = Gated(model)
    batcher = Batcher(gated, model.info.dim)
    try:
        blocker = submit(batcher, model, ["busy"], INGESTION)  # on the batcher thread, never inline
        assert gated.entered.wait(10)
        gone = submit(batcher, model, ["a client that went away"])
        kept = submit(batcher, model, ["a client still waiting"])
        assert gone.cancel()
        gated.gate.set()
        blocker.result(30)
        assert kept.result(30).shape == (1, model.info.dim)
        assert batcher.queue_depth() == (0, 0)
    finally:
        batcher.stop()
    ran = [s.ids for batch in gated.batches for s in batch]
    assert plan(model, ["a client that went away"]).sequences[0].ids not in ran


def test_matryoshka_dimensions_truncate_and_renormalise(model, tmp_path):
    from dataclasses import replace

    from longembed.encoder.profiles import profile_for
    from longembed.plugin.service.errors import ApiError
    from longembed.plugin.service.served import ServedModel

    assert profile_for("nomic-ai/nomic-embed-text-v1.5", tmp_path).matryoshka_dims == (768, 512, 256, 128, 64)
    assert profile_for("nomic-ai/nomic-embed-text-v1", tmp_path).matryoshka_dims == ()
    assert model.info.matryoshka_dims == ()

    batcher = Batcher(model.forward_batch, model.info.dim)
    try:
        served = ServedModel(model, batcher)
        with pytest.raises(ApiError, match="not trained for shorter vectors"):
            served.check_dimensions(128)
        served.check_dimensions(384)  # its own size: nothing to truncate
        served.info = replace(model.info, matryoshka_dims=(384, 128))  # as a Matryoshka profile says
        served.check_dimensions(128)
        with pytest.raises(ApiError, match="one of 128, 384"):
            served.check_dimensions(100)
        p = served.plan(["truncate me"], "document", None, "truncate")
        result = served.finish(p, served.submit(p, INTERACTIVE).result(30), "truncate", 128)
    finally:
        batcher.stop()
    full = model.embed(["truncate me"])[0]
    assert result.vectors.shape == (1, 128)
    # Nomic's published recipe: layer_norm over the full vector (no affine), keep the head, normalise.
    normed = torch.nn.functional.layer_norm(torch.from_numpy(full)[None], (full.shape[0],))[0, :128]
    want = torch.nn.functional.normalize(normed, dim=0).numpy()
    assert np.abs(result.vectors[0] - want).max() < 1e-5


def test_a_small_query_on_an_idle_model_runs_in_the_callers_thread_with_the_same_vectors(model):
    threads = []

    def forward(sequences):
        threads.append(threading.current_thread())
        return model.forward_batch(sequences)

    queries = ["how do I reset my password", "ice cream"]
    inline = Batcher(forward, model.info.dim)
    queued = Batcher(forward, model.info.dim, inline_tokens=0)
    try:
        p = plan(model, queries, kind="query")
        future = inline.submit(p.sequences, p.n_out)
        assert future.done()  # computed before submit returned: no hop to the batcher thread
        fast = future.result()
        slow = queued.submit(p.sequences, p.n_out).result(30)
        big = submit(inline, model, ["word " * 100])  # over inline_tokens: the batcher thread runs it
        big.result(30)
    finally:
        inline.stop()
        queued.stop()
    assert threads[0] is threading.current_thread()
    assert threads[1] is not threading.current_thread() and threads[2] is not threading.current_thread()
    assert np.array_equal(fast, slow)
    assert np.abs(fast - model.embed(queries, kind="query")).max() < 1e-6


def test_work_that_queued_behind_an_inline_query_runs_when_it_ends(model):
    """A caller running the model inline holds it; what arrives meanwhile queues, and the batcher
    thread (asleep while the caller runs) is woken when the inline run ends."""
    gated = Gated(model)
    batcher = Batcher(model.forward_batch, model.info.dim, forward_alone=gated)
    try:
        inline_result = []
        caller = threading.Thread(
            target=lambda: inline_result.append(submit(batcher, model, ["a short query"]).result(30))
        )
        caller.start()
        assert gated.entered.wait(10)  # the caller's thread is inside the model
        queued = submit(batcher, model, ["another short query"])
        time.sleep(0.05)
        assert not queued.done()
        gated.gate.set()
        caller.join(30)
        assert np.abs(queued.result(10) - model.embed(["another short query"])).max() < 1e-6
        assert np.abs(inline_result[0] - model.embed(["a short query"])).max() < 1e-6
    finally:
        batcher.stop()
    assert len(gated.batches) == 1  # the queued one ran on the batcher thread's forward


def test_a_small_query_waits_its_turn_while_the_model_is_busy(model):
    gated = Gated(model)
    batcher = Batcher(gated, model.info.dim)
    try:
        blocker = submit(batcher, model, ["busy"], INGESTION)
        assert gated.entered.wait(10)
        query = submit(batcher, model, ["a short query"])
        assert not query.done()  # one forward pass at a time: not run beside the busy one
        gated.gate.set()
        assert np.abs(query.result(30) - model.embed(["a short query"])).max() < 1e-6
        blocker.result(30)
    finally:
        batcher.stop()
    assert len(gated.batches) == 2


def test_a_lone_inline_query_may_take_every_core_unless_work_waited_lately(model, monkeypatch):
    """forward_alone (the host: forward_batch with spare_cores) serves an inline job only while no job
    has had to wait for the busy model for CONTENTION_MEMORY_S: with other callers about, their
    tokenising needs the other cores."""
    from longembed.plugin.service import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "CONTENTION_MEMORY_S", 0.5)
    gated = Gated(model)
    alone_calls: list[int] = []

    def alone(sequences):
        alone_calls.append(len(sequences))
        return model.forward_batch(sequences, spare_cores=True)

    batcher = Batcher(gated, model.info.dim, forward_alone=alone)
    query = "how do I reset my password"
    try:
        gated.gate.set()  # the plain forward runs at once in this test
        first = submit(batcher, model, [query]).result(30)  # the model idle, nothing waited: alone
        assert alone_calls == [1] and gated.batches == []
        gated.gate.clear()
        gated.entered.clear()
        blocker = submit(batcher, model, ["holding the model busy"], INGESTION)
        assert gated.entered.wait(10)
        waited = submit(batcher, model, [query])  # queues behind the busy model: contention seen
        gated.gate.set()
        blocker.result(30)
        waited.result(30)
        runs = len(gated.batches)
        again = submit(batcher, model, [query]).result(30)  # inline, but work waited just now
        assert alone_calls == [1] and len(gated.batches) == runs + 1
        time.sleep(0.6)  # the contention is forgotten
        last = submit(batcher, model, [query]).result(30)
        assert alone_calls == [1, 1]
    finally:
        batcher.stop()
    reference = model.embed([query])
    for rows in (first, again, last):
        assert np.abs(rows - reference).max() < 1e-5
