"""A fresh database per test module on the session's PostgreSQL server (fixture `pg_dsn`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo


@contextmanager
def fresh_database(server_dsn: str, prefix: str) -> Iterator[str]:
    """Create database `<prefix>_<random>`, yield its DSN, drop it (closing leftover connections)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(
                psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    psycopg.sql.Identifier(name)
                )
            )


def database_name(dsn: str) -> str:
    return conninfo_to_dict(dsn)["dbname"]


@contextmanager
def migrated_database(server_dsn: str, prefix: str) -> Iterator[str]:
    """`fresh_database` with longembed's schema installed."""
    from longembed.plugin.migrate import migrate

    with fresh_database(server_dsn, prefix) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn)
        yield url
