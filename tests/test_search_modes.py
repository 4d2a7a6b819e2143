"""Document vectors beside the chunks, and the search modes dense / chunks / lexical / hybrid / auto.

Real embedded PostgreSQL, real MiniLM weights; the fused rankings are recomputed here in Python from each
signal's own candidate pool (the SQL functions of migrations/functions/015_search.sql)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from longembed.plugin.cli.data import _await_auto_choice
from longembed.plugin.db import connect, register_vector_if_installed
from longembed.plugin.migrate import migrate
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker, embedders, mean_of_chunks
from longembed.plugin.store.calibrate import _pick, calibrate, due, pseudo_query
from longembed.plugin.store.collections import create_collection, drop_collection, get_collection
from longembed.plugin.store.documents import Document, add_documents, delete_documents
from longembed.plugin.store.search import embed_query, search
from tests.clirun import longembed
from tests.pgdb import fresh_database, migrated_database
from tests.test_ingest_search import CORPUS, HANDBOOK

REPO = Path(__file__).resolve().parents[1]
# Long enough that 40-token chunks cut it into several, and its head (254 tokens) differs from chunk 0.
LONG = " ".join([HANDBOOK] * 3)


@pytest.fixture(scope="module")
def model():
    return get_model()


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_modes") as url:
        yield url


@pytest.fixture(scope="module")
def conn(dsn):
    with connect(dsn) as c:
        yield c


@pytest.fixture(scope="module")
def corpus(conn, model):
    """Collection "modes": 40-token chunks (the head is its own sequence), the topics plus a long text."""
    create_collection(conn, "modes", model.info, chunk_tokens=40, overlap=8)
    docs = [Document(k, v, {"topic": k, "half": i % 2}) for i, (k, v) in enumerate(CORPUS.items())]
    docs.append(Document("handbook", LONG, {"topic": "hr", "half": 1}))
    add_documents(conn, "modes", docs)
    assert Worker(conn, model).drain().embedded == len(docs)
    return get_collection(conn, "modes")


def _vectors(conn, collection) -> dict[str, tuple[np.ndarray, int, bool]]:
    rows = conn.execute(
        sql.SQL(
            "SELECT d.external_id, v.embedding, v.n_tokens, v.truncated FROM {} v "
            "JOIN longembed.documents d ON d.id = v.document_id"
        ).format(collection.document_table)
    ).fetchall()
    return {eid: (vec.to_numpy(), n, cut) for eid, vec, n, cut in rows}


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("head_chunk40", {"chunk_tokens": 40, "overlap": 8}),  # the head is a sequence of its own
        ("head_default", {}),  # chunk 0 is the head: reused, not embedded twice
        ("head_late", {"mode": "late", "chunk_tokens": 40, "overlap": 8}),  # one more pooled span
        ("head_full", {"mode": "full"}),
    ],
)
def test_document_vector_is_the_embedded_head(conn, model, name, settings):
    create_collection(conn, name, model.info, **settings)
    texts = {"long": LONG, "short": CORPUS["chess"]}
    add_documents(conn, name, [Document(k, v) for k, v in texts.items()])
    assert Worker(conn, model).drain().embedded == 2
    stored = _vectors(conn, get_collection(conn, name))
    expected = model.embed(list(texts.values()), kind="document")
    for (eid, _), vector in zip(texts.items(), expected, strict=True):
        np.testing.assert_allclose(stored[eid][0], vector, atol=1e-5)
    assert stored["long"][2] and not stored["short"][2]  # truncated: the long text passed the window
    assert stored["long"][1] == model.info.max_tokens - 2  # the whole window of content tokens
    drop_collection(conn, name)


def test_mean_document_vector_is_the_token_weighted_mean_of_the_chunks(conn, model):
    create_collection(conn, "mean", model.info, chunk_tokens=40, overlap=8, document_vector="mean")
    add_documents(conn, "mean", [Document("long", LONG)])
    Worker(conn, model).drain()
    collection = get_collection(conn, "mean")
    (chunks,) = model.embed_chunks([LONG], mode="chunk", chunk_tokens=40, overlap=8)
    vector, n_tokens, truncated = _vectors(conn, collection)["long"]
    np.testing.assert_allclose(vector, mean_of_chunks(chunks), atol=1e-5)
    assert n_tokens == sum(c.n_tokens for c in chunks) and not truncated
    drop_collection(conn, "mean")
    assert conn.execute("SELECT to_regclass(%s)", (f"longembed.docvecs_{collection.id}",)).fetchone() == (
        None,
    )


def test_both_tables_follow_updates_deletes_and_re_embedding(conn, model):
    create_collection(conn, "sync", model.info, chunk_tokens=40, overlap=8)
    collection = get_collection(conn, "sync")
    add_documents(conn, "sync", [Document(k, v) for k, v in list(CORPUS.items())[:3]])
    Worker(conn, model).drain()

    def counts() -> tuple[int, int]:
        (docs,) = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(collection.document_table)
        ).fetchone()
        (chunked,) = conn.execute(
            sql.SQL("SELECT count(DISTINCT document_id) FROM {}").format(collection.chunk_table)
        ).fetchone()
        return docs, chunked

    assert counts() == (3, 3)
    first = next(iter(CORPUS))
    add_documents(conn, "sync", [Document(first, CORPUS["git"])])  # new text: re-queued
    Worker(conn, model).drain()
    np.testing.assert_allclose(
        _vectors(conn, collection)[first][0], model.embed([CORPUS["git"]], kind="document")[0], atol=1e-5
    )
    assert counts() == (3, 3)
    delete_documents(conn, "sync", [first])
    assert counts() == (2, 2)
    conn.execute(
        "UPDATE longembed.documents SET status = 'failed' WHERE collection_id = %s", (collection.id,)
    )
    add_documents(conn, "sync", [Document(k, v) for k, v in list(CORPUS.items())[1:3]])  # requeued
    assert Worker(conn, model).drain().embedded == 2
    assert counts() == (2, 2)


def _pool(conn, collection, signal, text, vector, n=100, filter=None) -> list[tuple[str, float]]:
    if signal == "chunks":
        return conn.execute(
            "SELECT external_id, score FROM longembed.search_vector(%s, %s, %s, %s)",
            (collection.name, vector, n, filter and Jsonb(filter)),
        ).fetchall()
    function = "search_dense_pool" if signal == "dense" else "search_lexical_pool"
    return conn.execute(
        sql.SQL(
            "SELECT d.external_id, p.score FROM longembed.{}(%s, %s, %s, %s) p "
            "JOIN longembed.documents d ON d.id = p.document_id"
        ).format(sql.Identifier(function)),
        (collection.id, vector if signal == "dense" else text, n, filter and Jsonb(filter)),
    ).fetchall()


def _fuse(pools: dict[str, list[tuple[str, float]]], weights, fusion, rrf_k=60) -> list[tuple[str, float]]:
    """The fusion of 015_search.sql, in Python."""
    fused: dict[str, float] = {}
    constant = 0.0
    for signal, weight in weights.items():
        pool = sorted(pools[signal], key=lambda row: (-row[1], row[0]))
        scores = np.array([s for _, s in pool])
        if fusion == "rrf":
            values, floor = [1 / (rrf_k + rank) for rank in range(1, len(pool) + 1)], 0.0
        elif fusion == "minmax":
            span = scores.max() - scores.min()
            values = list((scores - scores.min()) / span) if span > 0 else [1.0] * len(pool)
            floor = 0.0
        else:
            sd = scores.std()
            values = list((scores - scores.mean()) / sd) if sd > 0 else [0.0] * len(pool)
            floor = (scores.min() - scores.mean()) / sd if sd > 0 else 0.0
        constant += weight * floor
        for (eid, _), value in zip(pool, values, strict=True):
            fused[eid] = fused.get(eid, 0.0) + weight * (value - floor)
    return sorted(((eid, s + constant) for eid, s in fused.items()), key=lambda row: (-row[1], row[0]))


@pytest.mark.parametrize("filter", [None, {"half": 1}])
@pytest.mark.parametrize("n", [1, 3, 8, 40])
def test_the_chunk_pool_is_search_vectors_ranking_without_its_rows(conn, model, corpus, n, filter):
    """Fused searches take the chunk signal from search_chunks_pool (no snippets): the same documents,
    scores and order as search_vector, also where the long text's chunks make it widen its candidates."""
    vector = embed_query(corpus, "how many vacation days do employees get", model)
    assert (
        _pool(conn, corpus, "chunks", "", vector, n, filter)
        == conn.execute(
            "SELECT d.external_id, p.score FROM longembed.search_chunks_pool(%s, %s, %s, %s) p "
            "JOIN longembed.documents d ON d.id = p.document_id",
            (corpus.id, vector, n, filter and Jsonb(filter)),
        ).fetchall()
    )


@pytest.mark.parametrize("fusion", ["rrf", "minmax", "zscore"])
@pytest.mark.parametrize(
    "weights", [{"dense": 1, "chunks": 1, "lexical": 1}, {"dense": 0.5, "lexical": 2}, {"chunks": 1}]
)
def test_hybrid_fusion_matches_a_python_computation(conn, model, corpus, fusion, weights):
    text = "reset my password with the emailed link"
    vector = embed_query(corpus, text, model)
    pools = {s: _pool(conn, corpus, s, text, vector) for s in weights}
    expected = _fuse(pools, weights, fusion)[:5]
    got = search(conn, "modes", text, 5, mode="hybrid", weights=weights, fusion=fusion, model=model)
    assert [r.external_id for r in got] == [eid for eid, _ in expected]
    np.testing.assert_allclose([r.score for r in got], [s for _, s in expected], atol=1e-9)
    assert got[0].external_id == "password"


def test_rrf_k_changes_the_scores_as_the_formula_says(conn, model, corpus):
    text = "Sicilian Defence"
    got = search(conn, "modes", text, 3, mode="hybrid", rrf_k=10, model=model)
    assert got[0].external_id == "chess" and got[0].score == pytest.approx(3 / 11)


def test_each_single_mode_returns_its_own_signal(conn, model, corpus):
    text = "how many vacation days do employees get"
    vector = embed_query(corpus, text, model)
    dense = search(conn, "modes", text, 4, mode="dense", model=model)
    stored = _vectors(conn, corpus)
    # score = cosine similarity of the query with the stored document vector, best first
    recomputed = sorted(((eid, float(v @ vector)) for eid, (v, _, _) in stored.items()), key=lambda r: -r[1])
    assert [r.external_id for r in dense] == [eid for eid, _ in recomputed[:4]]
    np.testing.assert_allclose([r.score for r in dense], [s for _, s in recomputed[:4]], atol=1e-5)
    assert dense[0].external_id == "handbook"
    # every mode reports the document's best chunk: the vacation section, not the head
    assert "vacation" in dense[0].snippet.lower()

    chunks = search(conn, "modes", text, 4, mode="chunks", model=model)
    rows = conn.execute("SELECT external_id, score FROM longembed.search_vector('modes', %s, 4)", (vector,))
    assert [(r.external_id, pytest.approx(r.score)) for r in chunks] == rows.fetchall()

    lexical = search(conn, "modes", "sulphur gases", 4, mode="lexical")
    assert [r.external_id for r in lexical] == ["volcano"]  # only it has the words
    assert lexical[0].chunk_ordinal == 0  # no query vector: its first chunk
    # lexical needs no model: a vector query is refused, a text one is never embedded
    with pytest.raises(ValueError, match="needs a text query"):
        search(conn, "modes", vector, 4, mode="lexical")


@pytest.mark.parametrize("mode", ["dense", "chunks", "lexical", "hybrid", "auto"])
def test_filters_apply_in_every_mode(conn, model, corpus, mode):
    results = search(
        conn, "modes", "password reset and magma", 10, mode=mode, filter={"half": 1}, model=model
    )
    assert results, mode
    assert all(r.metadata["half"] == 1 for r in results)


def test_sql_text_search_and_python_give_the_same_rows(conn, model, corpus):
    text = "wild yeast bread"
    vector = embed_query(corpus, text, model)
    for mode, extra in [("dense", {}), ("hybrid", {"fusion": "zscore"}), ("lexical", {})]:
        python = search(conn, "modes", text, 3, mode=mode, model=model, **extra)
        rows = conn.execute(
            "SELECT * FROM longembed.search_modes(%s, %s, %s, 3, NULL, NULL, %s, NULL, %s)",
            ("modes", text, vector if mode != "lexical" else None, mode, extra.get("fusion")),
        ).fetchall()
        assert [(r.external_id, pytest.approx(r.score)) for r in python] == [(r[0], r[1]) for r in rows]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "semantic"}, "unknown search mode 'semantic'"),
        ({"mode": "hybrid", "weights": {"bm25": 1}}, "unknown signal 'bm25'"),
        ({"mode": "hybrid", "weights": {"dense": -1}}, "weight of dense must be a number"),
        ({"mode": "hybrid", "weights": {"dense": 0}}, "at least one weight must be above 0"),
        ({"mode": "hybrid", "weights": [1, 2]}, "weights must be a JSON object"),
        ({"mode": "hybrid", "fusion": "max"}, "unknown fusion 'max'"),
        ({"mode": "hybrid", "rrf_k": 0}, "rrf_k must be an integer"),
        ({"mode": "dense", "weights": {"dense": 1}}, "apply to mode 'hybrid'"),
        ({"mode": "dense", "hybrid": True}, "hybrid=True is mode 'hybrid'"),
    ],
)
def test_bad_modes_and_weights_are_refused_clearly(conn, model, corpus, kwargs, message):
    with pytest.raises(ValueError, match=message):
        search(conn, "modes", "anything", 3, model=model, **kwargs)
    if "hybrid" in kwargs:
        return
    vector = embed_query(corpus, "anything", model)
    weights = kwargs.get("weights")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message.split("'")[0].replace("(", ".")):
        conn.execute(
            "SELECT * FROM longembed.search_modes('modes', 'anything', %s, 3, NULL, NULL, %s, %s, %s, %s)",
            (
                vector,
                kwargs.get("mode"),
                weights and Jsonb(weights),
                kwargs.get("fusion"),
                kwargs.get("rrf_k"),
            ),
        )
    conn.rollback()


def test_pseudo_queries_are_first_lines_or_first_sentences():
    assert pseudo_query("json — JSON encoder and decoder\n\nSource code: Lib/json.py ...") == (
        "json — JSON encoder and decoder"
    )
    long_line = "Sourdough bread is leavened by a starter. " + "More words follow here. " * 10
    assert pseudo_query(long_line) == "Sourdough bread is leavened by a starter."
    assert pseudo_query("two words") is None
    assert pseudo_query("") is None


def test_near_ties_go_to_fewer_signals_for_short_documents_and_more_for_long_ones():
    scores = {
        "dense=1": 0.90,
        "lexical=1": 0.5,
        "dense=1 lexical=1": 0.895,
        "dense=1 chunks=1 lexical=1": 0.893,
    }
    assert _pick(scores, short=True) == "dense=1"
    assert _pick(scores, short=False) == "dense=1 chunks=1 lexical=1"
    scores["lexical=1"] = 0.95  # a clear winner wins either way
    assert _pick(scores, short=True) == _pick(scores, short=False) == "lexical=1"


def test_auto_is_the_default_and_stores_what_it_chose(conn, model, corpus):
    assert corpus.search_mode == "auto"
    # 10 documents: too few for pseudo-queries; their statistics decide (the long one has many chunks)
    chosen = get_collection(conn, "modes").auto_fusion
    assert chosen["basis"] == "statistics" and chosen["documents"] == len(CORPUS) + 1
    assert chosen["weights"] == {"dense": 1, "chunks": 1, "lexical": 1} and chosen["fusion"] == "rrf"
    assert not due(conn, get_collection(conn, "modes"))
    auto = search(conn, "modes", "Sicilian Defence", 3, model=model)
    hybrid = search(conn, "modes", "Sicilian Defence", 3, mode="hybrid", model=model)
    assert auto == hybrid


def test_ingest_through_a_host_waits_for_autos_choice(dsn, model):
    """`ingest` leaves embedding to the model host, whose worker makes auto's choice once the queue is
    drained: the CLI waits for that choice (here made by another connection 1.5 s later) before it
    returns, so its first search ranks as auto chose."""
    with connect(dsn) as conn, connect(dsn) as other:
        create_collection(conn, "await", model.info)
        add_documents(conn, "await", [Document(k, v) for k, v in CORPUS.items()])
        Worker(conn, model).drain()
        conn.execute("UPDATE longembed.collections SET auto_fusion = NULL WHERE name = 'await'")
        assert due(conn, get_collection(conn, "await"))

        def choose_later() -> None:
            time.sleep(1.5)
            collection = get_collection(other, "await")
            calibrate(other, collection, *embedders(model, collection))

        chooser = threading.Thread(target=choose_later)
        chooser.start()
        t0 = time.monotonic()
        _await_auto_choice(conn, get_collection(conn, "await"))
        waited = time.monotonic() - t0
        chooser.join()
        assert waited >= 1.4 and get_collection(conn, "await").auto_fusion is not None


def test_calibration_on_pseudo_queries_scores_every_candidate(conn, model):
    create_collection(conn, "calib", model.info)
    docs = [
        Document(f"{topic}-{i}", f"Note {i} about {topic} and its {i}th aspect\n{text}")
        for topic, text in CORPUS.items()
        for i in range(3)
    ]
    add_documents(conn, "calib", docs)
    Worker(conn, model).drain()
    collection = get_collection(conn, "calib")
    chosen = calibrate(conn, collection, *embedders(model, collection))
    assert chosen["basis"] == "pseudo-queries" and chosen["queries"] == len(docs)
    assert "chunks=1" not in chosen["scores"]  # one chunk per document: the chunk signal is the dense one
    assert set(chosen["scores"]) >= {
        "dense=1",
        "lexical=1",
        "rrf dense=1 lexical=1",
        "minmax dense=1 lexical=0.5",
    }
    assert all(0 <= s <= 1 for s in chosen["scores"].values())
    best = max(chosen["scores"].values())
    pairs = " ".join(f"{k}={v:g}" for k, v in chosen["weights"].items())
    name = pairs if chosen["fusion"] == "raw" else f"{chosen['fusion']} {pairs}"
    assert chosen["scores"][name] >= best - 0.01
    assert get_collection(conn, "calib").auto_fusion == chosen


def test_cli_search_modes_and_collection_list(tmp_path, dsn, corpus):
    def run(*args):
        return longembed(tmp_path, *args, "--dsn", dsn)

    out = run("search", "-c", "modes", "Sicilian Defence", "--mode", "hybrid", "--fusion", "minmax", "--json")
    assert out.returncode == 0, out.stderr
    assert '"external_id": "chess"' in out.stdout
    bad = run("search", "-c", "modes", "q", "--mode", "hybrid", "--weights", '{"dense": "x"}')
    assert bad.returncode != 0 and "weight of dense must be a number" in bad.stderr
    bad = run("search", "-c", "modes", "q", "--mode", "semantic")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
    listed = run("collection", "list")
    assert "auto: rrf dense=1 chunks=1 lexical=1" in listed.stdout, listed.stdout


def test_version_3_collections_get_document_vectors_on_upgrade(pg_dsn, tmp_path, monkeypatch, model):
    package = tmp_path / "v3_migrations"
    (package / "versions").mkdir(parents=True)
    (package / "functions").mkdir()
    (package / "__init__.py").write_text("")
    for name in ("0001_init.sql", "0002_model_source_and_chunk_flags.sql", "0003_privileges.sql"):
        (package / "versions" / name).write_text((REPO / "migrations/versions" / name).read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    with fresh_database(pg_dsn, "le_v3") as url, connect(url) as conn:
        migrate(conn, "v3_migrations")
        register_vector_if_installed(conn)  # the connection predates CREATE EXTENSION vector
        info = model.info
        (cid,) = conn.execute(
            """INSERT INTO longembed.collections (name, model_name, model_source, model_revision, dim,
                   chunk_tokens) VALUES ('old', %s, %s, %s, %s, 254) RETURNING id""",
            (info.name, info.source, info.revision, info.dim),
        ).fetchone()
        conn.execute(
            f"""CREATE TABLE longembed.chunks_{cid} (
                    document_id bigint REFERENCES longembed.documents (id) ON DELETE CASCADE,
                    ordinal integer, char_start integer, char_end integer, n_tokens integer,
                    truncated boolean NOT NULL DEFAULT false, embedding vector({info.dim}),
                    PRIMARY KEY (document_id, ordinal))"""
        )
        (doc,) = conn.execute(
            """INSERT INTO longembed.documents (collection_id, external_id, text, content_hash, status,
                   model_revision) VALUES (%s, 'chess', %s, '\\x00', 'embedded', %s) RETURNING id""",
            (cid, CORPUS["chess"], info.revision),
        ).fetchone()
        conn.execute(
            f"INSERT INTO longembed.chunks_{cid} VALUES (%s, 0, 0, 10, 5, false, %s::vector)",
            (doc, str(model.embed([CORPUS["chess"]])[0].tolist())),
        )
        conn.commit()
        report = migrate(conn)
        assert "0005_document_vectors_and_search_modes.sql" in report.applied
        old = get_collection(conn, "old")
        assert old.search_mode == "chunks" and old.document_vector == "head"  # searches as it did
        # its documents wait for their document vectors; chunk search goes on meanwhile
        assert conn.execute("SELECT count(*) FROM longembed.queue").fetchone() == (1,)
        assert [r.external_id for r in search(conn, "old", "Sicilian Defence", 1, model=model)] == ["chess"]
        assert Worker(conn, model).drain().embedded == 1
        np.testing.assert_allclose(
            _vectors(conn, old)["chess"][0], model.embed([CORPUS["chess"]])[0], atol=1e-5
        )
        assert [r.external_id for r in search(conn, "old", "chess", 1, mode="dense", model=model)] == [
            "chess"
        ]
        assert create_collection(conn, "new", model.info).search_mode == "auto"
        drop_collection(conn, "old")
        assert conn.execute("SELECT to_regclass(%s)", (f"longembed.docvecs_{cid}",)).fetchone() == (None,)
