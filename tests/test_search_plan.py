"""The plan cache must not turn search into a sequential scan.

psycopg prepares a statement server-side after a few executions (here: at once, prepare_threshold=0),
and a generic plan cannot see the LIMIT or the query vector: on a table big enough for the HNSW index to
matter, PostgreSQL's generic plan sorts every row. search() goes through
longembed.search_vector, which EXECUTEs its statement (planned afresh each call). auto_explain reports the
plan each execution really used, nested statements included, as a notice to the client.
Vectors are random unit vectors: only the plan matters here, not their meaning.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import psycopg
import pytest
from psycopg import sql

from longembed.plugin.db import register_vector_if_installed
from longembed.plugin.migrate import migrate
from longembed.plugin.store.collections import create_collection
from longembed.plugin.store.search import search
from tests.pgdb import fresh_database

ROWS = 3000  # where the planner clearly prefers the index for a custom plan (and not for a generic one)
DIM = 384


@dataclasses.dataclass(frozen=True)
class RandomVectors:
    name: str = "random-unit-vectors"
    source: str = "random-unit-vectors"
    revision: str = "seed-0"
    dim: int = DIM
    max_tokens: int = 256
    pooling: str = "mean"
    prefixes: dict = dataclasses.field(default_factory=lambda: {"query": "", "document": ""})


@pytest.fixture(scope="module")
def setup(pg_dsn):
    with fresh_database(pg_dsn, "le_plan") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            register_vector_if_installed(conn)
            collection = create_collection(conn, "plan", RandomVectors())
            vectors = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            with conn.transaction():
                ids = conn.execute(
                    """INSERT INTO longembed.documents
                           (collection_id, external_id, text, content_hash, status)
                       SELECT %s, 'd' || g, 'text ' || g, sha256(g::text::bytea), 'embedded'
                       FROM generate_series(1, %s) g ORDER BY g RETURNING id""",
                    (collection.id, ROWS),
                ).fetchall()
                copy_sql = sql.SQL(
                    "COPY {} (document_id, ordinal, char_start, char_end, n_tokens, embedding) "
                    "FROM STDIN (FORMAT BINARY)"
                ).format(collection.chunk_table)
                with conn.cursor().copy(copy_sql) as copy:
                    copy.set_types(["int8", "int4", "int4", "int4", "int4", "vector"])
                    for (doc_id,), vector in zip(ids, vectors, strict=True):
                        copy.write_row((doc_id, 0, 0, 5, 2, vector))
            conn.execute(sql.SQL("ANALYZE {}").format(collection.chunk_table))
        yield dsn, collection, vectors


def _plans_of_executions(conn: psycopg.Connection) -> list[str]:
    """Switch on auto_explain for this session; returns the list it fills with executed plans."""
    plans: list[str] = []
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_level = notice")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
    return plans


def _chunk_scans(plans: list[str], table: str) -> list[str]:
    """The scan line on the chunk table of every plan that read it."""
    return [line.strip() for plan in plans for line in plan.splitlines() if "Scan" in line and table in line]


def test_search_keeps_the_index_on_prepared_statements(setup):
    dsn, collection, vectors = setup
    table = f"chunks_{collection.id}"
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        register_vector_if_installed(conn)
        # The worst a caller can do: every statement prepared, generic plans forced for the session.
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plans = _plans_of_executions(conn)
        for i in range(8):
            results = search(conn, collection, vectors[i], k=10, mode="chunks")
            assert results[0].external_id == f"d{i + 1}"  # its own vector is the nearest
        scans = _chunk_scans(plans, table)
        assert len(scans) == 8
        assert all(s.startswith(f"->  Index Scan using {table}_embedding_idx") for s in scans), scans
        # The caller's side really was prepared and generic-planned: the index came from inside.
        prepared = conn.execute(
            "SELECT generic_plans FROM pg_prepared_statements "
            "WHERE statement LIKE 'SELECT * FROM longembed.search_modes(%'"
        ).fetchall()
        assert prepared and all(generic >= 8 for (generic,) in prepared), prepared


def test_the_hazard_is_real_at_this_size(setup):
    """Control: a plain nearest-neighbour statement under a generic plan sorts the table, so the test
    above could fail."""
    dsn, collection, vectors = setup
    table = f"chunks_{collection.id}"
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        register_vector_if_installed(conn)
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plans = _plans_of_executions(conn)
        statement = sql.SQL("SELECT document_id FROM {} ORDER BY embedding <=> %s LIMIT %s").format(
            collection.chunk_table
        )
        conn.execute(statement, (vectors[0], 10))
        assert _chunk_scans(plans, table)[0].startswith(f"->  Seq Scan on {table}")


def test_filtered_search_walks_the_index(setup):
    dsn, collection, vectors = setup
    table = f"chunks_{collection.id}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector_if_installed(conn)
        conn.execute(
            "UPDATE longembed.documents SET metadata = jsonb_build_object('even', id %% 2 = 0) "
            "WHERE collection_id = %s",
            (collection.id,),
        )
        # Statistics tell the planner that half the documents pass, so walking the index beats
        # fetching and sorting every passing document (which it picks for a rare filter).
        conn.execute("ANALYZE longembed.documents")
        plans = _plans_of_executions(conn)
        results = search(conn, collection, vectors[0], k=10, filter={"even": True}, mode="chunks")
        assert len(results) == 10
        assert all(r.metadata == {"even": True} for r in results)
        scans = _chunk_scans(plans, table)
        assert scans and all(f"Index Scan using {table}_embedding_idx" in s for s in scans), scans
        conn.execute(
            "UPDATE longembed.documents SET metadata = '{}' WHERE collection_id = %s", (collection.id,)
        )
