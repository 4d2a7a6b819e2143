"""The queue and worker under failure: SIGKILL mid-batch, two workers, retries, stale leases.

Workers run as real `longembed worker` processes with the real MiniLM model where the failure is a
process dying; lease and retry rules are driven in-process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from psycopg import sql

from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.pipeline import queue
from longembed.plugin.pipeline.worker import Worker, WorkerConfig
from longembed.plugin.store.collections import create_collection
from longembed.plugin.store.documents import Document, add_documents, document_states
from tests.pgdb import migrated_database

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = [
    "river",
    "castle",
    "violin",
    "glacier",
    "comet",
    "orchard",
    "lighthouse",
    "desert",
    "harbour",
    "forest",
]


def short_docs(prefix: str, n: int) -> list[Document]:
    return [
        Document(f"{prefix}{i}", f"Note {i} about a {SUBJECTS[i % 10]} seen on day {i // 10} of the journey.")
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def model():
    return get_model()


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_worker") as url:
        yield url


@pytest.fixture(scope="module")
def conn(dsn):
    with connect(dsn) as c:
        yield c


def start_worker(dsn: str, collection: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "longembed.plugin.cli",
            "worker",
            "--dsn",
            dsn,
            "--collection",
            collection,
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def counts(conn, collection_id: int) -> tuple[int, int]:
    """(embedded documents, queue rows under a lease) of a collection."""
    return conn.execute(
        """SELECT (SELECT count(*) FROM longembed.documents
                   WHERE collection_id = %(c)s AND status = 'embedded'),
                  (SELECT count(*) FROM longembed.queue
                   WHERE collection_id = %(c)s AND lease_token IS NOT NULL)""",
        {"c": collection_id},
    ).fetchone()


def assert_all_embedded_once(conn, collection, n: int) -> None:
    states = document_states(conn, collection)
    assert len(states) == n
    assert {s.status for s in states.values()} == {"embedded"}
    assert {s.embed_count for s in states.values()} == {1}  # no document written twice
    assert all(s.n_chunks == 1 for s in states.values())  # short texts: one chunk, no duplicate rows
    (queued,) = conn.execute(
        "SELECT count(*) FROM longembed.queue WHERE collection_id = %s", (collection.id,)
    ).fetchone()
    assert queued == 0


def test_sigkill_mid_batch_then_restart(conn, dsn, model):
    collection = create_collection(conn, "crash", model.info)
    add_documents(conn, collection, short_docs("c", 40))
    worker = start_worker(dsn, "crash", "--batch-tokens", "60", "--lease-seconds", "3")
    try:
        # Kill while a batch is claimed (leased) and being embedded, after some batches were written.
        def mid_batch() -> bool:
            embedded, leased = counts(conn, collection.id)
            return embedded >= 6 and leased > 0

        wait_for(mid_batch, 120, "a batch in progress after some were written")
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        worker.kill()
        worker.communicate()
    in_flight = [
        row[0]
        for row in conn.execute(
            "SELECT document_id FROM longembed.queue WHERE lease_token IS NOT NULL"
        ).fetchall()
    ]
    embedded_before, _ = counts(conn, collection.id)
    assert in_flight and embedded_before < 40
    # The dead worker's batch stays leased (nobody else may take it) until the lease runs out.
    (wait,) = conn.execute(
        "SELECT extract(epoch FROM max(leased_until) - now()) FROM longembed.queue"
    ).fetchone()
    time.sleep(max(0.0, float(wait)) + 0.2)

    restarted = start_worker(dsn, "crash", "--once", "--batch-tokens", "200")
    _, err = restarted.communicate(timeout=180)
    assert restarted.returncode == 0, err
    assert_all_embedded_once(conn, collection, 40)
    attempts = dict(conn.execute("SELECT id, attempts FROM longembed.documents").fetchall())
    assert {attempts[i] for i in in_flight} == {2}  # claimed by the killed worker, then by the new one


def test_two_worker_processes_share_one_queue_without_duplicates(conn, dsn, model):
    collection = create_collection(conn, "pair", model.info)
    workers = start_worker(dsn, "pair", "--processes", "2", "--batch-tokens", "60")
    try:
        # Both children log "started" once their model is loaded; enqueue only then, so both compete.
        started = []

        def both_started() -> bool:
            line = workers.stderr.readline()
            if not line and workers.poll() is not None:
                raise AssertionError(f"workers exited early: {workers.stderr.read()}")
            if "started" in line:
                started.append(line)
            return len(started) == 2

        wait_for(both_started, 120, "two workers to start")
        # Each polls an empty queue once a second, so the first awake could embed all 80 before the
        # other looks. The chunk table locked against writes holds the first at its first write until
        # the other has claimed a batch too; then both run as they like.
        with connect(dsn) as blocker, blocker.transaction():
            blocker.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(collection.chunk_table))
            add_documents(conn, collection, short_docs("p", 80))

            def two_batches_claimed() -> bool:
                (leases,) = conn.execute(
                    "SELECT count(DISTINCT lease_token) FROM longembed.queue WHERE lease_token IS NOT NULL"
                ).fetchone()
                return leases == 2

            wait_for(two_batches_claimed, 60, "both workers to claim a batch")
            assert counts(conn, collection.id)[0] == 0  # the lock held every write so far
        wait_for(lambda: counts(conn, collection.id)[0] == 80, 180, "all documents embedded")
        workers.send_signal(signal.SIGTERM)  # graceful: children finish their batch and exit 0
        _, err = workers.communicate(timeout=60)
    finally:
        workers.kill()
    assert workers.returncode == 0, err
    embedded = [int(n) for n in re.findall(r"stopped: (\d+) embedded", err)]
    assert len(embedded) == 2 and sum(embedded) == 80, err
    assert all(n > 0 for n in embedded), embedded  # both took part
    assert_all_embedded_once(conn, collection, 80)


class FailsOnPoison:
    """The real model, except that a text containing POISON raises (an encoder failure on one input)."""

    def __init__(self, model):
        self.model, self.info = model, model.info

    def count_tokens(self, texts):
        return self.model.count_tokens(texts)

    def embed_documents(self, texts, **kwargs):
        if any("POISON" in t for t in texts):
            raise RuntimeError("cannot embed this text")
        return self.model.embed_documents(texts, **kwargs)


def test_failures_retry_with_backoff_then_park(conn, model):
    collection = create_collection(conn, "retry", model.info)
    add_documents(conn, collection, [*short_docs("r", 3), Document("bad", "POISON pill text")])
    worker = Worker(conn, FailsOnPoison(model), WorkerConfig(max_attempts=3, backoff_base=0.3), ["retry"])
    stats = worker.run_once()
    # The batch failed as a whole, then one by one: the good documents are written anyway.
    assert (stats.embedded, stats.retrying, stats.parked) == (3, 1, 0)
    delays = []
    for attempt in (1, 2):
        (delay, error, attempts) = conn.execute(
            "SELECT extract(epoch FROM next_attempt_at - now()), last_error, attempts FROM longembed.queue"
        ).fetchone()
        assert attempts == attempt and error == "RuntimeError: cannot embed this text"
        delays.append(float(delay))
        assert worker.run_once().batches == 0  # backing off: not claimable yet
        time.sleep(float(delay) + 0.05)
        stats = worker.run_once()
    assert delays[0] == pytest.approx(0.3, abs=0.1) and delays[1] == pytest.approx(0.6, abs=0.1)
    assert stats.parked == 1
    bad = document_states(conn, collection)["bad"]
    assert (bad.status, bad.attempts, bad.error) == ("failed", 3, "RuntimeError: cannot embed this text")
    assert conn.execute("SELECT count(*) FROM longembed.queue").fetchone()[0] == 0
    # Sending it again gives it a new chance.
    assert add_documents(conn, collection, [Document("bad", "POISON pill text")]).counts == {"requeued": 1}
    assert document_states(conn, collection)["bad"].status == "queued"


def test_stale_results_are_dropped(conn, model):
    collection = create_collection(conn, "stale", model.info)
    add_documents(conn, collection, short_docs("s", 2))
    chunks = {}
    slow = queue.new_token()
    claimed = queue.claim(conn, slow, [collection.id], limit=10, lease_seconds=0.3)
    assert len(claimed) == 2
    for item in claimed:
        chunks[item.document_id] = model.embed_chunks([item.text])[0]
    # s0 gets new text while the slow worker embeds it; s1's lease runs out and another worker takes it.
    add_documents(conn, collection, [Document("s0", "Completely different text about trains.")])
    time.sleep(0.4)
    assert Worker(conn, model, collections=["stale"]).drain().embedded == 2
    written = queue.write_results(conn, slow, collection, model.info.revision, chunks)
    assert written == []  # both results stale: nothing overwritten
    states = document_states(conn, collection)
    assert states["s0"].embed_count == 1 and states["s1"].embed_count == 1
    (start, end) = conn.execute(
        sql.SQL(
            "SELECT char_start, char_end FROM {} c JOIN longembed.documents d ON d.id = c.document_id "
            "WHERE d.external_id = 's0'"
        ).format(collection.chunk_table)
    ).fetchone()
    assert (start, end) == (0, len("Completely different text about trains."))


def test_document_whose_worker_always_dies_is_parked(conn, model):
    collection = create_collection(conn, "doomed", model.info)
    add_documents(conn, collection, short_docs("d", 1))
    for _ in range(2):  # two workers claim it and die: their leases simply run out
        assert len(queue.claim(conn, queue.new_token(), [collection.id], limit=1, lease_seconds=0.05)) == 1
        time.sleep(0.1)
    stats = Worker(conn, model, WorkerConfig(max_attempts=2), ["doomed"]).run_once()
    assert stats.parked == 1 and stats.embedded == 0
    state = document_states(conn, collection)["d0"]
    assert state.status == "failed" and state.error.startswith("no result after 2 leases")


def test_worker_reconnects_after_losing_its_connection(conn, dsn, model):
    collection = create_collection(conn, "reconnect", model.info)
    worker = start_worker(dsn, "reconnect", "--batch-tokens", "60", "--lease-seconds", "2")
    try:
        wait_for(lambda: "started" in worker.stderr.readline(), 120, "the worker to start")
        add_documents(conn, collection, short_docs("n", 30))
        wait_for(lambda: counts(conn, collection.id)[0] >= 5, 120, "some documents embedded")
        (killed,) = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'longembed worker' AND datname = current_database()"
        ).fetchone()
        assert killed == 1
        wait_for(lambda: counts(conn, collection.id)[0] == 30, 180, "the rest embedded after reconnecting")
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert "database connection lost" in err and "reconnecting" in err
    assert_all_embedded_once(conn, collection, 30)


class Recording:
    """The real model; each embed call records how many items of the queue were leased meanwhile and how
    many texts it got, then waits `delay` seconds (a slow batch)."""

    def __init__(self, model, dsn: str, delay: float = 0.0):
        self.model, self.info, self.dsn, self.delay = model, model.info, dsn, delay
        self.calls: list[tuple[int, int]] = []

    def count_tokens(self, texts):
        return self.model.count_tokens(texts)

    def embed_documents(self, texts, **kwargs):
        with connect(self.dsn) as other:
            (leased,) = other.execute(
                "SELECT count(*) FROM longembed.queue WHERE leased_until > now()"
            ).fetchone()
        self.calls.append((leased, len(texts)))
        time.sleep(self.delay)
        return self.model.embed_documents(texts, **kwargs)


def test_claims_what_fits_the_token_budget(conn, dsn, model):
    """~14-token notes and a 60-token budget: a worker leases about 4 of them, not 64, so a crash
    strands only what it was embedding, and only those are charged an attempt."""
    collection = create_collection(conn, "fits", model.info)
    add_documents(conn, collection, short_docs("f", 40))
    recording = Recording(model, dsn)
    worker = Worker(conn, recording, WorkerConfig(batch_tokens=60), ["fits"])
    stats = worker.run_once()
    assert 1 <= stats.embedded <= 5
    assert recording.calls == [(stats.embedded, stats.embedded)]  # leased = being embedded
    untouched = conn.execute(
        "SELECT count(*) FROM longembed.queue "
        "WHERE collection_id = %s AND attempts = 0 AND lease_token IS NULL",
        (collection.id,),
    ).fetchone()[0]
    assert untouched == 40 - stats.embedded
    worker.drain()
    assert_all_embedded_once(conn, collection, 40)
    assert all(leased == texts for leased, texts in recording.calls), recording.calls


def test_failed_write_keeps_the_release_of_what_did_not_fit(conn, model):
    """The write of a batch fails (a deadlock, injected by a trigger): the items claimed but not in the
    batch are claimable again at once, without an attempt charged."""
    collection = create_collection(conn, "deadlock", model.info)
    # Two bytes per token: the first claim (sized in bytes at ~4 bytes per token) takes twice what fits.
    add_documents(conn, collection, [Document(f"k{i}", "7 " * 20) for i in range(6)])
    conn.execute(
        """CREATE FUNCTION pg_temp.fail_write() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'injected deadlock' USING ERRCODE = 'deadlock_detected'; END $$"""
    )
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER fail_write BEFORE INSERT ON {} "
            "FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.fail_write()"
        ).format(collection.chunk_table)
    )
    stats = Worker(conn, model, WorkerConfig(batch_tokens=60, backoff_base=60), ["deadlock"]).run_once()
    assert stats.embedded == 0 and stats.retrying == 3  # the 3 documents that fit 60 tokens
    rows = conn.execute(
        """SELECT document_id, attempts, leased_until IS NULL, next_attempt_at <= now()
           FROM longembed.queue WHERE collection_id = %s ORDER BY document_id""",
        (collection.id,),
    ).fetchall()
    failed = [r for r in rows if r[1] == 1]
    released = [r for r in rows if r[1] == 0]
    assert len(failed) == 3 and len(released) == 3, rows
    assert all(r[2] and r[3] for r in released)  # not leased, ready now
    again = queue.claim(conn, queue.new_token(), [collection.id], limit=10, lease_seconds=60)
    assert sorted(item.document_id for item in again) == [r[0] for r in released]


def test_leases_are_renewed_while_a_slow_batch_embeds(conn, dsn, model):
    """A 1-second lease and a batch that takes 3 seconds: nobody else can claim it meanwhile, and its
    results are written, not dropped."""
    collection = create_collection(conn, "slow", model.info)
    add_documents(conn, collection, short_docs("w", 3))
    worker = Worker(conn, Recording(model, dsn, delay=3.0), WorkerConfig(lease_seconds=1.0), ["slow"])
    done: list = []
    thread = threading.Thread(target=lambda: done.append(worker.run_once()))
    thread.start()
    try:
        time.sleep(1.8)  # the first lease ran out long ago without a heartbeat
        with connect(dsn) as other:
            stolen = queue.claim(other, queue.new_token(), [collection.id], limit=10, lease_seconds=60)
    finally:
        thread.join()
    assert stolen == []
    assert (done[0].embedded, done[0].dropped) == (3, 0)
    assert_all_embedded_once(conn, collection, 3)


def test_an_idle_worker_is_woken_by_queued_documents(conn, dsn, model):
    """LISTEN/NOTIFY: with a 30 s poll, documents queued while the worker idles are embedded at once,
    and a stop ends the wait within a fraction of a second."""
    collection = create_collection(conn, "woken", model.info)
    stop = threading.Event()

    def work() -> None:
        with connect(dsn) as own, queue.Wakeup(dsn) as wakeup:
            Worker(own, model, WorkerConfig(poll_interval=30), ["woken"]).run(stop, wakeup=wakeup)

    thread = threading.Thread(target=work)
    thread.start()
    try:
        time.sleep(1.0)  # found nothing, now waiting
        queued_at = time.monotonic()
        add_documents(conn, collection, short_docs("w", 3))
        wait_for(lambda: counts(conn, collection.id)[0] == 3, 25, "the documents embedded before the poll")
        assert time.monotonic() - queued_at < 10
        time.sleep(0.5)  # idle again
    finally:
        stopped_at = time.monotonic()
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and time.monotonic() - stopped_at < 2


def test_a_wakeup_without_its_connection_is_a_plain_wait(caplog):
    with queue.Wakeup("postgresql://nobody@127.0.0.1:1/none") as wakeup:
        assert "polling only" in caplog.text
        stop = threading.Event()
        started = time.monotonic()
        wakeup.wait(stop, 0.3)
        assert 0.25 < time.monotonic() - started < 2
        stop.set()
        started = time.monotonic()
        wakeup.wait(stop, 30)
        assert time.monotonic() - started < 0.1
