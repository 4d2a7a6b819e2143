"""Ingest -> worker -> search against real PostgreSQL + pgvector with the real MiniLM model."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import psycopg
import pytest
from psycopg import sql

from longembed.plugin.cli import main
from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker, WorkerConfig
from longembed.plugin.store.collections import (
    CollectionNotFound,
    create_collection,
    drop_collection,
    get_collection,
)
from longembed.plugin.store.documents import (
    MAX_DOCUMENT_CHARS,
    Document,
    InvalidDocument,
    add_documents,
    delete_documents,
    document_states,
)
from longembed.plugin.store.search import search
from longembed.plugin.store.vectorize import unvectorize_table, vectorize_table
from tests.pgdb import migrated_database

CORPUS = {
    "photosynthesis": "Plants capture sunlight in their chloroplasts and use its energy to turn water and "
    "carbon dioxide into glucose, releasing oxygen as a by-product. Chlorophyll absorbs red and blue light.",
    "volcano": "Volcanoes form where magma rises through cracks in the Earth's crust. During an eruption "
    "lava flows down the slopes while ash and sulphur gases are thrown high into the atmosphere.",
    "sourdough": "Sourdough bread is leavened by a starter of wild yeast and lactic acid bacteria. Feed the "
    "starter with flour and water, mix the dough with salt, and let it ferment slowly before baking.",
    "chess": "The Sicilian Defence is the most popular chess opening against 1.e4: Black answers with c5, "
    "fighting for the centre asymmetrically instead of mirroring White's pawn move.",
    "password": "To reset your account password, open Settings, choose Security and click 'Forgot password'. "
    "We email you a link; it expires after one hour, so use it quickly to pick new credentials.",
    "marathon": "Training for a marathon means building weekly running mileage gradually, doing one long run "
    "every weekend, and tapering for two weeks before race day so the legs are fresh for 42 kilometres.",
    "jupiter": "Jupiter is the largest planet in the solar system, a gas giant made mostly of hydrogen and "
    "helium. Its Great Red Spot is a storm bigger than the Earth, and dozens of moons orbit it.",
    "vaccines": "Vaccines train the immune system by showing it a harmless piece of a pathogen, so the body "
    "produces antibodies and memory cells and can fight off the real infection later.",
    "git": "A git rebase replays the commits of your branch on top of another base commit, rewriting their "
    "history; resolve any merge conflicts and continue until every commit is applied.",
}
QUERIES = {
    "how do plants make food from light": "photosynthesis",
    "molten rock erupting from a mountain": "volcano",
    "wild yeast culture for baking a loaf": "sourdough",
    "best reply to 1.e4 among chess openings": "chess",
    "I forgot my login, how do I recover access": "password",
    "preparing to run 42 km": "marathon",
    "biggest gas giant planet": "jupiter",
    "how does immunisation protect against disease": "vaccines",
    "move my branch commits onto main": "git",
}
# Three unrelated sections: with 40-token chunks the answer sits in one specific chunk.
HANDBOOK = (
    "Parking. Employees may park in the north garage; visitor spaces near the entrance are reserved for "
    "guests and delivery vans. Bicycle racks are available behind building B next to the loading dock. "
    "Vacation. Every full-time employee receives twenty-five days of paid vacation per year; unused holiday "
    "days carry over until the end of March. Book time off with your manager two weeks ahead. "
    "Expenses. Submit receipts for travel expenses within thirty days through the finance portal; taxi "
    "fares above fifty euros need written approval from a director."
)


@pytest.fixture(scope="module")
def model():
    return get_model()


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_search") as url:
        yield url


@pytest.fixture(scope="module")
def conn(dsn):
    with connect(dsn) as c:
        yield c


def drain(conn, model, **config) -> int:
    return Worker(conn, model, WorkerConfig(**config)).drain().embedded


@pytest.fixture(scope="module")
def corpus(conn, model):
    """Collection "corpus": the nine topic documents plus the handbook, embedded once for the module."""
    create_collection(conn, "corpus", model.info, chunk_tokens=40, overlap=8)
    docs = [Document(k, v, {"topic": k, "lang": "en"}) for k, v in CORPUS.items()]
    docs.append(Document("handbook", HANDBOOK, {"topic": "hr", "lang": "en"}))
    result = add_documents(conn, "corpus", docs)
    assert result.counts == {"inserted": len(docs)}
    assert drain(conn, model, batch_tokens=300) == len(docs)
    return get_collection(conn, "corpus")


def test_round_trip_ranks_the_right_document_first(conn, model, corpus):
    for query, expected in QUERIES.items():
        results = search(conn, "corpus", query, k=5, mode="chunks")
        ranked = [r.external_id for r in results]
        assert ranked[0] == expected, (query, ranked)
        assert len(results) == 5
        assert len({r.external_id for r in results}) == 5  # documents, not chunks
        scores = [r.score for r in results]
        assert scores == sorted(scores, reverse=True)
        # Cosine similarity of the query vector with the stored best chunk, recomputed here.
        top = results[0]
        (stored,) = conn.execute(
            sql.SQL(
                "SELECT c.embedding FROM {} c JOIN longembed.documents d ON d.id = c.document_id "
                "WHERE d.external_id = %s AND c.ordinal = %s"
            ).format(corpus.chunk_table),
            (top.external_id, top.chunk_ordinal),
        ).fetchone()
        q = model.embed([query], kind="query")[0]
        assert top.score == pytest.approx(float(np.dot(q, stored.to_numpy())), abs=1e-5)
        text = CORPUS[top.external_id]
        assert 0 <= top.char_start < top.char_end <= len(text)
        assert top.snippet == text[top.char_start : top.char_end][:300]
        assert top.metadata == {"topic": expected, "lang": "en"}


def test_best_chunk_and_its_span(conn, corpus):
    states = document_states(conn, "corpus")
    assert states["handbook"].n_chunks >= 3
    for query, section in [
        ("how many days of paid holiday do I get", "Vacation."),
        ("where can I leave my bike", "Bicycle racks"),
        ("reimbursement of taxi receipts", "Expenses."),
    ]:
        (hit,) = [r for r in search(conn, "corpus", query, k=10) if r.external_id == "handbook"]
        assert section in HANDBOOK[hit.char_start : hit.char_end], (query, hit)


def test_query_vector_and_ef_search(conn, model, corpus):
    vector = model.embed(["biggest gas giant planet"], kind="query")[0]
    by_vector = search(conn, corpus, vector, k=3, ef_search=100)
    by_text = search(conn, corpus, "biggest gas giant planet", k=3)
    assert [r.external_id for r in by_vector] == [r.external_id for r in by_text]
    assert by_vector[0].score == pytest.approx(by_text[0].score, abs=1e-6)


def test_cli_search_gives_the_python_results(conn, dsn, corpus, capsys):
    query = "how does immunisation protect against disease"
    code = main(["search", "corpus", query, "-k", "4", "--json", "--dsn", dsn])
    out, err = capsys.readouterr()
    assert code == 0, err
    cli = json.loads(out)
    python = [dataclasses.asdict(r) for r in search(conn, "corpus", query, k=4)]
    assert [r["external_id"] for r in cli] == [r["external_id"] for r in python]
    assert [r["score"] for r in cli] == pytest.approx([r["score"] for r in python], abs=1e-9)
    assert main(["search", "corpus", query, "-k", "2", "--dsn", dsn]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("  1. ") and "vaccines" in text.splitlines()[0]


def test_metadata_filter_and_hostile_values(conn, corpus):
    only = search(conn, "corpus", "planets and storms", k=5, filter={"topic": "volcano"})
    assert [r.external_id for r in only] == ["volcano"]
    assert search(conn, "corpus", "planets", k=5, filter={"lang": "de"}) == []
    for hostile in ["x' OR '1'='1", "'); DROP TABLE longembed.documents; --", '"}]}', "\\"]:
        assert search(conn, "corpus", "planets", k=5, filter={"topic": hostile}) == []
        assert search(conn, "corpus", "planets", k=5, filter={hostile: "en"}) == []
    with pytest.raises(ValueError, match="filter must be a JSON object"):
        search(conn, "corpus", "planets", filter=["topic"])
    for bad_k in (0, -1, 10_001, True, 2.5):
        with pytest.raises(ValueError, match="k must be an integer"):
            search(conn, "corpus", "planets", k=bad_k)
    with pytest.raises(ValueError, match="query text is empty"):
        search(conn, "corpus", "   ")
    assert len(document_states(conn, "corpus")) == len(CORPUS) + 1  # nothing was harmed


def test_hybrid_fuses_text_and_vector_rankings(conn, corpus):
    results = search(conn, "corpus", "Sicilian Defence", k=5, hybrid=True)
    assert results[0].external_id == "chess"
    # first in all three rankings (document vector, best chunk, BM25): 1/(60+1) three times
    assert results[0].score == pytest.approx(3 / 61)
    assert all(r.score <= 3 / 61 for r in results)
    # A word only the lexical side can pin down still brings its document up, with its best chunk.
    hits = {r.external_id: r for r in search(conn, "corpus", "sulphur", k=10, hybrid=True)}
    assert "volcano" in hits and hits["volcano"].char_end > hits["volcano"].char_start
    with pytest.raises(ValueError, match="'hybrid' needs a text query"):
        search(conn, "corpus", np.zeros(384, dtype=np.float32), hybrid=True)


def test_reingest_is_idempotent_and_changes_are_reembedded(conn, model, corpus):
    before = document_states(conn, "corpus")
    stamps = dict(conn.execute("SELECT external_id, embedded_at FROM longembed.documents").fetchall())
    docs = [Document(k, v, {"topic": k, "lang": "en"}) for k, v in CORPUS.items()]
    assert add_documents(conn, "corpus", docs).counts == {"unchanged": len(docs)}
    assert Worker(conn, model).run_once().batches == 0  # nothing queued
    assert dict(conn.execute("SELECT external_id, embedded_at FROM longembed.documents").fetchall()) == stamps
    assert document_states(conn, "corpus") == before

    # Metadata only: stored, not re-embedded.
    assert add_documents(conn, "corpus", [Document("git", CORPUS["git"], {"topic": "vcs"})]).unchanged == 1
    assert search(conn, "corpus", "rebase", k=1, filter={"topic": "vcs"})[0].external_id == "git"
    assert document_states(conn, "corpus")["git"].embed_count == 1

    # New text: re-queued, chunks replaced, search follows the new content.
    new_text = "A git stash shelves uncommitted changes so you can switch branches and restore them later."
    assert add_documents(conn, "corpus", [Document("git", new_text, {"topic": "vcs"})]).counts == {
        "updated": 1
    }
    assert document_states(conn, "corpus")["git"].status == "queued"
    assert drain(conn, model) == 1
    state = document_states(conn, "corpus")["git"]
    assert (state.status, state.embed_count, state.n_chunks) == ("embedded", 2, 1)
    spans = conn.execute(
        sql.SQL(
            "SELECT char_start, char_end FROM {} c JOIN longembed.documents d ON d.id = c.document_id "
            "WHERE d.external_id = 'git'"
        ).format(corpus.chunk_table)
    ).fetchall()
    assert spans == [(0, len(new_text))]
    assert search(conn, "corpus", "put away uncommitted work temporarily", k=1)[0].external_id == "git"

    # Delete: document, chunks and queue entry go.
    assert delete_documents(conn, "corpus", ["git", "no-such-id"]) == 1
    assert "git" not in document_states(conn, "corpus")
    assert "git" not in [r.external_id for r in search(conn, "corpus", "git rebase stash", k=10)]
    (orphans,) = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {} c WHERE NOT EXISTS "
            "(SELECT 1 FROM longembed.documents d WHERE d.id = c.document_id)"
        ).format(corpus.chunk_table)
    ).fetchone()
    assert orphans == 0


def test_bad_documents_are_refused_whole(conn, corpus):
    count = len(document_states(conn, "corpus"))
    good = Document("fine", "a perfectly fine document")
    for bad, reason in [
        (Document("empty", ""), "text is empty"),
        (Document("blank", " \n\t "), "text is empty"),
        (Document("nul", "abc\x00def"), "NUL bytes"),
        (Document("surrogate", "abc\udcff"), "not valid Unicode"),
        (Document("huge", "x" * (MAX_DOCUMENT_CHARS + 1)), "more than the limit"),
        (Document("", "no id"), "non-empty string"),
        (Document("meta", "text", {"a": float("nan")}), "not JSON-serialisable"),
        (Document("meta2", "text", ["not", "a", "dict"]), "JSON object"),
    ]:
        with pytest.raises(InvalidDocument, match=reason):
            add_documents(conn, "corpus", [good, bad])
    assert len(document_states(conn, "corpus")) == count  # the good one was not written either
    with pytest.raises(CollectionNotFound, match="no collection named 'nope'"):
        add_documents(conn, "nope", [good])


def test_hostile_collection_names(conn, model, corpus):
    tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'longembed'").fetchone()
    for name in [
        'x"; DROP TABLE longembed.documents; --',
        "x'; DROP TABLE longembed.documents; --",
        "",
        "a b",
        "../etc",
        "x" * 64,
        "chunks_1\x00",
    ]:
        with pytest.raises(ValueError, match="invalid collection name"):
            create_collection(conn, name, model.info)
        with pytest.raises((CollectionNotFound, ValueError)):
            search(conn, name, "query")
        assert main(["collection", "drop", name, "--dsn", conn.info.dsn]) == 2
    assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'longembed'").fetchone() == tables
    assert get_collection(conn, "corpus").id == corpus.id


def test_large_document_is_chunked_and_stored_exactly(conn, model):
    collection = create_collection(conn, "large", model.info)
    words = [f"w{i % 997} topic{i % 13}" for i in range(600)]
    text = " ".join(words)  # ~6k characters, ~15 chunks
    add_documents(conn, collection, [Document("big", text)])
    assert drain(conn, model) == 1
    expected = model.embed_chunks([text], mode="chunk", chunk_tokens=collection.chunk_tokens, overlap=32)[0]
    rows = conn.execute(
        sql.SQL("SELECT ordinal, char_start, char_end, n_tokens, embedding FROM {} ORDER BY ordinal").format(
            collection.chunk_table
        )
    ).fetchall()
    assert len(rows) == len(expected) > 10
    for row, chunk in zip(rows, expected, strict=True):
        assert row[:4] == (chunk.ordinal, chunk.start, chunk.end, chunk.n_tokens)
        np.testing.assert_allclose(row[4].to_numpy(), chunk.vector, atol=1e-6)  # binary COPY round trip
    assert drop_collection(conn, "large")
    assert (
        conn.execute("SELECT to_regclass(%s)", (f"longembed.chunks_{collection.id}",)).fetchone()[0] is None
    )


def test_dimension_mismatch_between_collection_and_model(conn, model):
    wide = create_collection(conn, "wide", dataclasses.replace(model.info, dim=768))
    add_documents(conn, wide, [Document("d1", "some text")])
    with pytest.raises(ValueError, match="dimension mismatch: collection 'wide' stores 768-d"):
        Worker(conn, model, collections=["wide"])
    # A worker serving every collection leaves this one alone: no vectors of the wrong size get written.
    Worker(conn, model).drain()
    assert document_states(conn, wide)["d1"].status == "queued"
    with pytest.raises(ValueError, match="dimension mismatch"):
        search(conn, wide, "some text", model=model)
    with pytest.raises(ValueError, match=r"shape \(384,\), the collection needs \(768,\)"):
        search(conn, wide, np.ones(384, dtype=np.float32))
    drop_collection(conn, "wide")


def test_vectorized_user_table_follows_inserts_updates_deletes(conn, model):
    create_collection(conn, "tickets", model.info)
    conn.execute("CREATE SCHEMA app")
    conn.execute('CREATE TABLE app."Tickets" (id serial PRIMARY KEY, body text, other int)')
    conn.execute(
        "INSERT INTO app.\"Tickets\" (body) VALUES ('The printer on floor two is jammed again'), (NULL)"
    )
    with pytest.raises(ValueError, match="invalid table name"):
        vectorize_table(conn, 'app.tickets"; DROP TABLE app."Tickets"; --', "id", "body", "tickets")
    # Quoted names are case-sensitive: app.tickets is not app."Tickets".
    with pytest.raises(ValueError, match=r"no table named 'app\.tickets'"):
        vectorize_table(conn, "app.tickets", "id", "body", "tickets")
    with pytest.raises(ValueError, match="no column"):
        vectorize_table(conn, 'app."Tickets"', "id", "body; --", "tickets")
    assert vectorize_table(conn, 'app."Tickets"', "id", "body", "tickets") == 1  # backfill; NULL skipped
    conn.execute("""INSERT INTO app."Tickets" (body) VALUES ('My laptop battery drains in an hour'),
                    ('The VPN disconnects every few minutes')""")
    drain(conn, model)
    assert search(conn, "tickets", "paper stuck in the printer", k=1)[0].external_id == "1"
    assert search(conn, "tickets", "network connection keeps dropping", k=1)[0].external_id == "4"

    conn.execute("UPDATE app.\"Tickets\" SET body = 'Coffee machine leaks water' WHERE id = 1")
    conn.execute('UPDATE app."Tickets" SET other = 5 WHERE id = 3')  # text unchanged: no re-embedding
    assert {k: v.status for k, v in document_states(conn, "tickets").items()} == {
        "1": "queued",
        "3": "embedded",
        "4": "embedded",
    }
    drain(conn, model)
    assert search(conn, "tickets", "kitchen appliance dripping", k=1)[0].external_id == "1"
    conn.execute("UPDATE app.\"Tickets\" SET body = '' WHERE id = 4")
    conn.execute('DELETE FROM app."Tickets" WHERE id = 3')
    assert set(document_states(conn, "tickets")) == {"1"}
    conn.execute('TRUNCATE app."Tickets"')
    assert document_states(conn, "tickets") == {}

    unvectorize_table(conn, 'app."Tickets"', "tickets")
    conn.execute("INSERT INTO app.\"Tickets\" (body) VALUES ('no longer followed')")
    assert document_states(conn, "tickets") == {}
    # Dropping a collection removes its triggers: the user's writes keep working.
    vectorize_table(conn, 'app."Tickets"', "id", "body", "tickets")
    drop_collection(conn, "tickets")
    conn.execute("INSERT INTO app.\"Tickets\" (body) VALUES ('still writable')")
    conn.execute("DROP SCHEMA app CASCADE")


def test_sql_search_functions_refuse_bad_arguments_clearly(conn, corpus):
    q = np.full(384, 0.05, dtype=np.float32)
    for statement, params, message in [
        ("SELECT * FROM longembed.search_vector('nope', %s, 5)", (q,), "no collection named 'nope'"),
        (
            "SELECT * FROM longembed.search_vector(%s, %s, 5)",
            ("x'; DROP TABLE longembed.documents; --", q),
            "no collection named",
        ),
        ("SELECT * FROM longembed.search_vector('corpus', %s, 0)", (q,), r"k must be in 1\.\.1000, got 0"),
        ("SELECT * FROM longembed.search_vector('corpus', %s, 5, NULL, 5000)", (q,), "ef_search must be in"),
        (
            "SELECT * FROM longembed.search_vector('corpus', %s, 5, '[1]')",
            (q,),
            "filter must be a JSON object",
        ),
        (
            "SELECT * FROM longembed.search_vector('corpus', '[1,2,3]', 5)",
            (),
            "has 3 dimensions, .* needs 384",
        ),
        ("SELECT * FROM longembed.search_hybrid('nope', 'text', %s, 5)", (q,), "no collection named 'nope'"),
    ]:
        with pytest.raises(psycopg.Error, match=message):
            conn.execute(statement, params)
    # Valid SQL calls answer like the Python API, which goes through the same function.
    rows = conn.execute(
        "SELECT external_id, score FROM longembed.search_vector('corpus', %s, 3)", (q,)
    ).fetchall()
    assert [
        (r.external_id, pytest.approx(r.score)) for r in search(conn, "corpus", q, k=3, mode="chunks")
    ] == rows
