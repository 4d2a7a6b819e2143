"""SQL embed() / search() (migrations/functions/020_embed.sql) on the session's real server.

The server is the embedded one with plpython3u from `longembed setup-plpython` (the test command runs
it first); the backends send the texts to the model host (fixture `model_host`, the real
`longembed serve` with the real MiniLM weights, supervised as `longembed up` runs it), and the vectors
are compared with the same model run here in Python.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import psycopg
import pytest
from psycopg import errors, sql

from longembed.plugin.db import connect
from longembed.plugin.migrate import migrate
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker, WorkerConfig
from longembed.plugin.store.collections import create_collection
from longembed.plugin.store.documents import Document, add_documents
from longembed.plugin.store.search import search
from tests.pgdb import fresh_database

pytestmark = pytest.mark.usefixtures("model_host")

HOSTILE = [
    "'); DROP TABLE longembed.collections; --",
    "Robert'); DROP TABLE students;-- \\ $$ $body$ %s %(x)s {0}",
    "emoji 🦜 and 中文 and ĳ ligature, zero\u200bwidth, RTL \u202e text",
    "\t\n  leading and trailing whitespace \r\n",
    "x" * 5000,
]


@pytest.fixture(scope="module")
def model():
    return get_model()


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with fresh_database(pg_dsn, "le_sqlfn") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'plpython3u'"
            ).fetchone()
            assert available, "plpython3u is missing on the test server: run `longembed setup-plpython` first"
            report = migrate(conn)
            assert "020_embed.sql" in report.functions, report
        yield url


@pytest.fixture(scope="module")
def conn(dsn):
    with connect(dsn) as c:
        yield c


def _np(value) -> np.ndarray:
    """pgvector's Vector (or an ndarray, depending on the loader) as a float32 array."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def _vector(conn: psycopg.Connection, query: str, params: tuple = ()) -> np.ndarray:
    return _np(conn.execute(query, params).fetchone()[0])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("kind", ["query", "document"])
def test_embed_equals_the_python_vector(conn, model, kind):
    texts = ["how do I reset my password", "PostgreSQL stores the vectors next to the text.", "a"]
    expected = model.embed(texts, kind=kind)
    for text, want in zip(texts, expected, strict=True):
        got = _vector(conn, "SELECT embed(%s, %s)", (text, kind))
        assert got.shape == (model.info.dim,)
        assert _cosine(got, want) > 0.99999
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_default_kind_is_query_and_qualified_name_works(conn, model):
    want = model.embed(["reset password"], kind="query")[0]
    for query in (
        "SELECT embed('reset password')",
        "SELECT longembed.embed('reset password')",
        "SELECT longembed.embed('reset password', 'query')",
    ):
        np.testing.assert_allclose(_vector(conn, query), want, atol=1e-5)


def test_embed_array_keeps_order_and_nulls(conn, model):
    texts = ["first text", None, "second text", "first text"]
    rows = conn.execute("SELECT embed(%s::text[], 'document')", (texts,)).fetchone()[0]
    assert len(rows) == 4 and rows[1] is None
    want = model.embed(["first text", "second text"], kind="document")
    np.testing.assert_allclose(_np(rows[0]), want[0], atol=1e-5)
    np.testing.assert_allclose(_np(rows[2]), want[1], atol=1e-5)
    np.testing.assert_array_equal(_np(rows[3]), _np(rows[0]))
    assert conn.execute("SELECT embed(ARRAY[]::text[])").fetchone()[0] == []


def test_null_empty_and_huge_inputs(conn, model):
    assert conn.execute("SELECT embed(NULL::text)").fetchone()[0] is None
    assert conn.execute("SELECT embed('x', NULL)").fetchone()[0] is None
    assert conn.execute("SELECT embed(NULL::text[])").fetchone()[0] is None
    # Blank text is refused, as by search(): nothing to embed.
    for blank in ("", "   ", "\t\n"):
        with pytest.raises(errors.DataException, match="empty"):
            conn.execute("SELECT embed(%s)", (blank,))
    # 1 MB of text: truncated to the model's window, the same vector as Python's, the backend survives.
    huge = "the quick brown fox jumps over the lazy dog " * 23000
    got = _vector(conn, "SELECT embed(%s, 'document')", (huge,))
    np.testing.assert_allclose(got, model.embed([huge], kind="document")[0], atol=1e-5)
    head = " ".join(huge.split()[:400])  # far more than fits in 256 tokens: same truncated input
    np.testing.assert_allclose(got, model.embed([head], kind="document")[0], atol=1e-5)
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_invalid_kind_is_a_clear_error(conn):
    for kind in ("bogus", "Query", "", "query'; DROP TABLE x; --"):
        with pytest.raises(errors.InvalidParameterValue, match="kind must be 'query' or 'document'"):
            conn.execute("SELECT embed('text', %s)", (kind,))
    with pytest.raises(errors.InvalidParameterValue):
        conn.execute("SELECT embed(ARRAY['a'], 'passage')")
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the session is usable afterwards


def test_hostile_texts_embed_as_plain_text(conn, model):
    want = model.embed(HOSTILE, kind="document")
    for text, vector in zip(HOSTILE, want, strict=True):
        np.testing.assert_allclose(_vector(conn, "SELECT embed(%s, 'document')", (text,)), vector, atol=1e-5)
    assert conn.execute("SELECT to_regclass('longembed.collections') IS NOT NULL").fetchone() == (True,)


def test_unknown_model_setting_is_a_clear_error(conn, model):
    """A session may SET longembed.model, but the host serves only its own models and those a
    collection uses: nobody makes it load an arbitrary path."""
    for name in ("/nonexistent/model; DROP TABLE x", "/etc"):
        with conn.transaction():
            conn.execute("SELECT set_config('longembed.model', %s, true)", (name,))
            with pytest.raises(errors.UndefinedObject, match="model") as caught, conn.transaction():
                conn.execute("SELECT embed('text')")
            assert "not served here" in (caught.value.diag.message_primary or "")
    # The setting was local to the transaction: back to the host's default model.
    np.testing.assert_allclose(
        _vector(conn, "SELECT embed('text')"), model.embed(["text"], kind="query")[0], atol=1e-5
    )


def test_host_embed_asks_the_host_for_the_collection_size(conn, model):
    """A collection's `dim` goes to the host as `dimensions` (a Matryoshka size is cut there): MiniLM
    gives its own 384, and refuses 128 with the host's reason rather than a length mismatch here."""
    sql_ = "SELECT (longembed.host_embed(ARRAY[%s], 'query', NULL, NULL, %s))[1]"
    got = _vector(conn, sql_, ("sized text", 384))
    np.testing.assert_allclose(got, model.embed(["sized text"], kind="query")[0], atol=1e-5)
    refused = pytest.raises(errors.InvalidParameterValue, match="not trained for shorter vectors")
    with refused, conn.transaction():
        conn.execute(sql_, ("sized text", 128))


def test_a_session_cannot_point_the_backend_at_another_host(conn, model):
    """Only the server's configuration names the host (a SET would send the texts, and with HTTP the
    key, wherever a session likes)."""
    with conn.transaction():
        conn.execute("SET LOCAL longembed.host = 'http://127.0.0.1:9'")
        got = _vector(conn, "SELECT embed('redirected?')")
    np.testing.assert_allclose(got, model.embed(["redirected?"], kind="query")[0], atol=1e-5)


def test_no_model_and_no_longembed_code_in_the_backend(dsn):
    """A fresh connection's first embed() asks the host: the backend imports neither torch nor longembed
    and stays small (a model per backend cost ~400 MiB and ~2 s)."""
    with psycopg.connect(dsn, autocommit=True) as fresh:
        pid = fresh.execute("SELECT pg_backend_pid()").fetchone()[0]
        fresh.execute("SELECT embed('warm the interpreter up')")
        rss_kib = _rss_kib(pid)
        fresh.execute(
            """CREATE FUNCTION pg_temp.loaded() RETURNS text[] LANGUAGE plpython3u AS
               'import sys; return sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "longembed",
                "numpy", "tokenizers"))'"""
        )
        assert fresh.execute("SELECT pg_temp.loaded()").fetchone()[0] == []
        assert rss_kib < 100 * 1024, f"backend resident {rss_kib} KiB after embed()"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_declared_stable_strict_and_search_path_pinned(conn):
    rows = conn.execute(
        """SELECT p.oid::regprocedure::text, p.provolatile, p.proisstrict, p.proparallel, p.proconfig
           FROM pg_proc p WHERE p.pronamespace = 'longembed'::regnamespace
             AND p.proname IN ('embed', 'embed_query')"""
    ).fetchall()
    assert len(rows) == 3
    for signature, volatility, strict, parallel, config in rows:
        assert (volatility, strict, parallel) == ("s", True, "r"), signature
        assert config == ["search_path=pg_catalog, pg_temp"], signature


@pytest.fixture(scope="module")
def vectors_table(conn):
    """5000 random unit vectors in a table of our own with an HNSW index (cosine)."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((5000, 384)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, v vector(384))")
    with conn.cursor().copy("COPY items (id, v) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int4", "vector"])
        for i, row in enumerate(data):
            copy.write_row((i, row))
    conn.execute("CREATE INDEX items_hnsw ON items USING hnsw (v vector_cosine_ops)")
    conn.execute("ANALYZE items")
    return data


@pytest.mark.parametrize("function", ["embed", "longembed.embed"])
def test_order_by_embed_uses_the_hnsw_index(conn, vectors_table, function):
    query = sql.SQL("SELECT id FROM items ORDER BY v <=> {}('a question') LIMIT 10").format(sql.SQL(function))
    plan = "\n".join(row[0] for row in conn.execute(sql.SQL("EXPLAIN ") + query).fetchall())
    assert "Index Scan using items_hnsw" in plan, plan
    ids = [row[0] for row in conn.execute(query).fetchall()]
    assert len(ids) == 10 and len(set(ids)) == 10


def test_prepared_statement_keeps_the_index_after_the_generic_plan_kicks_in(conn, vectors_table):
    """PostgreSQL may switch a prepared statement to a generic plan after five runs (plan_cache_mode = auto):
    with embed($1) the query vector is unknown at plan time, and the plan must still walk the index."""
    conn.execute("PREPARE nearest(text) AS SELECT id FROM items ORDER BY v <=> embed($1) LIMIT 10")
    try:
        for i in range(8):
            execute = sql.SQL("EXECUTE nearest({})").format(sql.Literal(f"question {i}"))
            assert len(conn.execute(execute).fetchall()) == 10
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN EXECUTE nearest('question 9')").fetchall())
        assert "Index Scan using items_hnsw" in plan, plan
        generic = conn.execute(
            "SELECT generic_plans FROM pg_prepared_statements WHERE name = 'nearest'"
        ).fetchone()
        print(f"generic plans used: {generic[0]}")
    finally:
        conn.execute("DEALLOCATE nearest")


def test_the_model_runs_once_per_query_text(conn, vectors_table, model_host):
    """STABLE: one call for the index scan key, plus one per returned row (the ORDER BY value), which the
    backend's cache answers; a filter on a sequential scan calls it per row, also from the cache: the host
    sees each text once."""
    conn.execute("SET track_functions = 'all'")
    try:
        before = _host_inputs(model_host)
        top = conn.execute(
            "SELECT id FROM items ORDER BY v <=> embed('only once, please') LIMIT 10"
        ).fetchall()
        assert len(top) == 10
        conn.execute("SELECT count(*) FROM items WHERE v <=> embed('per row, cached') < 2").fetchone()
        assert _host_inputs(model_host) - before == 2
        conn.execute("SELECT pg_stat_force_next_flush()")
        (calls,) = conn.execute(
            """SELECT calls FROM pg_stat_user_functions
               WHERE funcid = 'longembed.host_embed(text[],text,text,text,integer,text)'::regprocedure"""
        ).fetchone()
        assert calls >= 11 + len(vectors_table)  # 1 + 10 rows, then once per row of the filter
    finally:
        conn.execute("RESET track_functions")


def _host_inputs(host) -> float:
    """Texts the host has embedded for HTTP/SQL callers (its Prometheus counter)."""
    status, text = host.get("/metrics")
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(HOST_INPUTS_METRIC) and not line.startswith("#")
    )


HOST_INPUTS_METRIC = "longembed_embedding_inputs_total"


CORPUS = {
    "volcano": "Volcanoes form where magma rises through cracks in the crust; lava and ash follow.",
    "sourdough": "Sourdough bread rises with a starter of wild yeast; feed it flour and water before baking.",
    "chess": "The Sicilian Defence answers 1.e4 with c5 and is the most popular reply in chess openings.",
    "password": "To reset your account password open Settings, then Security, and follow the emailed link.",
}


@pytest.fixture(scope="module")
def collection(conn, model):
    create_collection(conn, "sqlfn", model.info, chunk_tokens=64, overlap=8)
    docs = [Document(key, text, {"topic": key, "n": i}) for i, (key, text) in enumerate(CORPUS.items())]
    add_documents(conn, "sqlfn", docs)
    assert Worker(conn, model, WorkerConfig()).drain().embedded == len(docs)
    return "sqlfn"


def test_sql_search_equals_python_search(conn, model, collection):
    for query, expected in [
        ("molten rock from a mountain", "volcano"),
        ("baking bread with yeast", "sourdough"),
        ("I forgot my login", "password"),
    ]:
        python = search(conn, collection, query, k=3)
        rows = conn.execute("SELECT * FROM search(%s, %s, 3)", (collection, query)).fetchall()
        assert [r[0] for r in rows] == [r.external_id for r in python]
        assert rows[0][0] == expected
        np.testing.assert_allclose([r[1] for r in rows], [r.score for r in python], atol=1e-5)
        assert [tuple(r[2:5]) for r in rows] == [(r.chunk_ordinal, r.char_start, r.char_end) for r in python]
    filtered = conn.execute(
        "SELECT external_id FROM longembed.search(%s, %s, 5, %s::jsonb)",
        (collection, "bread", '{"topic": "chess"}'),
    ).fetchall()
    assert filtered == [("chess",)]
    hybrid = conn.execute(
        "SELECT external_id FROM search(%s, %s, 2, hybrid => true)", (collection, "Sicilian Defence")
    ).fetchall()
    assert hybrid[0] == ("chess",)


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "dense"},
        {"mode": "chunks"},
        {"mode": "lexical"},
        {"mode": "auto"},
        {"mode": "hybrid", "weights": {"dense": 1, "chunks": 0.5, "lexical": 1}, "fusion": "minmax"},
        {"mode": "hybrid", "rrf_k": 10},
    ],
)
def test_sql_search_modes_equal_python(conn, model, collection, options):
    query = "wild yeast for baking bread"
    python = search(conn, collection, query, k=3, **options)
    rows = conn.execute(
        "SELECT * FROM search(%s, %s, 3, mode => %s, weights => %s::jsonb, fusion => %s, rrf_k => %s)",
        (collection, query, options["mode"], json.dumps(options["weights"]) if "weights" in options else None,
         options.get("fusion"), options.get("rrf_k")),
    ).fetchall()  # fmt: skip
    assert [r[0] for r in rows] == [r.external_id for r in python]
    assert rows[0][0] == "sourdough"
    np.testing.assert_allclose([r[1] for r in rows], [r.score for r in python], atol=1e-5)
    assert [tuple(r[2:5]) for r in rows] == [(r.chunk_ordinal, r.char_start, r.char_end) for r in python]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("mode => 'semantic'", "unknown search mode 'semantic'"),
        ("mode => 'hybrid', weights => '{\"bm25\": 1}'", "unknown signal 'bm25'"),
        ("mode => 'hybrid', fusion => 'max'", "unknown fusion 'max'"),
        ("mode => 'dense', rrf_k => 5", "apply to mode hybrid"),
        ("hybrid => true, mode => 'dense'", "hybrid => true is mode hybrid"),
    ],
)
def test_sql_search_modes_bad_input(conn, collection, arguments, message):
    with pytest.raises(errors.InvalidParameterValue, match=message):
        conn.execute(f"SELECT * FROM search(%s, 'q', 3, {arguments})", (collection,))


def test_sql_search_bad_input(conn, collection):
    with pytest.raises(errors.UndefinedObject, match="no collection named"):
        conn.execute("SELECT * FROM search(%s, 'q')", ("sqlfn'; DROP TABLE longembed.documents; --",))
    with pytest.raises(errors.InvalidParameterValue, match="k must be"):
        conn.execute("SELECT * FROM search(%s, 'q', 0)", (collection,))
    with pytest.raises(errors.InvalidParameterValue, match="filter must be a JSON object"):
        conn.execute("SELECT * FROM search(%s, 'q', 3, '[1, 2]'::jsonb)", (collection,))
    with pytest.raises(errors.NullValueNotAllowed):
        conn.execute("SELECT * FROM search(%s, NULL)", (collection,))
    with pytest.raises(errors.DataException, match="empty"):
        conn.execute("SELECT * FROM search(%s, '   ')", (collection,))
    hostile_filter = '{"topic": "x\'); DROP TABLE longembed.documents; --"}'
    assert (
        conn.execute(
            "SELECT * FROM search(%s, 'bread', 3, %s::jsonb)", (collection, hostile_filter)
        ).fetchall()
        == []
    )
    assert conn.execute("SELECT count(*) FROM longembed.documents").fetchone() == (len(CORPUS),)


def test_user_functions_in_public_are_left_alone(pg_dsn):
    """A user's own public.embed(text, text) survives migrate; longembed.embed stays reachable."""
    with fresh_database(pg_dsn, "le_sqlfn_own") as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION public.embed(t text, k text DEFAULT 'x') RETURNS text LANGUAGE sql RETURN 'mine'"
        )
        notices: list[str] = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        migrate(conn)
        assert conn.execute("SELECT public.embed('hello', 'query')").fetchone() == ("mine",)
        assert any("public.embed(text,text) exists and is not ours" in n for n in notices), notices
        dims = conn.execute("SELECT vector_dims(longembed.embed('hello'))").fetchone()
        assert dims == (384,)
        # Our other wrappers were created, and a second migrate keeps both sides as they are.
        assert conn.execute("SELECT to_regprocedure('public.embed(text[],text)') IS NOT NULL").fetchone() == (
            True,
        )
        migrate(conn)
        assert conn.execute("SELECT public.embed('hello', 'query')").fetchone() == ("mine",)


def test_sql_calls_fail_clearly_while_the_host_is_down_and_work_when_it_is_back(dsn, model_host, model):
    """SIGKILL the host while backends wait on it: those calls fail with a clear error (not a hang, not a
    crash of the backend), their transactions roll back and lose nothing else, the supervisor starts the
    host again and the next call works."""
    supervisor = model_host.running_pid()
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        (serve_pid,) = (int(pid) for pid in f.read().split())
    texts = [f"document number {i}: " + "words about many things " * 40 for i in range(600)]
    outcomes: list[object] = []

    def call() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            try:
                with c.transaction():
                    c.execute("CREATE TEMP TABLE kept (n int)")
                    c.execute("INSERT INTO kept VALUES (1)")
                    c.execute("SELECT embed(%s::text[], 'document')", (texts,))
                outcomes.append("done")
            except psycopg.Error as exc:
                outcomes.append(exc)
            assert c.execute("SELECT 1").fetchone() == (1,)  # the session survives

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    os.kill(serve_pid, signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    failures = [o for o in outcomes if o != "done"]
    assert len(outcomes) == 3 and failures, outcomes
    for exc in failures:
        assert isinstance(exc, errors.ConnectionFailure), exc
        assert "model host" in str(exc) and "longembed up" in (exc.diag.message_hint or ""), exc

    deadline = time.monotonic() + 90
    with connect(dsn) as c:
        while True:
            try:
                got = _vector(c, "SELECT embed('back again')")
                break
            except errors.ConnectionFailure:
                assert time.monotonic() < deadline, "the host did not come back"
                time.sleep(0.5)
        np.testing.assert_allclose(got, model.embed(["back again"], kind="query")[0], atol=1e-5)
    assert model_host.running_pid() == supervisor
