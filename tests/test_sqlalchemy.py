"""longembed.plugin.sqlalchemy on the session's real server: SQLAlchemy 2 Core and ORM with the psycopg
(3) dialect, SQL embed()/search() through the real model host (fixture `model_host`, real MiniLM
weights). Every result is compared with plain SQL or with Python's store search and the model run here.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import CodeType

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from psycopg import errors
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker, WorkerConfig
from longembed.plugin.sqlalchemy import (
    SEARCH_COLUMNS,
    Vector,
    create_engine,
    embed,
    embed_query,
    on_external_id,
    search,
    vectorize_table,
)
from longembed.plugin.store.collections import CollectionNotFound, create_collection, get_collection
from longembed.plugin.store.documents import Document, add_documents
from longembed.plugin.store.search import embed_query as python_embed_query
from longembed.plugin.store.search import search as python_search
from tests.pgdb import migrated_database

pytestmark = pytest.mark.usefixtures("model_host")

CORPUS = {
    "volcano": "Volcanoes form where magma rises through cracks in the crust; lava and ash follow.",
    "sourdough": "Sourdough bread rises with a starter of wild yeast; feed it flour and water before baking.",
    "chess": "The Sicilian Defence answers 1.e4 with c5 and is the most popular reply in chess openings.",
    "password": "To reset your account password open Settings, then Security, and follow the emailed link.",
    "garden": "Tomatoes need six hours of sun a day, deep watering and a stake to climb as they grow.",
}
QUERIES = [
    "molten rock from a mountain",
    "baking bread with yeast",
    "I forgot my login",
    "growing vegetables",
]
HOSTILE = [
    "'); DROP TABLE longembed.collections; --",
    "Robert'); DROP TABLE notes;-- \\ $$ $body$ %s %(x)s {0} :param",
    "emoji 🦜 and 中文 and ĳ ligature, zero\u200bwidth, RTL \u202e text",
    "x" * 5000,
]


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "sqla_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]
    embedding: Mapped[np.ndarray | None] = mapped_column(Vector(384))


@pytest.fixture(scope="module")
def model():
    return get_model()


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_sqla") as url:
        yield url


@pytest.fixture(scope="module")
def conn(dsn):
    with connect(dsn) as c:
        yield c


@pytest.fixture(scope="module")
def engine(dsn):
    engine = create_engine(dsn)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def collection(conn, model):
    create_collection(conn, "sqla", model.info, chunk_tokens=64, overlap=8)
    docs = [Document(key, text, {"topic": key, "n": i}) for i, (key, text) in enumerate(CORPUS.items())]
    add_documents(conn, "sqla", docs)
    assert Worker(conn, model, WorkerConfig()).drain().embedded == len(docs)
    return "sqla"


@pytest.fixture(scope="module")
def notes(engine, conn, model):
    """The ORM table, its embeddings written by SQL embed() in an UPDATE, an HNSW index; also
    vectorized into collection `sqla_notes` (drained here, as the model host's worker would)."""
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Note(id=i, body=text) for i, text in enumerate(CORPUS.values(), start=1))
    with engine.begin() as c:
        c.execute(sa.update(Note).values(embedding=embed(Note.body, "document")))
        c.execute(sa.text("CREATE INDEX ON sqla_notes USING hnsw (embedding vector_cosine_ops)"))
    create_collection(conn, "sqla_notes", model.info, chunk_tokens=64, overlap=8)
    with engine.begin() as c:
        assert vectorize_table(c, Note, "id", "body", "sqla_notes") == len(CORPUS)
    assert Worker(conn, model, WorkerConfig()).drain().embedded == len(CORPUS)
    return Note


def _db_error(caught: pytest.ExceptionInfo) -> psycopg.Error:
    """The driver's error under SQLAlchemy's wrapper."""
    assert isinstance(caught.value, sa.exc.DBAPIError)
    return caught.value.orig


@pytest.mark.parametrize("kind", ["query", "document"])
def test_embed_selects_the_models_vector_as_a_numpy_array(engine, model, kind):
    texts = ["how do I reset my password", "PostgreSQL stores the vectors next to the text.", "a"]
    with engine.connect() as c:
        for text, want in zip(texts, model.embed(texts, kind=kind), strict=True):
            got = c.execute(sa.select(embed(text, kind))).scalar_one()
            assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (384,)
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_embed_type_is_pgvectors_vector_with_its_dimension():
    element = embed("x", dim=384)
    assert isinstance(element.type, Vector) and element.type.dim == 384
    assert embed("x").type.dim is None
    # pgvector's comparators are there on the function itself too.
    sql = str(embed("a").cosine_distance(embed("b")).compile(dialect=psycopg_dialect.dialect()))
    assert "longembed.embed(" in sql and "<=>" in sql


def test_embed_query_equals_the_collections_query_vector(engine, conn, model, collection):
    target = get_collection(conn, collection)
    with engine.connect() as c:
        got = c.execute(sa.select(embed_query(collection, "reset password", dim=384))).scalar_one()
    np.testing.assert_allclose(got, python_embed_query(target, "reset password", model), atol=1e-5)


@pytest.mark.parametrize(
    ("method", "operator"),
    [("cosine_distance", "<=>"), ("l2_distance", "<->"), ("max_inner_product", "<#>")],
)
def test_orm_order_by_distance_to_embed_equals_plain_sql(engine, conn, notes, method, operator):
    for query in QUERIES:
        distance = getattr(Note.embedding, method)(embed(query))
        with Session(engine) as session:
            rows = session.execute(sa.select(Note, distance).order_by(distance).limit(3)).all()
        plain = conn.execute(
            f"SELECT id, embedding {operator} embed(%s) AS d FROM sqla_notes ORDER BY d LIMIT 3", (query,)
        ).fetchall()
        assert [note.id for note, _ in rows] == [r[0] for r in plain]
        np.testing.assert_allclose([d for _, d in rows], [r[1] for r in plain], atol=1e-6)
        assert all(isinstance(d, float) for _, d in rows)
        assert isinstance(rows[0][0].embedding, np.ndarray) and rows[0][0].embedding.shape == (384,)
    with Session(engine) as session:
        best = session.scalars(
            sa.select(Note).order_by(Note.embedding.cosine_distance(embed("molten rock"))).limit(1)
        ).one()
    assert best.body == CORPUS["volcano"]


def test_order_by_embed_walks_the_hnsw_index(engine, notes):
    query = sa.select(Note.id).order_by(Note.embedding.cosine_distance(embed("a question"))).limit(3)
    with engine.connect() as c:
        c.execute(sa.text("SET enable_seqscan = off"))  # 5 rows: the planner would rather scan them
        compiled = query.compile(engine)
        plan = c.exec_driver_sql(f"EXPLAIN {compiled.string}", compiled.params).scalars().all()
    assert any("Index Scan using" in line for line in plan), plan


def test_core_search_equals_python_search_with_typed_columns(engine, conn, model, collection):
    for query in QUERIES:
        python = python_search(conn, collection, query, k=3, model=model)
        hits = search(collection, query, 3)
        with engine.connect() as c:
            rows = c.execute(sa.select(hits).order_by(hits.c.score.desc())).all()
        assert [r.external_id for r in rows] == [p.external_id for p in python]
        np.testing.assert_allclose([r.score for r in rows], [p.score for p in python], atol=1e-5)
        assert [(r.chunk_ordinal, r.char_start, r.char_end, r.snippet, r.truncated) for r in rows] == [
            (p.chunk_ordinal, p.char_start, p.char_end, p.snippet, p.truncated) for p in python
        ]
        assert [r.metadata for r in rows] == [p.metadata for p in python]
        for r in rows:
            assert isinstance(r.score, float) and isinstance(r.metadata, dict)
            assert isinstance(r.chunk_ordinal, int) and isinstance(r.truncated, bool)


def test_search_options_go_by_name(engine, conn, model, collection):
    with engine.connect() as c:
        filtered = c.execute(sa.select(search(collection, "bread", 5, filter={"topic": "chess"}))).all()
        assert [r.external_id for r in filtered] == ["chess"]
        assert filtered[0].metadata == {"topic": "chess", "n": 2}
        hybrid = search(collection, "Sicilian Defence", 2, hybrid=True, ef_search=100)
        rows = c.execute(sa.select(hybrid.c.external_id, hybrid.c.score)).all()
    python = python_search(conn, collection, "Sicilian Defence", k=2, hybrid=True, ef_search=100, model=model)
    assert [r.external_id for r in rows] == [p.external_id for p in python]
    assert rows[0].external_id == "chess"
    np.testing.assert_allclose([r.score for r in rows], [p.score for p in python], atol=1e-9)
    # The typed columns take their types' operators: jsonb's ->> on metadata, float comparison on score.
    hits = search(collection, "bread", 5)
    query = sa.select(hits.c.external_id).where(hits.c.metadata["topic"].astext.in_(["chess", "sourdough"]))
    with engine.connect() as c:
        assert set(c.execute(query.where(hits.c.score > -1.0)).scalars()) == {"chess", "sourdough"}
    # A parameter that longembed.search() gains later (mode) is passed by name, and only when given.
    sql = str(sa.select(search("c", "q", mode="x", rrf_k=5)).compile(dialect=psycopg_dialect.dialect()))
    assert "mode => " in sql and "rrf_k => " in sql and "filter" not in sql and "weights" not in sql


def test_search_columns_are_the_sql_functions(engine, conn):
    """Each typed column is a result column of longembed.search() with the same SQL type (a column the
    function gains later is simply not selected by name)."""
    (result,) = conn.execute(
        "SELECT pg_get_function_result(oid) FROM pg_proc "
        "WHERE proname = 'search' AND pronamespace = 'longembed'::regnamespace"
    ).fetchone()
    declared = dict(part.strip().split(" ", 1) for part in result.removeprefix("TABLE(")[:-1].split(","))
    for name, type_ in SEARCH_COLUMNS:
        assert declared[name] == type_.compile(engine.dialect).lower(), (name, declared)


def test_search_modes_equal_python_search(engine, conn, model, collection):
    """mode/weights/fusion/rrf_k reach longembed.search() by name: the rows of Python search()."""
    names = conn.execute(
        "SELECT proargnames FROM pg_proc "
        "WHERE proname = 'search' AND pronamespace = 'longembed'::regnamespace"
    ).fetchone()[0]
    if "mode" not in names:
        pytest.skip("this longembed.search() has no search modes yet")
    options = [
        {"mode": "dense"},
        {"mode": "lexical"},
        {
            "mode": "hybrid",
            "weights": {"dense": 1, "chunks": 1, "lexical": 0.5},
            "fusion": "rrf",
            "rrf_k": 10,
        },
        {"mode": "hybrid", "fusion": "minmax"},
    ]
    for option in options:
        python = python_search(conn, collection, "bread with yeast", k=3, model=model, **option)
        hits = search(collection, "bread with yeast", 3, **option)
        with engine.connect() as c:
            rows = c.execute(sa.select(hits.c.external_id, hits.c.score).order_by(hits.c.score.desc())).all()
        assert [r.external_id for r in rows] == [p.external_id for p in python], option
        np.testing.assert_allclose([r.score for r in rows], [p.score for p in python], atol=1e-5)


def test_a_cached_statement_takes_new_values(engine, collection):
    """SQLAlchemy caches the compiled statement per shape: the same shape with other values (named
    arguments included) must send the new ones."""
    with engine.connect() as c:
        for topic in ("chess", "volcano", "garden"):
            rows = c.execute(
                sa.select(search(collection, "anything at all", 5, filter={"topic": topic}))
            ).all()
            assert [r.external_id for r in rows] == [topic]
        for k in (1, 2, 4):
            assert len(c.execute(sa.select(search(collection, "bread", k))).all()) == k


def test_search_joined_to_the_orm_table_by_external_id(engine, conn, model, notes):
    python = python_search(conn, "sqla_notes", "I forgot my login", k=3, model=model)
    hits = search("sqla_notes", "I forgot my login", 3)
    query = (
        sa.select(Note, hits.c.score).join(hits, on_external_id(hits, Note.id)).order_by(hits.c.score.desc())
    )
    with Session(engine) as session:
        rows = session.execute(query).all()
    assert [str(note.id) for note, _ in rows] == [p.external_id for p in python]
    np.testing.assert_allclose([score for _, score in rows], [p.score for p in python], atol=1e-5)
    assert rows[0][0].body == CORPUS["password"]


def test_vectorized_table_follows_orm_writes(engine, conn, model, notes):
    with Session(engine) as session, session.begin():
        session.add(Note(id=100, body="Kayaks and canoes: paddling down the river at dawn."))
        session.get(Note, 1).body = "Penguins huddle together through the Antarctic winter."
    Worker(conn, model, WorkerConfig()).drain()
    hits = search("sqla_notes", "boats on water", 1)
    with engine.connect() as c:
        assert c.execute(sa.select(hits.c.external_id)).scalar_one() == "100"
        hits = search("sqla_notes", "birds in the cold south", 1)
        assert c.execute(sa.select(hits.c.external_id)).scalar_one() == "1"


def test_vectorize_table_bad_arguments(engine, notes):
    with engine.begin() as c, pytest.raises(ValueError, match="no column"):
        vectorize_table(c, Note, "id", "no_such_column", "sqla_notes")
    with engine.begin() as c, pytest.raises(CollectionNotFound, match="no collection"):
        vectorize_table(c, Note, "id", "body", "no such collection")
    with engine.begin() as c, pytest.raises(ValueError, match="no table"):
        vectorize_table(c, sa.Table("no_such_table", sa.MetaData()), "id", "body", "sqla_notes")
    hostile = sa.Table('sqla_notes"; DROP TABLE sqla_notes; --', sa.MetaData(), schema="public")
    with engine.begin() as c, pytest.raises(ValueError, match="no table"):
        vectorize_table(c, hostile, "id", "body", "sqla_notes")
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(Note)).scalar_one() >= len(CORPUS)


def test_vectorize_table_is_part_of_the_callers_transaction(engine, conn, collection, notes):
    """Rolled back with the caller's transaction: no trigger, nothing queued; a refused call leaves that
    transaction usable."""
    documents = (
        "SELECT count(*) FROM longembed.documents d JOIN longembed.collections c ON c.id = d.collection_id"
    )
    before = conn.execute(documents).fetchone()[0]
    with engine.connect() as c:
        assert vectorize_table(c, Note, "id", "body", collection) >= len(CORPUS)
        with pytest.raises(ValueError, match="no column"):
            vectorize_table(c, Note, "id", "no_such_column", collection)
        assert c.execute(sa.select(sa.literal(1))).scalar_one() == 1  # still usable
        c.rollback()
    triggers = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'sqla_notes'::regclass AND NOT tgisinternal"
    ).fetchall()
    assert all(
        name.startswith(f"longembed_vectorize_{get_collection(conn, 'sqla_notes').id}")
        for (name,) in triggers
    )
    assert conn.execute(documents).fetchone()[0] == before


def test_hostile_texts_are_bound_parameters(engine, conn, model, collection, notes):
    with engine.connect() as c:
        for text, want in zip(HOSTILE, model.embed(HOSTILE, kind="query"), strict=True):
            np.testing.assert_allclose(c.execute(sa.select(embed(text))).scalar_one(), want, atol=1e-5)
            rows = c.execute(sa.select(search(collection, text, 2))).all()
            assert [r.external_id for r in rows] == [
                p.external_id for p in python_search(conn, collection, text, k=2, model=model)
            ]
        hostile_filter = {"topic": "x'); DROP TABLE longembed.documents; --"}
        assert c.execute(sa.select(search(collection, "bread", 3, filter=hostile_filter))).all() == []
    assert conn.execute(
        "SELECT count(*) FROM longembed.documents d JOIN longembed.collections c "
        "ON c.id = d.collection_id WHERE c.name = 'sqla'"
    ).fetchone() == (len(CORPUS),)
    assert conn.execute("SELECT count(*) FROM sqla_notes").fetchone()[0] >= len(CORPUS)


def test_huge_text_embeds_as_the_model_truncates_it(engine, model):
    huge = "the quick brown fox jumps over the lazy dog " * 23000  # ~1 MB
    with engine.connect() as c:
        got = c.execute(sa.select(embed(huge, "document"))).scalar_one()
    np.testing.assert_allclose(got, model.embed([huge], kind="document")[0], atol=1e-5)


def test_bad_input_fails_with_the_sql_layers_errors(engine, collection):
    cases = [
        (search(collection, "q", 0), errors.InvalidParameterValue, "k must be in 1..1000"),
        (search(collection, "q", 1001), errors.InvalidParameterValue, "k must be in 1..1000"),
        (search(collection, "q", -5), errors.InvalidParameterValue, "k must be in 1..1000"),
        (search(collection, "q", "5; DROP TABLE x"), errors.InvalidTextRepresentation, "integer"),
        (search(collection, "q", 3, ef_search=0), errors.InvalidParameterValue, "ef_search must be"),
        (search(collection, "q", 3, filter=[1, 2]), errors.InvalidParameterValue, "filter must be a JSON"),
        (search("sqla'; DROP TABLE longembed.documents; --", "q"), errors.UndefinedObject, "no collection"),
        (search(collection, "   "), errors.DataException, "empty"),
        (search(collection, None), errors.NullValueNotAllowed, "NULL"),
        (embed(""), errors.DataException, "empty"),
        (embed("text", "passage"), errors.InvalidParameterValue, "kind must be 'query' or 'document'"),
    ]
    with engine.connect() as c:
        for element, error, message in cases:
            with pytest.raises(sa.exc.DBAPIError) as caught:
                c.execute(sa.select(element))
            assert isinstance(_db_error(caught), error), (element, caught.value)
            assert message in str(caught.value.orig)
            c.rollback()
        assert c.execute(sa.select(embed(None))).scalar_one() is None
        # A NUL byte never reaches the server: the driver refuses it (PostgreSQL text cannot hold one).
        with pytest.raises(sa.exc.DataError, match="NUL"):
            c.execute(sa.select(embed("nul \x00 byte")))
        c.rollback()
        assert c.execute(sa.select(sa.literal(1))).scalar_one() == 1


def test_engine_takes_a_keyword_dsn(dsn):
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    words = make_conninfo("", **conninfo_to_dict(dsn))
    engine = create_engine(words)
    try:
        with engine.connect() as c:
            assert (
                c.execute(sa.select(sa.func.current_database())).scalar_one()
                == conninfo_to_dict(dsn)["dbname"]
            )
    finally:
        engine.dispose()


def _readme_blocks() -> list[CodeType]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## SQLAlchemy\n", 1)[1].split("\n## ", 1)[0]
    # Compiled apart from this module: its `from __future__ import annotations` would turn the
    # blocks' annotations into strings that the ORM resolves in a module that does not exist.
    return [
        compile(block, "README.md", "exec", dont_inherit=True)
        for block in re.findall(r"```python\n(.*?)```", section, re.S)
    ]


def test_readme_examples_run(pg_dsn, model, capsys):
    """The README's SQLAlchemy blocks, run as written, in order, on a database with collections `docs`
    and `notes` (the worker that the model host runs is this process's here)."""
    blocks = _readme_blocks()
    assert len(blocks) == 3
    with migrated_database(pg_dsn, "le_sqla_readme") as url, connect(url) as conn:
        create_collection(conn, "docs", model.info, chunk_tokens=64, overlap=8)
        docs = [Document(key, text, {"lang": "en"}) for key, text in CORPUS.items()]
        add_documents(conn, "docs", [*docs, Document("de", "Passwort zurücksetzen", {"lang": "de"})])
        create_collection(conn, "notes", model.info)
        Worker(conn, model, WorkerConfig()).drain()
        namespace: dict = {"dsn": url}
        try:
            exec(blocks[0], namespace)
            assert namespace["vector"].shape == (384,) and namespace["vector"].dtype == np.float32
            printed = capsys.readouterr().out.splitlines()
            assert printed[:2] == ["1 Holiday plans: two weeks in Portugal in June", "2 Buy milk and eggs"]
            assert printed[2].startswith("password ") and len(printed) == 2 + len(CORPUS)
            exec(blocks[1], namespace)
            assert namespace["queued"] == 2
            assert Worker(conn, model, WorkerConfig()).drain().embedded == 2
            exec(blocks[2], namespace)
            printed = capsys.readouterr().out.splitlines()
            holiday = conn.execute("SELECT id FROM notes WHERE body LIKE 'Holiday%'").fetchone()[0]
            assert len(printed) == 2 and printed[0].startswith(f"{holiday} ")
        finally:
            if "engine" in namespace:
                namespace["engine"].dispose()
