"""Okapi BM25 in SQL (versions/0004_bm25.sql, functions/012_bm25.sql) against a reference written here.

The reference is plain Python fed with the lexemes PostgreSQL makes of each text (ts_debug: one row per
token with its lexemes), so what is under test is the scoring and the statistics kept by the trigger, not
the tokeniser. Real embedded PostgreSQL; no model runs (collections are made from a model description).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from longembed.plugin.db import connect
from longembed.plugin.migrate import migrate
from longembed.plugin.store.bm25 import Bm25Hit, search_bm25
from longembed.plugin.store.collections import (
    CollectionNotFound,
    create_collection,
    drop_collection,
    get_collection,
)
from longembed.plugin.store.documents import Document, add_documents, delete_documents
from tests.pgdb import migrated_database


@dataclasses.dataclass(frozen=True)
class FourDims:
    """A collection's model description: no model runs here (BM25 needs none)."""

    name: str = "four-dims"
    source: str = "four-dims"
    revision: str = "r1"
    dim: int = 4
    max_tokens: int = 256
    architecture: str = "none"
    pooling: str = "mean"
    prefixes = {"query": "", "document": ""}  # noqa: RUF012 (read only)


CORPUS = {
    "a": "The quick brown fox jumps over the lazy dog.",
    "b": "A lazy dog sleeps all day; the dog dreams of foxes and of running foxes.",
    "c": "Running, runners and runs: PostgreSQL's full-text search stems them all to one lexeme.",
    "d": "Okapi BM25 ranks documents by term frequency, inverse document frequency and length.",
    "e": "fox fox fox fox fox fox fox fox",
    "f": "The of and a the of",  # only stop words: a document of length 0
    "g": "Brown bears and brown foxes live in the brown forest near the quick river; "
    "the river runs quickly past the forest where the dog barks at the bears every single day.",
    "h": "dog",
    "dup-b": "identical twins share the same text about a fox",
    "dup-a": "identical twins share the same text about a fox",
}
QUERIES = [
    "fox",
    "lazy dog",
    "running fox dog",
    "brown brown fox",  # a repeated query term counts once
    "bm25 frequency documents",
    "twins",
    "nothing-here zebra",
]
PARAMETERS = [(None, None), (1.2, 0.75), (0.0, 0.0), (2.0, 1.0), (0.5, 0.3), (10.0, 0.0)]


def lexemes(conn: psycopg.Connection, text: str) -> list[str]:
    """Every lexeme occurrence of `text` in the english configuration, as PostgreSQL's parser and
    dictionaries produce them, token by token (to_tsvector skips tokens of 2048 bytes or more)."""
    rows = conn.execute(
        "SELECT l FROM ts_debug('english'::regconfig, %s) t, unnest(t.lexemes) l "
        "WHERE octet_length(t.token) < 2048",
        (text,),
    ).fetchall()
    return [lexeme for (lexeme,) in rows]


def reference_scores(
    docs: dict[str, list[str]], query_terms: set[str], k1: float, b: float
) -> dict[str, float]:
    """Okapi BM25 with Lucene's idf over `docs` (external id -> lexeme occurrences)."""
    n = len(docs)
    avgdl = sum(len(terms) for terms in docs.values()) / n
    tfs = {ext: Counter(terms) for ext, terms in docs.items()}
    df = {t: sum(1 for tf in tfs.values() if t in tf) for t in query_terms}
    scores = {}
    for ext, tf in tfs.items():
        matched = [t for t in query_terms if t in tf]
        if not matched:
            continue
        scores[ext] = sum(
            math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
            * tf[t]
            * (k1 + 1)
            / (tf[t] + k1 * (1 - b + b * len(docs[ext]) / avgdl))
            for t in matched
        )
    return scores


def ranked(scores: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def stored_statistics(conn: psycopg.Connection, collection_id: int) -> tuple[dict, int, int]:
    """What the trigger kept: {(external id, term): (tf, doc_length)}, N, total length."""
    postings = {
        (ext, term): (tf, length)
        for ext, term, tf, length in conn.execute(
            "SELECT d.external_id, p.term, p.tf, p.doc_length FROM longembed.bm25_postings p "
            "JOIN longembed.documents d ON d.id = p.document_id WHERE p.collection_id = %s",
            (collection_id,),
        ).fetchall()
    }
    n, total = conn.execute(
        "SELECT coalesce(sum(n_documents), 0), coalesce(sum(total_length), 0) "
        "FROM longembed.bm25_collection_deltas WHERE collection_id = %s",
        (collection_id,),
    ).fetchone()
    return postings, int(n), int(total)


def recomputed_statistics(conn: psycopg.Connection, collection_id: int) -> tuple[dict, int, int]:
    """The same, from the documents' texts as they are now."""
    docs = conn.execute(
        "SELECT external_id, text FROM longembed.documents WHERE collection_id = %s", (collection_id,)
    ).fetchall()
    postings, total = {}, 0
    for ext, text in docs:
        counts = Counter(lexemes(conn, text))
        length = sum(counts.values())
        total += length
        postings.update({(ext, term): (tf, length) for term, tf in counts.items()})
    return postings, len(docs), total


def assert_exact(conn: psycopg.Connection, collection_id: int) -> None:
    stored = stored_statistics(conn, collection_id)
    expected = recomputed_statistics(conn, collection_id)
    assert stored[1:] == expected[1:]
    assert stored[0] == expected[0]


@pytest.fixture(scope="module")
def dsn(pg_dsn: str) -> Iterator[str]:
    with migrated_database(pg_dsn, "le_bm25") as url:
        yield url


@pytest.fixture(scope="module")
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with connect(dsn) as c:
        collection = create_collection(c, "corpus", FourDims())
        add_documents(
            c, collection, [Document(ext, text, {"n": i % 2}) for i, (ext, text) in enumerate(CORPUS.items())]
        )
        yield c


@pytest.fixture
def scratch(conn: psycopg.Connection) -> Iterator[str]:
    """A new empty collection, dropped afterwards."""
    name = f"s{uuid.uuid4().hex[:10]}"
    create_collection(conn, name, FourDims())
    yield name
    drop_collection(conn, name, missing_ok=True)


@pytest.mark.parametrize("k1, b", PARAMETERS)
def test_scores_match_the_reference(conn, k1, b):
    docs = {ext: lexemes(conn, text) for ext, text in CORPUS.items()}
    collection = get_collection(conn, "corpus")
    assert (collection.bm25_k1, collection.bm25_b) == (1.2, 0.75)
    for query in QUERIES:
        expected = ranked(
            reference_scores(
                docs, set(lexemes(conn, query)), 1.2 if k1 is None else k1, 0.75 if b is None else b
            )
        )
        got = search_bm25(conn, "corpus", query, 1000, k1=k1, b=b)
        assert [hit.external_id for hit in got] == [ext for ext, _ in expected], query
        assert [hit.score for hit in got] == pytest.approx([s for _, s in expected], abs=1e-6, rel=0)
        sql_rows = conn.execute(
            "SELECT external_id, score FROM longembed.search_bm25('corpus', %s, 1000, NULL, %s, %s)",
            (query, k1, b),
        ).fetchall()
        assert sql_rows == [(hit.external_id, hit.score) for hit in got]
    ids = dict(conn.execute("SELECT external_id, id FROM longembed.documents").fetchall())
    assert all(hit.document_id == ids[hit.external_id] for hit in got)


def test_collection_parameters_are_the_default_and_k_filter_cut_the_ranking(conn, scratch):
    create_collection(conn, "tuned", FourDims(), bm25_k1=2.0, bm25_b=0.25)
    try:
        add_documents(
            conn, "tuned", [Document(ext, text, {"n": i % 2}) for i, (ext, text) in enumerate(CORPUS.items())]
        )
        docs = {ext: lexemes(conn, text) for ext, text in CORPUS.items()}
        expected = ranked(reference_scores(docs, set(lexemes(conn, "brown fox dog")), 2.0, 0.25))
        got = search_bm25(conn, "tuned", "brown fox dog", 3)
        assert [(h.external_id, round(h.score, 9)) for h in got] == [
            (e, round(s, 9)) for e, s in expected[:3]
        ]
        # The filter picks among documents scored against the whole collection (N, df, avgdl unchanged).
        odd = {ext for i, ext in enumerate(CORPUS) if i % 2 == 1}
        filtered = search_bm25(conn, "tuned", "brown fox dog", 1000, filter={"n": 1})
        assert [(h.external_id, round(h.score, 9)) for h in filtered] == [
            (e, round(s, 9)) for e, s in expected if e in odd
        ]
        assert search_bm25(conn, "tuned", "brown fox dog", 1000, filter={"n": 7}) == []
    finally:
        drop_collection(conn, "tuned")


def test_ties_go_by_external_id(conn):
    hits = search_bm25(conn, "corpus", "twins")
    assert [h.external_id for h in hits] == ["dup-a", "dup-b"]
    assert hits[0].score == hits[1].score > 0


@pytest.mark.parametrize("query", ["", "   ", "the of and a", "!&|:*()", "''"])
def test_a_query_without_lexemes_finds_nothing(conn, query):
    assert search_bm25(conn, "corpus", query) == []
    assert conn.execute("SELECT * FROM longembed.search_bm25('corpus', %s)", (query,)).fetchall() == []


def test_null_query_is_an_error(conn):
    with pytest.raises(errors.NullValueNotAllowed, match="query text is NULL"):
        conn.execute("SELECT * FROM longembed.search_bm25('corpus', NULL)")
    conn.rollback()
    with pytest.raises(ValueError, match="NUL"):
        search_bm25(conn, "corpus", "fox\x00dog")
    with pytest.raises(TypeError, match="query must be a str"):
        search_bm25(conn, "corpus", None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "hostile, plain",
    [
        ("fox' OR 1=1; --", "fox"),  # 'or' is a stop word
        ("fox\\ & !dog", "fox dog"),
        ("fox:* | (dog & !lazy)", "fox dog lazy"),
        ('"fox" <-> dog', "fox dog"),
        ("fox\x01dog", "fox dog"),
        ("fox\u00e9 \u4e2d\u6587 dog", "fox\u00e9 \u4e2d\u6587 dog"),
    ],
)
def test_hostile_query_text_is_plain_text(conn, hostile, plain):
    """tsquery operators, quotes and backslashes are characters, never syntax."""
    got = search_bm25(conn, "corpus", hostile, 1000)
    assert got == search_bm25(conn, "corpus", plain, 1000)
    assert len(got) >= 3


def test_one_megabyte_query(conn):
    words = " ".join(f"filler{i}" for i in range(120_000))  # distinct lexemes: over to_tsvector's 1 MB
    query = ("fox " + words)[:1_000_000]
    assert len(query.encode()) >= 999_000
    hits = search_bm25(conn, "corpus", query, 3)
    assert hits[0].external_id == "e"  # eight times fox, the only query term any document has


@pytest.mark.parametrize("k", [0, -1, 1001, 2**31 - 1])
def test_bad_k(conn, k):
    with pytest.raises(errors.InvalidParameterValue, match=r"k must be in 1\.\.1000"):
        conn.execute("SELECT * FROM longembed.search_bm25('corpus', 'fox', %s)", (k,))
    conn.rollback()
    with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.1000"):
        search_bm25(conn, "corpus", "fox", k)


@pytest.mark.parametrize(
    "k1, b, message",
    [
        (-0.1, None, r"k1 must be"),
        (10.5, None, r"k1 must be"),
        (float("nan"), None, r"k1 must be"),
        (float("inf"), None, r"k1 must be"),
        (None, -0.01, r"b must be"),
        (None, 1.5, r"b must be"),
        (None, float("nan"), r"b must be"),
    ],
)
def test_bad_k1_or_b(conn, k1, b, message):
    with pytest.raises(errors.InvalidParameterValue, match=message):
        conn.execute("SELECT * FROM longembed.search_bm25('corpus', 'fox', 10, NULL, %s, %s)", (k1, b))
    conn.rollback()
    with pytest.raises(ValueError, match=message):
        search_bm25(conn, "corpus", "fox", k1=k1, b=b)
    with pytest.raises(ValueError, match=message):
        create_collection(
            conn, "never", FourDims(), bm25_k1=1.2 if k1 is None else k1, bm25_b=0.75 if b is None else b
        )
    with pytest.raises(errors.CheckViolation):  # the table refuses them too
        conn.execute(
            "UPDATE longembed.collections SET bm25_k1 = coalesce(%s, bm25_k1), bm25_b = coalesce(%s, bm25_b) "
            "WHERE name = 'corpus'",
            (k1, b),
        )
    conn.rollback()
    assert get_collection(conn, "never", missing_ok=True) is None


def test_bad_filter_and_unknown_collection(conn):
    with pytest.raises(errors.InvalidParameterValue, match="filter must be a JSON object"):
        conn.execute("SELECT * FROM longembed.search_bm25('corpus', 'fox', 10, '[1]')")
    conn.rollback()
    with pytest.raises(errors.UndefinedObject, match="no collection named 'nope'"):
        conn.execute("SELECT * FROM longembed.search_bm25('nope', 'fox')")
    conn.rollback()
    with pytest.raises(CollectionNotFound):
        search_bm25(conn, "nope", "fox")


def test_statistics_follow_inserts_updates_deletes_and_reingest(conn, scratch):
    cid = get_collection(conn, scratch).id
    add_documents(conn, scratch, [Document(ext, text) for ext, text in CORPUS.items()])
    assert_exact(conn, cid)
    before = stored_statistics(conn, cid)
    add_documents(conn, scratch, [Document("a", CORPUS["a"], {"x": 1})])  # metadata only
    # re-ingest, same texts
    add_documents(conn, scratch, [Document(ext, text) for ext, text in CORPUS.items()])
    assert stored_statistics(conn, cid) == before
    add_documents(conn, scratch, [Document("a", "an entirely different text about zebras and zebras")])
    add_documents(conn, scratch, [Document("f", "now the stop-word document has words")])
    assert_exact(conn, cid)
    assert stored_statistics(conn, cid)[0][("a", "zebra")] == (2, 5)  # an, about, and: stop words
    assert delete_documents(conn, scratch, ["b", "e", "missing"]) == 2
    assert_exact(conn, cid)
    # Worker-like writes (status, chunks bookkeeping) do not touch the statistics.
    conn.execute(
        "UPDATE longembed.documents SET status = 'embedded', embed_count = embed_count + 1 "
        "WHERE collection_id = %s",
        (cid,),
    )
    conn.commit()
    assert_exact(conn, cid)
    # Plain SQL on the table takes the same trigger: a rewrite of the text, and a no-op rewrite.
    conn.execute(
        "UPDATE longembed.documents SET text = 'plain sql zebra' "
        "WHERE external_id = 'g' AND collection_id = %s",
        (cid,),
    )
    conn.execute("UPDATE longembed.documents SET text = text WHERE collection_id = %s", (cid,))
    assert_exact(conn, cid)
    hits = search_bm25(conn, scratch, "zebra")
    assert sorted(h.external_id for h in hits) == ["a", "g"]


def test_collection_drop_removes_its_statistics_only(conn, scratch):
    cid = get_collection(conn, scratch).id
    add_documents(conn, scratch, [Document(ext, text) for ext, text in CORPUS.items()])
    corpus_id = get_collection(conn, "corpus").id
    others = stored_statistics(conn, corpus_id)
    assert drop_collection(conn, scratch) is True
    for table in ("bm25_postings", "bm25_collection_deltas"):
        assert conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE collection_id = %s").format(
                sql.Identifier("longembed", table)
            ),
            (cid,),
        ).fetchone() == (0,)
    assert stored_statistics(conn, corpus_id) == others
    assert_exact(conn, corpus_id)


def test_vectorized_table_rows_keep_statistics(conn, scratch):
    from longembed.plugin.store.vectorize import vectorize_table

    conn.execute("CREATE TABLE notes_bm25 (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes_bm25 VALUES (1, 'fox and dog'), (2, 'dog only')")
    conn.commit()
    try:
        vectorize_table(conn, "notes_bm25", "id", "body", scratch)
        conn.execute("UPDATE notes_bm25 SET body = 'cat and cat' WHERE id = 1")
        conn.execute("INSERT INTO notes_bm25 VALUES (3, 'fox fox')")
        conn.execute("DELETE FROM notes_bm25 WHERE id = 2")
        conn.commit()
        cid = get_collection(conn, scratch).id
        assert_exact(conn, cid)
        assert stored_statistics(conn, cid)[1:] == (2, 4)
        conn.execute("TRUNCATE notes_bm25")
        conn.commit()
        assert stored_statistics(conn, cid) == ({}, 0, 0)
    finally:
        conn.rollback()
        conn.execute("DROP TABLE notes_bm25")
        conn.commit()


def test_long_documents_count_every_occurrence(conn, scratch):
    """tsvector positions stop at 255 per lexeme and at position 16383: counts come from the text."""
    many = " ".join(["apple"] * 300 + ["pear"] * 3)  # 'appl' 300 times, a short document
    long = " ".join(f"tok{i % 5000}" for i in range(20_000)) + " apple" * 2  # 20002 positions
    add_documents(
        conn, scratch, [Document("many", many), Document("long", long), Document("small", "apple pear")]
    )
    cid = get_collection(conn, scratch).id
    postings, n, total = stored_statistics(conn, cid)
    assert postings[("many", "appl")] == (300, 303)
    assert postings[("many", "pear")] == (3, 303)
    assert postings[("long", "tok4999")] == (4, 20_002)
    assert postings[("long", "appl")] == (2, 20_002)
    assert (n, total) == (3, 303 + 20_002 + 2)
    # to_tsvector alone would have said otherwise.
    capped = conn.execute(
        "SELECT cardinality(u.positions) FROM unnest(to_tsvector('english', %s)) u WHERE u.lexeme = 'appl'",
        (many,),
    ).fetchone()
    assert capped == (255,)
    docs = {"many": lexemes(conn, many), "long": lexemes(conn, long), "small": lexemes(conn, "apple pear")}
    expected = ranked(reference_scores(docs, {"appl", "pear"}, 1.2, 0.75))
    got = search_bm25(conn, scratch, "apple pears")
    assert [(h.external_id, round(h.score, 9)) for h in got] == [(e, round(s, 9)) for e, s in expected]


def test_concurrent_writers_finish_and_leave_exact_statistics(dsn, conn, scratch):
    """Writers with overlapping vocabularies (and common terms) in parallel transactions: no deadlock
    (PostgreSQL would abort one with 40P01), no lost update of N or the total length."""
    vocabulary = ["alpha", "beta", "gamma", "delta", "epsilon", "fox", "dog", "river", "forest"]
    failures: list[BaseException] = []
    start = threading.Barrier(4)

    def writer(w: int) -> None:
        try:
            with connect(dsn) as c:
                start.wait()
                for batch in range(6):
                    docs = [
                        Document(
                            f"w{w}-{batch}-{i}",
                            " ".join(
                                vocabulary[(w + i + j) % len(vocabulary)] for j in range(3 + (i * w) % 11)
                            ),
                        )
                        for i in range(8)
                    ]
                    add_documents(c, scratch, docs)
                    # overlapping documents: every writer rewrites the shared ones, in one order
                    add_documents(
                        c,
                        scratch,
                        [Document(f"shared-{i}", f"{vocabulary[w]} shared text {batch}") for i in range(3)],
                    )
                    if batch % 2:
                        delete_documents(c, scratch, [f"w{w}-{batch - 1}-{i}" for i in range(0, 8, 2)])
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    # Two first inserts of one id race to a unique violation (upsert_document's contract): exist first.
    add_documents(conn, scratch, [Document(f"shared-{i}", "shared text") for i in range(3)])
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    cid = get_collection(conn, scratch).id
    assert_exact(conn, cid)
    assert stored_statistics(conn, cid)[1] == 4 * (6 * 8 - 3 * 4) + 3


def test_delta_rows_are_folded(dsn, conn, scratch):
    """N and the total length are insert-only rows; writers fold them now and then (1 document in 64)."""
    for i in range(200):
        add_documents(conn, scratch, [Document(f"d{i}", f"fold test {i} " + "word " * (i % 7))])
    cid = get_collection(conn, scratch).id
    (rows,) = conn.execute(
        "SELECT count(*) FROM longembed.bm25_collection_deltas WHERE collection_id = %s", (cid,)
    ).fetchone()
    assert rows < 100
    assert_exact(conn, cid)
    # Under REPEATABLE READ nothing is folded (a DELETE of rows folded meanwhile would fail), all counts.
    with psycopg.connect(dsn) as c:
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        for i in range(200, 330):
            c.execute("SELECT longembed.upsert_document(%s, %s, 'repeatable read')", (cid, f"d{i}"))
        c.commit()
    assert_exact(conn, cid)


def test_rebuild_after_migration(dsn, conn):
    """0004 marks the collections that existed before it; 012 rebuilds them on the same migrate."""
    cid = get_collection(conn, "corpus").id
    conn.execute("DELETE FROM longembed.bm25_postings WHERE collection_id = %s", (cid,))
    conn.execute("DELETE FROM longembed.bm25_collection_deltas WHERE collection_id = %s", (cid,))
    conn.execute("INSERT INTO longembed.bm25_rebuild_pending VALUES (%s)", (cid,))
    conn.commit()
    with psycopg.connect(dsn, autocommit=True) as c:
        migrate(c)
    assert conn.execute("SELECT count(*) FROM longembed.bm25_rebuild_pending").fetchone() == (0,)
    assert_exact(conn, cid)
    assert search_bm25(conn, "corpus", "fox")[0].external_id == "e"


def test_version_3_database_gets_its_statistics_on_upgrade(pg_dsn, tmp_path, monkeypatch):
    """Documents written before 0004_bm25.sql: the same migrate that adds the tables fills them."""
    from pathlib import Path

    from tests.pgdb import fresh_database

    repo = Path(__file__).resolve().parents[1]
    package = tmp_path / "v3_migrations"
    for kind, names in (("versions", ("0001_init", "0002_model_source_and_chunk_flags", "0003_privileges")),
                        ("functions", ("001_ownership", "010_documents"))):  # fmt: skip
        (package / kind).mkdir(parents=True)
        for name in names:
            (package / kind / f"{name}.sql").write_text(
                (repo / "migrations" / kind / f"{name}.sql").read_text()
            )
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with fresh_database(pg_dsn, "le_bm25_upgrade") as url, connect(url) as c:
        migrate(c, "v3_migrations")
        (cid,) = c.execute(
            """INSERT INTO longembed.collections
                   (name, model_name, model_source, model_revision, dim, chunk_tokens)
               VALUES ('old', 'm', 'm', 'r1', 4, 100) RETURNING id"""
        ).fetchone()
        for ext, text in CORPUS.items():
            c.execute("SELECT longembed.upsert_document(%s, %s, %s)", (cid, ext, text))
        report = migrate(c)
        assert report.applied == ["0004_bm25.sql"]
        assert_exact(c, cid)
        assert (get_collection(c, "old").bm25_k1, get_collection(c, "old").bm25_b) == (1.2, 0.75)
        docs = {ext: lexemes(c, text) for ext, text in CORPUS.items()}
        expected = ranked(reference_scores(docs, {"fox", "dog"}, 1.2, 0.75))
        got = search_bm25(c, "old", "fox dog", 1000)
        assert [(h.external_id, round(h.score, 9)) for h in got] == [(e, round(s, 9)) for e, s in expected]


def test_reader_searches_writer_keeps_statistics_nobody_else(dsn, conn, scratch):
    made = []

    def login(*groups: str) -> str:
        name, password = f"le_t_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password))
        )
        for group in groups:
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(name)))
        conn.commit()
        made.append(name)
        return make_conninfo(dsn, user=name, password=password, options="-c search_path=pg_catalog")

    try:
        with psycopg.connect(login("longembed_writer")) as w:
            add_documents(w, scratch, [Document("x", "written by the writer: fox"), Document("y", "dog")])
            delete_documents(w, scratch, ["y"])
            add_documents(w, scratch, [Document("x", "rewritten by the writer: fox fox")])
        assert_exact(conn, get_collection(conn, scratch).id)
        with psycopg.connect(login("longembed_reader"), autocommit=True) as r:
            assert [h.external_id for h in search_bm25(r, scratch, "fox")] == ["x"]
            with pytest.raises(errors.InsufficientPrivilege):
                r.execute("DELETE FROM longembed.bm25_postings")
        with (
            psycopg.connect(login(), autocommit=True) as nobody,
            pytest.raises(errors.InsufficientPrivilege),
        ):
            nobody.execute("SELECT * FROM longembed.search_bm25(%s, 'fox')", (scratch,))
    finally:
        conn.rollback()
        for name in made:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
        conn.commit()


def test_hit_is_a_dataclass(conn):
    hit = search_bm25(conn, "corpus", "okapi")[0]
    assert isinstance(hit, Bm25Hit) and hit.external_id == "d"


def test_cli_sets_the_collection_parameters(dsn, conn, tmp_path, capsys):
    from longembed.plugin.cli import main

    def run(*args: str) -> tuple[int, str]:
        code = main([*args, "--dsn", dsn])
        return code, capsys.readouterr().err

    assert run("collection", "create", "-c", "cli-bm25", "--bm25-k1", "2", "--bm25-b", "0.5")[0] == 0
    assert (get_collection(conn, "cli-bm25").bm25_k1, get_collection(conn, "cli-bm25").bm25_b) == (2.0, 0.5)
    code, err = run("collection", "create", "-c", "cli-bad", "--bm25-b", "2")
    assert code == 2 and "b must be a number in 0..1" in err
    (tmp_path / "note.txt").write_text("a fox in a note")
    code, err = run("ingest", str(tmp_path), "-c", "cli-bm25", "--bm25-b", "0.6", "--no-wait")
    assert code == 2 and "--bm25-b 0.6 (it has 0.5)" in err
    code, _ = run("ingest", str(tmp_path), "-c", "cli-new", "--create", "--bm25-k1", "0.9", "--no-wait")
    assert code == 0 and get_collection(conn, "cli-new").bm25_k1 == 0.9
    assert [h.external_id for h in search_bm25(conn, "cli-new", "foxes")] == [str(tmp_path / "note.txt")]
