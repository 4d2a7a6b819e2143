"""Auto-embedding of a column of the user's own table (pgai-vectorizer style).

Row triggers on the user's table call longembed.vectorize_trigger (migrations/functions/010_documents.sql),
which upserts the row's text as a document of the collection (external id = the row's id) and so feeds
the same queue the worker drains; deleting a row, blanking its text or TRUNCATE removes the documents.
Triggers run with the privileges of whoever writes the table (SECURITY INVOKER): such roles need
INSERT/UPDATE/DELETE on longembed.documents and longembed.queue. A SECURITY DEFINER trigger would let
anyone able to create a table write into every collection.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from plugin.collections import Collection, get_collection, trigger_names


@dataclass(frozen=True)
class VectorizedTable:
    table: str  # as PostgreSQL prints the regclass (quoted and qualified where needed)
    id_column: str
    text_column: str
    collection: str


def _resolve_table(conn: psycopg.Connection, table: str) -> tuple[int, sql.Identifier]:
    """OID and safe identifier of `table` ("name" or "schema.name", SQL identifier syntax)."""
    try:
        row = conn.execute(
            """SELECT c.oid::bigint, n.nspname, c.relname, c.relkind FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)""",
            (table,),
        ).fetchone()
    except psycopg.errors.InvalidName as exc:
        raise ValueError(f"invalid table name {table!r}: {exc}") from exc
    if row is None:
        raise ValueError(f"no table named {table!r}")
    oid, schema, name, kind = row
    if kind not in ("r", "p"):
        raise ValueError(f"{table!r} is not a table")
    if schema == "longembed":
        raise ValueError("tables of schema longembed cannot be vectorized")
    return oid, sql.Identifier(schema, name)


def _check_column(conn: psycopg.Connection, oid: int, column: str) -> None:
    row = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = %s AND attname = %s AND attnum > 0 AND NOT attisdropped",
        (oid, column),
    ).fetchone()
    if row is None:
        raise ValueError(f"table has no column {column!r}")


def vectorize_table(
    conn: psycopg.Connection,
    table: str,
    id_column: str,
    text_column: str,
    collection: str | Collection,
    *,
    backfill: bool = True,
) -> int:
    """Keep `collection` in sync with `table`: one document per row, id from `id_column`.

    Existing rows are queued at once when `backfill`. Returns how many rows were queued.
    """
    target = collection if isinstance(collection, Collection) else get_collection(conn, collection)
    with conn.transaction():
        oid, ident = _resolve_table(conn, table)
        _check_column(conn, oid, id_column)
        _check_column(conn, oid, text_column)
        row_trigger, truncate_trigger = trigger_names(target.id)
        args = sql.SQL(", ").join(sql.Literal(str(a)) for a in (target.id, id_column, text_column))
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(row_trigger, ident))
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(truncate_trigger, ident))
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} "
                "FOR EACH ROW EXECUTE FUNCTION longembed.vectorize_trigger({})"
            ).format(row_trigger, ident, args)
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER TRUNCATE ON {} "
                "FOR EACH STATEMENT EXECUTE FUNCTION longembed.vectorize_truncate({})"
            ).format(truncate_trigger, ident, sql.Literal(str(target.id)))
        )
        conn.execute(
            """INSERT INTO longembed.vectorized_tables (table_oid, id_column, text_column, collection_id)
               VALUES (%s::oid, %s, %s, %s)
               ON CONFLICT (table_oid) DO UPDATE SET id_column = excluded.id_column,
                   text_column = excluded.text_column, collection_id = excluded.collection_id""",
            (oid, id_column, text_column, target.id),
        )
        if not backfill:
            return 0
        # The same text conversion as the trigger (to_jsonb ->>), so both give identical ids.
        cur = conn.execute(
            sql.SQL(
                """SELECT longembed.upsert_document(%(cid)s, r.id, r.body, '{{}}'::jsonb)
                   FROM (SELECT to_jsonb(t) ->> %(id)s AS id, to_jsonb(t) ->> %(text)s AS body FROM {} t) r
                   WHERE r.id IS NOT NULL AND btrim(coalesce(r.body, '')) <> ''"""
            ).format(ident),
            {"cid": target.id, "id": id_column, "text": text_column},
        )
        return sum(1 for (outcome,) in cur.fetchall() if outcome != "unchanged")


def unvectorize_table(conn: psycopg.Connection, table: str, collection: str | Collection) -> None:
    """Remove the triggers; the documents already in the collection stay."""
    target = collection if isinstance(collection, Collection) else get_collection(conn, collection)
    with conn.transaction():
        oid, ident = _resolve_table(conn, table)
        for name in trigger_names(target.id):
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(name, ident))
        conn.execute(
            "DELETE FROM longembed.vectorized_tables WHERE table_oid = %s::oid AND collection_id = %s",
            (oid, target.id),
        )


def vectorized_tables(conn: psycopg.Connection) -> list[VectorizedTable]:
    rows = conn.execute(
        """SELECT v.table_oid::text, v.id_column, v.text_column, c.name
           FROM longembed.vectorized_tables v JOIN longembed.collections c ON c.id = v.collection_id
           WHERE to_regclass(v.table_oid::text) IS NOT NULL ORDER BY 1"""
    ).fetchall()
    return [VectorizedTable(*row) for row in rows]
