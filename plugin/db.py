"""Connections: psycopg 3 with pgvector's types registered and no server-side prepared plans."""

from __future__ import annotations

import psycopg
from pgvector.psycopg import register_vector


def connect(dsn: str, *, autocommit: bool = True, application_name: str = "longembed") -> psycopg.Connection:
    """Open a connection and register pgvector's types when the extension is installed.

    `prepare_threshold=None`: psycopg would otherwise prepare a statement server-side after five runs,
    and PostgreSQL may then reuse a generic plan that sorts the whole table instead of walking the HNSW
    index (tests/test_search_plan.py). Search also sets plan_cache_mode for callers' connections.
    Autocommit by default: our functions open explicit `conn.transaction()` blocks where they need one.
    `application_name` shows in pg_stat_activity (workers call themselves "longembed worker").
    """
    conn = psycopg.connect(
        dsn, autocommit=autocommit, prepare_threshold=None, application_name=application_name
    )
    try:
        register_vector_if_installed(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def register_vector_if_installed(conn: psycopg.Connection) -> bool:
    """Register pgvector's dumpers/loaders; False where `CREATE EXTENSION vector` has not run yet."""
    row = conn.execute("SELECT to_regtype('vector') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return False
    register_vector(conn)
    return True


def require_vector(conn: psycopg.Connection) -> None:
    """Fail clearly where the schema (and with it pgvector) is missing."""
    if not register_vector_if_installed(conn):
        raise RuntimeError("pgvector is not installed in this database: run `longembed migrate` first")
    row = conn.execute(
        "SELECT has_schema_privilege(oid, 'USAGE'), current_user "
        "FROM pg_namespace WHERE nspname = 'longembed'"
    ).fetchone()
    if row is None:
        raise RuntimeError("schema longembed is missing: run `longembed migrate` first")
    if not row[0]:
        raise RuntimeError(
            f"role {row[1]} has no access to schema longembed: the owner grants it with "
            f"GRANT longembed_reader (search) or longembed_writer (ingest) TO {row[1]}; "
            "where those roles have no privileges yet, run `longembed migrate` as the owner"
        )
    row = conn.execute("SELECT to_regclass('longembed.collections') IS NOT NULL").fetchone()
    if not row or not row[0]:
        raise RuntimeError("schema longembed is missing: run `longembed migrate` first")
