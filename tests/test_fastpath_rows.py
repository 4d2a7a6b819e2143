"""The rows the hnswlib fast path holds beside its vectors (plugin/service/ann.py), and searches answered
from them without PostgreSQL (in process and over /v1/search). Real PostgreSQL, real hnswlib, real MiniLM,
a real host over loopback HTTP."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psycopg
import pytest
from psycopg import sql

from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker
from longembed.plugin.service import jsonb
from longembed.plugin.service.ann import CollectionIndex, label_of
from longembed.plugin.service.fastpath import HNSWLIB, POLL_S, FastPath
from longembed.plugin.service.host import HostConfig
from longembed.plugin.store.collections import create_collection, drop_collection
from longembed.plugin.store.documents import Document, add_documents, delete_documents
from longembed.plugin.store.search import SNIPPET_CHARS, search, search_by_vector
from longembed.plugin.store.vectorize import vectorize_table
from tests.hostutil import running_host
from tests.pgdb import migrated_database
from tests.test_hnsw_fastpath import DIM, Dims16, _wait_synced

WORDS = ["naïve", "café", "Straße", "日本語", "emoji 🙂", "plain", "words", "x" * 40, "\t tab", "line\nbreak"]


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_rows") as url:
        yield url


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))


def _vector(rng: random.Random) -> np.ndarray:
    return np.array([rng.gauss(0, 1) for _ in range(DIM)], dtype=np.float32)


def _add_chunks(conn, collection, doc: int, text_length: int, rng: random.Random, first: int = 0) -> None:
    """1-3 chunks with spans inside (and one past the end of) the text, some truncated."""
    rows = []
    for ordinal in range(first, first + rng.randint(1, 3)):
        start = rng.randint(0, text_length)
        end = start + rng.randint(0, 700)  # past SNIPPET_CHARS, and past the text's end
        rows.append((doc, ordinal, start, end, rng.random() < 0.3, _vector(rng)))
    _insert_chunks(conn, collection, rows)


def _insert_chunks(conn, collection, rows: list[tuple]) -> None:
    """rows: (document id, ordinal, char_start, char_end, truncated, embedding)."""
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (document_id, ordinal, char_start, char_end, n_tokens, truncated, embedding) "
                "VALUES (%s, %s, %s, %s, 1, %s, %s)"
            ).format(collection.chunk_table),
            rows,
        )


def _doc_id(conn, collection, external_id: str) -> int:
    return conn.execute(
        "SELECT id FROM longembed.documents WHERE collection_id = %s AND external_id = %s",
        (collection.id, external_id),
    ).fetchone()[0]


def _new_document(conn, collection, rng: random.Random, external_id: str) -> None:
    text = _text(rng)
    add_documents(
        conn, collection, [Document(external_id, text, {"n": rng.randint(0, 9), "w": rng.choice(WORDS)})]
    )
    _add_chunks(conn, collection, _doc_id(conn, collection, external_id), len(text), rng)


def _expected(conn, collection) -> tuple[dict, dict]:
    """The rows a search result shows, computed here from the tables (the snippet as Python slices the
    text: PostgreSQL's substr counts characters, as Python does)."""
    found = conn.execute(
        sql.SQL(
            "SELECT c.document_id, c.ordinal, c.char_start, c.char_end, c.truncated, d.text, d.external_id, "
            "d.metadata FROM {} c JOIN longembed.documents d ON d.id = c.document_id"
        ).format(collection.chunk_table)
    ).fetchall()
    chunks = {
        label_of(d, o): (s, e, text[s : s + min(e - s, SNIPPET_CHARS)], t)
        for d, o, s, e, t, text, _, _ in found
    }
    documents = {d: (ext, meta) for d, *_, ext, meta in found}
    return chunks, documents


def _assert_rows(index: CollectionIndex, conn, collection) -> None:
    chunks, documents = _expected(conn, collection)
    held_chunks, held_documents = index.held_rows()
    assert held_chunks == chunks
    assert {d: (ext, json.loads(meta)) for d, (ext, meta) in held_documents.items()} == documents
    assert set(index.vectors()) == set(chunks)


def _random_changes(conn, collection, rng: random.Random, n: int) -> None:
    """Chunk inserts, updates (vector, span, flag) and deletes; document metadata, text and external id
    updates that leave the chunks alone; document deletes and new documents; rows of a vectorized table."""
    table = collection.chunk_table
    for step in range(n):
        docs = conn.execute(
            "SELECT id, external_id, text FROM longembed.documents WHERE collection_id = %s ORDER BY id",
            (collection.id,),
        ).fetchall()
        chunks = conn.execute(sql.SQL("SELECT document_id, ordinal FROM {}").format(table)).fetchall()
        op = rng.choice(
            [
                "chunk_insert",
                "chunk_update",
                "chunk_delete",
                "metadata",
                "text",
                "rename",
                "drop",
                "new",
                "user",
            ]
        )
        doc, ext, text = rng.choice(docs)
        if op == "chunk_insert":
            last = conn.execute(
                sql.SQL("SELECT coalesce(max(ordinal), -1) FROM {} WHERE document_id = %s").format(table),
                (doc,),
            ).fetchone()[0]
            _add_chunks(conn, collection, doc, len(text), rng, first=last + 1)
        elif op == "chunk_update" and chunks:
            d, o = rng.choice(chunks)
            start = rng.randint(0, 50)
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET embedding = %s, char_start = %s, char_end = %s, truncated = NOT truncated "
                    "WHERE document_id = %s AND ordinal = %s"
                ).format(table),
                (_vector(rng), start, start + rng.randint(1, 400), d, o),
            )
        elif op == "chunk_delete" and chunks:
            d, o = rng.choice(chunks)
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE document_id = %s AND ordinal = %s").format(table), (d, o)
            )
        elif op == "metadata":  # same text: upsert replaces the metadata only
            add_documents(conn, collection, [Document(ext, text, {"n": rng.randint(0, 9), "step": step})])
        elif op == "text":  # a new text, queued: the old chunks' spans now cut the new text
            add_documents(conn, collection, [Document(ext, _text(rng), {"n": rng.randint(0, 9)})])
        elif op == "rename":
            conn.execute(
                "UPDATE longembed.documents SET external_id = %s WHERE id = %s", (f"{ext}-r{step}", doc)
            )
        elif op == "drop" and len(docs) > 10:
            delete_documents(conn, collection, [ext])
        elif op == "new":
            _new_document(conn, collection, rng, f"new{step}")
        elif op == "user":  # the vectorized table: a new row (then its chunks), a changed text, a delete
            rows = [r[0] for r in conn.execute("SELECT id FROM notes_src ORDER BY id")]
            choice = rng.choice(["insert", "update", "delete"]) if rows else "insert"
            if choice == "insert":
                body = _text(rng)
                row = conn.execute(
                    "INSERT INTO notes_src (body) VALUES (%s) RETURNING id", (body,)
                ).fetchone()[0]
                _add_chunks(conn, collection, _doc_id(conn, collection, str(row)), len(body), rng)
            elif choice == "update":
                conn.execute("UPDATE notes_src SET body = %s WHERE id = %s", (_text(rng), rng.choice(rows)))
            else:
                conn.execute("DELETE FROM notes_src WHERE id = %s", (rng.choice(rows),))


def _assert_same_as_sql(fast: FastPath, conn, collection, rng: random.Random, queries: int = 10) -> None:
    for _ in range(queries):
        query = _vector(rng)
        got = fast.search(collection, query, 10, ef_search=400)
        want = search_by_vector(conn, collection, query, 10, ef_search=400)
        assert got is not None and len(got) == len(want)
        assert [r.external_id for r in got] == [r.external_id for r in want]
        # pgvector sums in float32 (ip: a float32 result), the fast path in float64: equal to ~1e-7 relative
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-6, atol=1e-6)
        same = [dataclasses.replace(r, score=0.0) for r in got]
        assert same == [dataclasses.replace(r, score=0.0) for r in want]


def test_rows_mirror_the_tables_through_changes_and_a_restart(dsn, tmp_path):
    rng = random.Random(3)
    with connect(dsn) as conn:
        collection = create_collection(
            conn, "rows", Dims16(), chunk_tokens=64, overlap=0, search_mode="chunks"
        )
        for i in range(150):
            _new_document(conn, collection, rng, f"d{i}")
        conn.execute("CREATE TABLE notes_src (id serial PRIMARY KEY, body text)")
        vectorize_table(conn, "notes_src", "id", "body", collection)

        fast = FastPath(dsn, ("rows",), tmp_path)
        fast.start()
        try:
            fast.wait_ready("rows", 60)
            _assert_rows(_wait_synced(fast, "rows", conn), conn, collection)
            _random_changes(conn, collection, rng, 250)
            index = _wait_synced(fast, "rows", conn)
            _assert_rows(index, conn, collection)
            _assert_same_as_sql(fast, conn, collection, rng)
            assert index.staleness(conn).pending == 0
        finally:
            fast.stop()  # saves
        saved = next(tmp_path.glob("c*"))
        assert {p.name for p in saved.iterdir()} == {"index.bin", "rows.npz", "meta.json"}
        assert all(p.stat().st_mode & 0o077 == 0 for p in saved.iterdir())

        _random_changes(conn, collection, rng, 150)  # while the host is down
        with conn.transaction():  # and many statements in one transaction
            _random_changes(conn, collection, rng, 30)

        fast = FastPath(dsn, ("rows",), tmp_path)
        fast.start()
        try:
            fast.wait_ready("rows", 60)
            index = _wait_synced(fast, "rows", conn)
            assert index.loaded, "the restarted host rebuilt instead of catching up from its saved rows"
            _assert_rows(index, conn, collection)
            _assert_same_as_sql(fast, conn, collection, rng)
        finally:
            fast.stop()


def test_worker_status_updates_log_nothing_and_unchanged_metadata_neither(dsn, tmp_path):
    """The documents trigger logs only changes a result shows: not the worker's status updates, not a
    metadata upsert with the same value, and nothing while the collection has no consumer."""
    rng = random.Random(5)
    with connect(dsn) as conn:
        collection = create_collection(
            conn, "quiet", Dims16(), chunk_tokens=64, overlap=0, search_mode="chunks"
        )
        _new_document(conn, collection, rng, "a")
        conn.execute(
            "UPDATE longembed.documents SET metadata = '{\"z\": 1}' WHERE collection_id = %s",
            (collection.id,),
        )
        source = f"chunks_{collection.id}"

        def logged() -> int:
            return conn.execute(
                "SELECT count(*) FROM longembed.vector_changes WHERE source = %s", (source,)
            ).fetchone()[0]

        assert logged() == 0  # no consumer yet
        index = CollectionIndex(collection, tmp_path)
        index.build(conn)
        conn.execute(
            "UPDATE longembed.documents SET status = 'embedded', attempts = attempts + 1, embed_count = 1 "
            "WHERE collection_id = %s",
            (collection.id,),
        )
        text = conn.execute("SELECT text FROM longembed.documents WHERE external_id = 'a'").fetchone()[0]
        add_documents(conn, collection, [Document("a", text, {"z": 1})])
        assert logged() == 0
        add_documents(conn, collection, [Document("a", text, {"z": 2})])
        assert logged() == 1
        assert index.sync(conn) == 1
        assert json.loads(next(iter(index.held_rows()[1].values()))[1]) == {"z": 2}


@pytest.mark.parametrize("distance", ["cosine", "l2", "ip"])
def test_scores_and_ranking_agree_with_sql(dsn, tmp_path, distance):
    rng = random.Random(11)
    name = f"scores-{distance}"
    with connect(dsn) as conn:
        collection = create_collection(
            conn, name, Dims16(), chunk_tokens=64, overlap=0, distance=distance, search_mode="chunks"
        )
        for i in range(400):
            _new_document(conn, collection, rng, f"d{i:03d}")
        fast = FastPath(dsn, (name,), tmp_path)
        fast.start()
        try:
            fast.wait_ready(name, 60)
            _assert_same_as_sql(fast, conn, collection, rng, queries=20)
        finally:
            fast.stop()


MINI = {
    "volcano": "Volcanoes form where magma rises through cracks in the crust; lava and ash follow.",
    "sourdough": "Sourdough bread rises with a starter of wild yeast; feed it flour and water before baking.",
    "chess": "The Sicilian Defence answers 1.e4 with c5 and is the most popular reply in chess openings.",
    "tides": "Tides follow the moon: its gravity pulls the oceans into two bulges under the turning earth.",
}


def test_http_search_answers_without_the_database(dsn, tmp_path):
    """With the index ready, /v1/search (text or vector, no filter) answers while another session holds
    the collections and documents tables locked exclusively, and the host never opened a search
    connection; a filtered search still reads PostgreSQL; a dropped collection is a 404 within a poll."""
    model = get_model()
    with connect(dsn) as conn:
        create_collection(conn, "http-rows", model, chunk_tokens=64, overlap=8, search_mode="chunks")
        add_documents(conn, "http-rows", [Document(k, t, {"topic": k}) for k, t in MINI.items()])
        assert Worker(conn, model).drain().embedded == len(MINI)
        config = HostConfig(dsn=dsn, worker=False, hnsw=("http-rows",), hnsw_dir=str(tmp_path / "idx"))
        with running_host(config) as host:
            host.host.fastpath.wait_ready("http-rows", 60)
            client = httpx.Client(base_url=host.url, timeout=20)
            sql_rows = search(conn, "http-rows", "baking bread", k=3, ef_search=100)
            vector = model.embed(["baking bread"], kind="query")[0].tolist()
            with psycopg.connect(dsn) as locker:
                locker.execute(
                    "LOCK TABLE longembed.collections, longembed.documents IN ACCESS EXCLUSIVE MODE"
                )
                by_text = client.post(
                    "/v1/search",
                    json={"collection": "http-rows", "query": "baking bread", "k": 3, "ef_search": 100},
                )
                by_vector = client.post(
                    "/v1/search", json={"collection": "http-rows", "vector": vector, "k": 3, "ef_search": 100}
                )
                by_filter = client.post(
                    "/v1/search",
                    json={"collection": "http-rows", "query": "bread", "k": 2, "filter": {"topic": "tides"}},
                )
                bad = client.post("/v1/search", json={"collection": "http-rows", "vector": [0.5] * 3})
                bad_k = client.post("/v1/search", json={"collection": "http-rows", "query": "x", "k": 0})
                locker.rollback()
            assert by_text.status_code == 200 and by_vector.status_code == 200, (by_text.text, by_vector.text)
            assert by_filter.status_code == 200 and by_filter.json()["index"] == HNSWLIB
            assert [r["external_id"] for r in by_filter.json()["data"]] == ["tides"]
            assert bad.status_code == 400 and "shape" in bad.json()["error"]["message"]
            assert bad_k.status_code == 400 and "k must be" in bad_k.json()["error"]["message"]
            for body in (by_text.json(), by_vector.json()):
                assert body["index"] == HNSWLIB and body["collection"] == "http-rows"
                assert body["model"] == model.info.name
                assert [r["external_id"] for r in body["data"]] == [r.external_id for r in sql_rows]
                assert [r["snippet"] for r in body["data"]] == [r.snippet for r in sql_rows]
                assert [r["metadata"] for r in body["data"]] == [r.metadata for r in sql_rows]
                np.testing.assert_allclose(
                    [r["score"] for r in body["data"]], [r.score for r in sql_rows], atol=1e-6
                )
            assert (
                by_text.json()["usage"]["total_tokens"] > 0 and by_vector.json()["usage"]["total_tokens"] == 0
            )
            searching = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'longembed host search'"
            ).fetchone()[0]
            assert searching == 0, "the fast path took a database connection"

            # While a sync step holds the index (a long catch-up), a search waits in a worker thread, not
            # on the event loop: /health still answers meanwhile.
            lock = host.host.fastpath.index("http-rows").lock
            with lock, ThreadPoolExecutor(1) as pool:
                pending = pool.submit(
                    client.post, "/v1/search", json={"collection": "http-rows", "vector": vector, "k": 3}
                )
                assert client.get("/health").status_code == 200
                time.sleep(0.2)
                assert not pending.done()
                lock.release()
                try:
                    waited = pending.result(timeout=20)
                finally:
                    lock.acquire()
            assert waited.status_code == 200 and waited.json()["index"] == HNSWLIB

            filtered = client.post(
                "/v1/search",
                json={"collection": "http-rows", "query": "bread", "k": 2, "filter": {"topic": "tides"}},
            ).json()
            assert filtered["index"] == HNSWLIB and [r["external_id"] for r in filtered["data"]] == ["tides"]

            assert drop_collection(conn, "http-rows")
            deadline = time.monotonic() + 10 * POLL_S + 5
            while True:
                gone = client.post("/v1/search", json={"collection": "http-rows", "query": "bread"})
                if gone.status_code == 404:
                    break
                assert gone.status_code == 200 and time.monotonic() < deadline, gone.text
                time.sleep(0.1)


def test_a_document_change_running_at_registration_reaches_the_rows(dsn, tmp_path):
    """A metadata update whose trigger ran before the index registered (so it logged nothing) and that
    commits after: the build waits for it and reads its result, rather than miss it for ever."""
    rng = random.Random(8)
    with connect(dsn) as conn, connect(dsn) as writer:
        collection = create_collection(
            conn, "race", Dims16(), chunk_tokens=64, overlap=0, search_mode="chunks"
        )
        _new_document(conn, collection, rng, "a")
        with writer.transaction():
            writer.execute(
                "UPDATE longembed.documents SET metadata = '{\"late\": true}' WHERE collection_id = %s",
                (collection.id,),
            )
            index = CollectionIndex(collection, tmp_path)
            done = threading.Event()
            builder = threading.Thread(target=lambda: (index.build(conn), done.set()), daemon=True)
            builder.start()
            assert not done.wait(1.0), "the build did not wait for a transaction older than its registration"
        assert done.wait(30)
        assert [json.loads(meta) for _, meta in index.held_rows()[1].values()] == [{"late": True}]


def test_many_chunks_of_few_documents_widen_the_candidates_as_sql_does(dsn, tmp_path):
    """40 candidate chunks can all be one document's: the search widens 4x at a time until k documents
    come back, as search_vector does, from memory."""
    rng = random.Random(12)
    with connect(dsn) as conn:
        collection = create_collection(
            conn, "wide", Dims16(), chunk_tokens=64, overlap=0, search_mode="chunks"
        )
        centre = _vector(rng)
        for i in range(8):  # document i's chunks all lie nearer the centre than document i + 1's
            away = _vector(rng) * (0.1 * i / np.linalg.norm(centre))
            text = _text(rng)
            add_documents(conn, collection, [Document(f"w{i}", text, {"i": i})])
            doc = _doc_id(conn, collection, f"w{i}")
            rows = [
                (doc, o, 0, 5, False, (centre + away + 0.001 * _vector(rng)).astype(np.float32))
                for o in range(60)
            ]
            _insert_chunks(conn, collection, rows)
        fast = FastPath(dsn, ("wide",), tmp_path)
        fast.start()
        try:
            fast.wait_ready("wide", 60)
            assert {key >> 24 for key in fast.index("wide").nearest(centre, 40, 400)} == {
                _doc_id(conn, collection, "w0")
            }
            for k in (3, 8):
                got = fast.search(collection, centre, k, ef_search=400)
                want = search_by_vector(conn, collection, centre, k, ef_search=400)
                assert len(got) == len(want) == k
                assert [r.external_id for r in got] == [r.external_id for r in want]
                np.testing.assert_allclose(
                    [r.score for r in got], [r.score for r in want], rtol=1e-6, atol=1e-6
                )
        finally:
            fast.stop()


def _random_json(rng: random.Random, depth: int = 0):
    """Small JSON values that collide often: numbers in several spellings, true/1/"1", nested arrays."""
    kinds = ["num", "str", "bool", "null"] + (["obj", "arr"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "num":
        return rng.choice(["1", "1.0", "1.00", "1e0", "2", "-0", "0", "0.1", "10e-1", "12345678901234567890"])
    if kind == "str":
        return json.dumps(
            rng.choice(["1", "a", "b", "é", "日本", "", "true"]), ensure_ascii=rng.random() < 0.5
        )
    if kind == "bool":
        return rng.choice(["true", "false"])
    if kind == "null":
        return "null"
    if kind == "arr":
        return "[" + ", ".join(_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    keys = rng.sample(["a", "b", "c", "tags"], rng.randint(0, 3))
    return "{" + ", ".join(f'"{key}": {_random_json(rng, depth + 1)}' for key in keys) + "}"


def _random_object(rng: random.Random) -> str:
    keys = rng.sample(["a", "b", "c", "tags"], rng.randint(0, 3))
    return "{" + ", ".join(f'"{key}": {_random_json(rng, 1)}' for key in keys) + "}"


def test_containment_is_postgresqls(dsn):
    """jsonb.contains against PostgreSQL's @> on thousands of random pairs (each side written as text,
    numbers in several spellings); the filter side also as the Python objects a caller sends."""
    rng = random.Random(21)
    pairs = []
    for _ in range(4000):
        metadata = _random_object(rng)
        # a filter drawn from the metadata itself half of the time, so that many pairs contain
        wanted = _random_object(rng) if rng.random() < 0.5 else _sub(json.loads(metadata), rng)
        pairs.append((metadata, wanted))
    with connect(dsn) as conn:
        truth = [
            r[0]
            for r in conn.execute(
                "SELECT m::jsonb @> f::jsonb "
                "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS u(m, f, i) ORDER BY i",
                ([m for m, _ in pairs], [f for _, f in pairs]),
            )
        ]
        stored = [
            r[0]
            for r in conn.execute(
                "SELECT m::jsonb::text FROM unnest(%s::text[]) WITH ORDINALITY AS u(m, i) ORDER BY i",
                ([m for m, _ in pairs],),
            )
        ]
    assert 0.2 < sum(truth) / len(truth) < 0.8
    for (_, wanted), text, expected in zip(pairs, stored, truth, strict=True):
        as_python = json.loads(wanted)  # what an HTTP body or a caller gives: ints and floats
        assert jsonb.contains(jsonb.parse(text), jsonb.pattern(as_python)) is expected, (text, wanted)


def _sub(value, rng: random.Random) -> str:
    """A random part of `value` (keys and elements dropped), as JSON text."""
    if isinstance(value, dict):
        keys = [key for key in value if rng.random() < 0.6]
        return "{" + ", ".join(f"{json.dumps(key)}: {_sub(value[key], rng)}" for key in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_sub(item, rng) for item in value if rng.random() < 0.6) + "]"
    return json.dumps(value)
