"""The model host's hnswlib fast path (plugin/service/fastpath.py, ann.py) and the change log it follows
(migrations/versions/0006_vector_changes.sql, functions/040_vector_changes.sql). Real PostgreSQL, real
hnswlib, real MiniLM through the ingestion worker, a real host over loopback HTTP."""

from __future__ import annotations

import dataclasses
import random
import re
import secrets
import sys
import time
import uuid

import httpx
import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker
from longembed.plugin.service.ann import CollectionIndex, label_of
from longembed.plugin.service.fastpath import HNSWLIB, PGVECTOR, FastPath
from longembed.plugin.service.host import HostConfig
from longembed.plugin.service.metrics import IndexStaleness, Metrics
from longembed.plugin.store.collections import create_collection, drop_collection, get_collection
from longembed.plugin.store.documents import Document, add_documents, delete_documents
from longembed.plugin.store.search import search, search_by_vector
from tests.hostutil import running_host
from tests.pgdb import migrated_database

DIM = 16
PATTERN = re.compile(r'^(longembed_hnsw_\w+)\{collection="stale"\} (\S+)$', re.M)


@dataclasses.dataclass(frozen=True)
class Dims16:
    """A collection's model description: these tests write and search vectors themselves."""

    name: str = "dims16"
    source: str = "dims16"
    revision: str = "r1"
    dim: int = DIM
    max_tokens: int = 256
    architecture: str = "none"
    pooling: str = "mean"
    prefixes = {"query": "", "document": ""}  # noqa: RUF012 (read only)


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_hnsw") as url:
        yield url


def _collection(dsn: str, name: str, n_docs: int, seed: int, distance: str = "cosine"):
    """A collection of n_docs documents with 1-3 random chunks each, written by direct SQL."""
    rng = np.random.default_rng(seed)
    with connect(dsn) as conn:
        c = create_collection(
            conn, name, Dims16(), chunk_tokens=64, overlap=0, distance=distance, search_mode="chunks"
        )
        docs = [Document(f"d{i}", f"text of document {i}", {"parity": i % 2, "i": i}) for i in range(n_docs)]
        add_documents(conn, c, docs)
        ids = dict(
            conn.execute(
                "SELECT external_id, id FROM longembed.documents WHERE collection_id = %s", (c.id,)
            ).fetchall()
        )
        rows = [
            (ids[f"d{i}"], o, rng.standard_normal(DIM).astype(np.float32))
            for i in range(n_docs)
            for o in range(int(rng.integers(1, 4)))
        ]
        _insert(conn, c, rows)
    return c


def _insert(conn, collection, rows) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (document_id, ordinal, char_start, char_end, n_tokens, embedding) "
                "VALUES (%s, %s, 0, 4, 1, %s)"
            ).format(collection.chunk_table),
            rows,
        )


def _table(conn, collection) -> dict[int, np.ndarray]:
    rows = conn.execute(
        sql.SQL("SELECT document_id, ordinal, embedding FROM {}").format(collection.chunk_table)
    ).fetchall()
    return {label_of(d, o): v.to_numpy().astype(np.float32) for d, o, v in rows}


def _assert_mirrors(index: CollectionIndex, table: dict[int, np.ndarray]) -> None:
    held = index.vectors()
    assert set(held) == set(table)
    for label, vector in table.items():  # hnswlib's cosine space keeps vectors normalised
        np.testing.assert_allclose(held[label], vector / np.linalg.norm(vector), atol=1e-5)


def _random_changes(conn, collection, rng: random.Random, n: int) -> None:
    """Inserts, vector updates, key updates, chunk deletes and document deletes, mixed."""
    for _ in range(n):
        labels = list(_table(conn, collection))
        docs = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM longembed.documents WHERE collection_id = %s", (collection.id,)
            )
        ]
        op = rng.choice(["insert", "update", "move", "delete", "drop_doc"])
        vec = np.array([rng.gauss(0, 1) for _ in range(DIM)], dtype=np.float32)
        table = collection.chunk_table
        if op == "insert" and docs:
            doc = rng.choice(docs)
            ordinal = conn.execute(
                sql.SQL("SELECT coalesce(max(ordinal), -1) + 1 FROM {} WHERE document_id = %s").format(table),
                (doc,),
            ).fetchone()[0]
            _insert(conn, collection, [(doc, ordinal, vec)])
        elif op == "update" and labels:
            doc, ordinal = divmod(rng.choice(labels), 1 << 24)
            conn.execute(
                sql.SQL("UPDATE {} SET embedding = %s WHERE document_id = %s AND ordinal = %s").format(table),
                (vec, doc, ordinal),
            )
        elif op == "move" and labels:  # the key changes: the old label goes, a new one comes
            doc, ordinal = divmod(rng.choice(labels), 1 << 24)
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET ordinal = ordinal + 1000 WHERE document_id = %s AND ordinal = %s"
                ).format(table),
                (doc, ordinal),
            )
        elif op == "delete" and labels:
            doc, ordinal = divmod(rng.choice(labels), 1 << 24)
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE document_id = %s AND ordinal = %s").format(table),
                (doc, ordinal),
            )
        elif op == "drop_doc" and len(docs) > 5:  # cascades to its chunks
            conn.execute("DELETE FROM longembed.documents WHERE id = %s", (rng.choice(docs),))


def _wait_synced(fast: FastPath, name: str, conn, timeout: float = 30) -> CollectionIndex:
    deadline = time.monotonic() + timeout
    while True:
        index = fast.index(name)
        if index is not None and fast.is_ready(name) and index.staleness(conn).pending == 0:
            return index
        assert time.monotonic() < deadline, "the index did not catch up"
        time.sleep(0.05)


def test_index_mirrors_the_table_through_changes_and_a_restart(dsn, tmp_path):
    collection = _collection(dsn, "mirror", 300, seed=1)
    rng = random.Random(7)
    with connect(dsn) as conn:
        fast = FastPath(dsn, ("mirror",), tmp_path)
        fast.start()
        try:
            fast.wait_ready("mirror", 60)
            _assert_mirrors(_wait_synced(fast, "mirror", conn), _table(conn, collection))
            _random_changes(conn, collection, rng, 200)
            _assert_mirrors(_wait_synced(fast, "mirror", conn), _table(conn, collection))
        finally:
            fast.stop()  # saves
        assert oct((tmp_path).stat().st_mode & 0o777) == "0o700"
        saved = next(tmp_path.glob("c*"))
        assert {p.name for p in saved.iterdir()} == {"index.bin", "rows.npz", "meta.json"}
        assert all(p.stat().st_mode & 0o077 == 0 for p in saved.iterdir())

        _random_changes(conn, collection, rng, 150)  # while the host is down
        with conn.transaction():  # and a chunk table change in one transaction with many statements
            _random_changes(conn, collection, rng, 30)

        fast = FastPath(dsn, ("mirror",), tmp_path)
        fast.start()
        try:
            fast.wait_ready("mirror", 60)
            index = _wait_synced(fast, "mirror", conn)
            assert index.loaded, "the restarted host rebuilt instead of catching up from its saved mark"
            _assert_mirrors(index, _table(conn, collection))
        finally:
            fast.stop()


def test_a_change_that_commits_after_a_later_seq_is_not_skipped(dsn, tmp_path):
    """Sequence gaps: T1 takes seq s, T2 takes s+1 and commits, the index syncs, then T1 commits. A reader
    that kept only the highest seq seen would never read s."""
    collection = _collection(dsn, "gaps", 5, seed=2)
    with connect(dsn) as conn, connect(dsn) as t1, connect(dsn) as t2:
        doc = conn.execute(
            "SELECT min(id) FROM longembed.documents WHERE collection_id = %s", (collection.id,)
        ).fetchone()[0]
        index = CollectionIndex(get_collection(conn, "gaps"), tmp_path)
        index.build(conn)
        ones = np.ones(DIM, dtype=np.float32)
        with t1.transaction():
            _insert(t1, collection, [(doc, 100, ones)])
            with t2.transaction():
                _insert(t2, collection, [(doc, 101, -ones)])
            index.sync(conn)
            assert label_of(doc, 101) in index.live and label_of(doc, 100) not in index.live
        seqs = dict(
            conn.execute(
                "SELECT ordinal, seq FROM longembed.vector_changes WHERE source = %s", (index.source,)
            ).fetchall()
        )
        assert seqs[100] < seqs[101]  # the gap was real
        assert index.applied_seq == seqs[101]
        index.sync(conn)
        assert label_of(doc, 100) in index.live
        _assert_mirrors(index, _table(conn, collection))


def test_staleness_moves_and_the_log_is_pruned(dsn, tmp_path):
    collection = _collection(dsn, "stale", 20, seed=3)
    with connect(dsn) as conn:
        index = CollectionIndex(get_collection(conn, "stale"), tmp_path)
        index.build(conn)
        metrics = Metrics()
        metrics.add_collector(
            IndexStaleness(lambda: [("stale", True, len(index.live), index.staleness(conn))])
        )

        def scrape() -> dict[str, float]:
            text = metrics.render().decode()
            return {m[1]: float(m[2]) for m in PATTERN.finditer(text)}

        assert scrape()["longembed_hnsw_seq_lag"] == 0 and scrape()["longembed_hnsw_lag_seconds"] == 0
        doc = conn.execute(
            "SELECT min(id) FROM longembed.documents WHERE collection_id = %s", (collection.id,)
        ).fetchone()[0]
        _insert(conn, collection, [(doc, 50 + i, np.ones(DIM, dtype=np.float32)) for i in range(3)])
        time.sleep(0.05)
        lagging = scrape()
        assert lagging["longembed_hnsw_pending_changes"] == 3 and lagging["longembed_hnsw_seq_lag"] >= 3
        assert lagging["longembed_hnsw_lag_seconds"] > 0
        index.sync(conn)
        assert scrape()["longembed_hnsw_pending_changes"] == 0 and scrape()["longembed_hnsw_seq_lag"] == 0
        assert scrape()["longembed_hnsw_vectors"] == len(_table(conn, collection))

        logged = conn.execute(
            "SELECT count(*) FROM longembed.vector_changes WHERE source = %s", (index.source,)
        ).fetchone()[0]
        assert logged == 3
        assert index.save(conn)
        logged = conn.execute(
            "SELECT count(*) FROM longembed.vector_changes WHERE source = %s", (index.source,)
        ).fetchone()[0]
        assert logged == 0, "saving did not prune the log below the saved mark"


def test_no_log_without_a_consumer(dsn):
    collection = _collection(dsn, "unwatched", 10, seed=4)
    with connect(dsn) as conn:
        n = conn.execute(
            "SELECT count(*) FROM longembed.vector_changes WHERE source = %s", (f"chunks_{collection.id}",)
        ).fetchone()[0]
    assert n == 0


def test_dropping_a_collection_forgets_its_change_log(dsn):
    collection = _collection(dsn, "dropped", 5, seed=6)
    source = f"chunks_{collection.id}"
    with connect(dsn) as conn:
        conn.execute("SELECT longembed.register_vector_consumer(%s, 'gone-host')", (source,))
        conn.execute(
            sql.SQL("UPDATE {} SET embedding = embedding").format(collection.chunk_table)
        )  # logged: a consumer follows the table
        conn.commit()
        assert (
            conn.execute(
                "SELECT count(*) FROM longembed.vector_changes WHERE source = %s", (source,)
            ).fetchone()[0]
            > 0
        )
        assert drop_collection(conn, "dropped")
        conn.commit()
        left = conn.execute(
            "SELECT (SELECT count(*) FROM longembed.vector_changes WHERE source = %(s)s)"
            " + (SELECT count(*) FROM longembed.vector_consumers WHERE source = %(s)s)"
            " + (SELECT count(*) FROM longembed.vector_pruned WHERE source = %(s)s)",
            {"s": source},
        ).fetchone()[0]
    assert left == 0


def _exact(conn, collection, query: np.ndarray, k: int, parity: int | None = None) -> list[tuple[str, float]]:
    rows = conn.execute(
        sql.SQL(
            "SELECT d.external_id, c.embedding, d.metadata "
            "FROM {} c JOIN longembed.documents d ON d.id = c.document_id"
        ).format(collection.chunk_table)
    ).fetchall()
    best: dict[str, float] = {}
    q = query / np.linalg.norm(query)
    for ext, vec, meta in rows:
        if parity is not None and meta["parity"] != parity:
            continue
        v = vec.to_numpy().astype(np.float64)
        best[ext] = max(best.get(ext, -2.0), float(v @ q / np.linalg.norm(v)))
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@pytest.mark.parametrize("parity", [None, 1])
def test_results_agree_with_exact_search_and_with_sql(dsn, tmp_path, parity):
    name = f"exact{parity}"
    collection = _collection(dsn, name, 1500, seed=5)
    rng = np.random.default_rng(11)
    flt = None if parity is None else {"parity": parity}
    with connect(dsn) as conn:
        fast = FastPath(dsn, (name,), tmp_path)
        fast.start()
        try:
            fast.wait_ready(name, 60)
            for _ in range(10):
                query = rng.standard_normal(DIM).astype(np.float32)
                got = fast.search(collection, query, 10, filter=flt, ef_search=400)
                assert got is not None
                exact = _exact(conn, collection, query, 10, parity)
                assert [r.external_id for r in got] == [e for e, _ in exact]
                np.testing.assert_allclose([r.score for r in got], [s for _, s in exact], atol=1e-5)
                sql_rows = search_by_vector(conn, collection, query, 10, filter=flt, ef_search=400)
                assert [dataclasses.astuple(r)[2:] for r in got] == [
                    dataclasses.astuple(r)[2:] for r in sql_rows
                ]
                if parity is not None:
                    assert all(r.metadata["parity"] == parity for r in got)
        finally:
            fast.stop()


MINI = {
    "volcano": "Volcanoes form where magma rises through cracks in the crust; lava and ash follow.",
    "sourdough": "Sourdough bread rises with a starter of wild yeast; feed it flour and water before baking.",
    "chess": "The Sicilian Defence answers 1.e4 with c5 and is the most popular reply in chess openings.",
    "password": "To reset your account password open Settings, then Security, and follow the emailed link.",
    "tides": "Tides follow the moon: its gravity pulls the oceans into two bulges under the turning earth.",
}


def test_http_search_through_the_index_during_and_after_a_build(dsn, tmp_path):
    """Through the real ingestion worker (adds, a changed text, a delete) and the host's /v1/search: while
    the index cannot be built (a writer holds the table) searches answer from pgvector; afterwards from
    hnswlib, with the same rows as SQL search."""
    model = get_model()
    with connect(dsn) as conn:
        collection = create_collection(conn, "notes", model, chunk_tokens=64, overlap=8, search_mode="chunks")
        add_documents(conn, "notes", [Document(k, t, {"topic": k}) for k, t in MINI.items()])
        assert Worker(conn, model).drain().embedded == len(MINI)
    config = HostConfig(dsn=dsn, worker=False, hnsw=("notes",), hnsw_dir=str(tmp_path / "idx"))

    def post(host, **body) -> dict:
        r = httpx.post(f"{host.url}/v1/search", json={"collection": "notes", **body}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    with psycopg.connect(dsn) as writer, connect(dsn) as conn:
        # An open write transaction on the chunk table: the index's registration (a SHARE lock) waits.
        writer.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(collection.chunk_table))
        with running_host(config) as host:
            body = post(host, query="baking bread")
            assert body["index"] == PGVECTOR and body["data"][0]["external_id"] == "sourdough"
            assert not host.host.fastpath.is_ready("notes")
            writer.commit()
            host.host.fastpath.wait_ready("notes", 60)
            body = post(host, query="baking bread")
            assert body["index"] == HNSWLIB and body["data"][0]["external_id"] == "sourdough"

            add_documents(
                conn,
                "notes",
                [
                    Document("chess", "Knights and bishops: a chess opening guide.", {"topic": "chess"}),
                    Document("rivers", "Rivers carve valleys as water erodes rock.", {"topic": "rivers"}),
                ],
            )
            delete_documents(conn, "notes", ["volcano"])
            assert Worker(conn, model).drain().embedded == 2
            _assert_mirrors(_wait_synced(host.host.fastpath, "notes", conn), _table(conn, collection))
            for query in ("molten rock", "water wearing down stone", "opening moves", "forgot my login"):
                for flt in (None, {"topic": "tides"}):
                    body = post(host, query=query, k=3, filter=flt, ef_search=200)
                    python = search(conn, "notes", query, k=3, filter=flt, ef_search=200)
                    assert body["index"] == HNSWLIB
                    assert [r["external_id"] for r in body["data"]] == [h.external_id for h in python]
                    np.testing.assert_allclose(
                        [r["score"] for r in body["data"]], [h.score for h in python], atol=1e-5
                    )
                    assert [r["snippet"] for r in body["data"]] == [h.snippet for h in python]
            vector = model.embed(["molten rock"], kind="query")[0].tolist()
            by_vector = post(host, vector=vector, k=2)
            assert by_vector["index"] == HNSWLIB and by_vector["usage"]["total_tokens"] == 0
            assert [r["external_id"] for r in by_vector["data"]] == [
                r["external_id"] for r in post(host, query="molten rock", k=2)["data"]
            ]
            forced = post(host, query="molten rock", k=2, index="pgvector")
            fast = post(host, query="molten rock", k=2)
            assert forced["index"] == PGVECTOR and fast["index"] == HNSWLIB
            # The same rows; scores computed in float64 here, in float32 sums by pgvector
            assert [{**r, "score": 0} for r in forced["data"]] == [{**r, "score": 0} for r in fast["data"]]
            np.testing.assert_allclose(
                [r["score"] for r in forced["data"]], [r["score"] for r in fast["data"]], atol=1e-6
            )
            hybrid = post(host, query="bread", hybrid=True)
            assert hybrid["index"] == PGVECTOR  # hybrid fusion lives in SQL
            # hnswlib mirrors the chunk vectors: a search by document vector is pgvector's
            dense = post(host, query="bread", mode="dense")
            assert dense["index"] == PGVECTOR and dense["data"][0]["external_id"] == "sourdough"

            metrics = httpx.get(f"{host.url}/metrics", timeout=30).text
            assert 'longembed_hnsw_ready{collection="notes"} 1.0' in metrics
            assert (
                f'longembed_hnsw_vectors{{collection="notes"}} {len(_table(conn, collection))}.0' in metrics
            )
            assert 'longembed_hnsw_seq_lag{collection="notes"} 0.0' in metrics


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query": "x", "vector": [0.1]}, "not both"),
        ({"vector": "abc"}, "array of numbers"),
        ({"vector": [1, True]}, "array of numbers"),
        ({"vector": [0.5] * 3}, "shape"),
        ({"vector": [0.1], "hybrid": True}, "hybrid"),
        ({"query": "x", "index": "faiss"}, "'index' must be one of auto, pgvector"),
    ],
)
def test_bad_vector_queries_get_a_clear_400(dsn, tmp_path, body, message):
    with connect(dsn) as conn:
        if get_collection(conn, "vecs", missing_ok=True) is None:
            create_collection(conn, "vecs", Dims16(), chunk_tokens=64, overlap=0, search_mode="chunks")
    with running_host(HostConfig(dsn=dsn, worker=False)) as host:
        r = httpx.post(f"{host.url}/v1/search", json={"collection": "vecs", **body}, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_writer_roles_log_and_follow_readers_cannot_register(dsn, tmp_path):
    """090_privileges.sql's model: a writer's chunk inserts are logged (the trigger runs as the owner), a
    host logged in as a writer registers, syncs and prunes; a reader cannot register a consumer."""
    collection = _collection(dsn, "roles", 10, seed=6)
    roles = {
        group: (f"le_t_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(12)) for group in ("writer", "reader")
    }
    with psycopg.connect(dsn, autocommit=True) as admin:
        for group, (name, password) in roles.items():
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                    sql.Identifier(name), sql.Literal(password), sql.Identifier(f"longembed_{group}")
                )
            )
    as_role = {group: make_conninfo(dsn, user=n, password=p) for group, (n, p) in roles.items()}
    try:
        with connect(as_role["writer"]) as conn:
            index = CollectionIndex(get_collection(conn, "roles"), tmp_path)
            index.build(conn)
            doc = conn.execute(
                "SELECT min(id) FROM longembed.documents WHERE collection_id = %s", (collection.id,)
            ).fetchone()[0]
            _insert(conn, collection, [(doc, 9, np.ones(DIM, dtype=np.float32))])
            assert index.sync(conn) == 1 and label_of(doc, 9) in index.live
            assert index.save(conn)
            _assert_mirrors(index, _table(conn, collection))
        with connect(as_role["reader"]) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT longembed.register_vector_consumer(%s, 'x')", (index.source,))
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            for name, _ in roles.values():
                admin.execute(
                    sql.SQL("DROP OWNED BY {}; DROP ROLE {}").format(
                        sql.Identifier(name), sql.Identifier(name)
                    )
                )


def test_without_hnswlib_the_host_still_imports_and_hnsw_is_refused_clearly(monkeypatch):
    """hnswlib is an optional extra: nothing imports it until an index is made, and --hnsw without it is
    a usage error naming the extra, not a sync thread failing in a loop."""
    monkeypatch.setitem(sys.modules, "hnswlib", None)  # `import hnswlib` now raises ImportError
    with pytest.raises(ImportError):
        import hnswlib  # noqa: F401
    assert HostConfig(dsn="host=nowhere", worker=False).hnsw == ()
    with pytest.raises(ValueError, match=r"longembed\[fast\]"):
        HostConfig(dsn="host=nowhere", hnsw=("docs",), hnsw_dir="/nonexistent")
