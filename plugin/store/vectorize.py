"""Auto-embedding of a column of the user's own table (pgai-vectorizer style).

The work is SQL, so SQL users get the same thing: `SELECT longembed.vectorize_table('app.tickets', 'id',
'body', 'tickets')` (migrations/functions/010_documents.sql). Row triggers on the user's table call
longembed.vectorize_trigger, which upserts the row's text as a document of the collection (external id =
the row's id) and so feeds the same queue the worker drains; deleting a row, blanking its text or
TRUNCATE removes the documents. Triggers run with the privileges of whoever writes the table (SECURITY
INVOKER): such roles need INSERT/UPDATE/DELETE on longembed.documents and longembed.queue. A SECURITY
DEFINER trigger would let anyone able to create a table write into every collection.
"""

from __future__ import annotations

import psycopg

from longembed.plugin.store.collections import Collection, get_collection

# What the SQL functions raise for a bad table or column argument.
_BAD_ARGUMENT = (
    psycopg.errors.UndefinedColumn,
    psycopg.errors.WrongObjectType,
    psycopg.errors.InvalidParameterValue,
    psycopg.errors.SyntaxError,
)


def _collection_name(conn: psycopg.Connection, collection: str | Collection) -> str:
    return collection.name if isinstance(collection, Collection) else get_collection(conn, collection).name


def vectorize_table(
    conn: psycopg.Connection,
    table: str,
    id_column: str,
    text_column: str,
    collection: str | Collection,
    *,
    backfill: bool = True,
) -> int:
    """Keep `collection` in sync with `table` ("name" or "schema.name" in SQL identifier syntax): one
    document per row, id from `id_column`. Existing rows are queued at once when `backfill`.

    Returns how many rows were queued; ValueError for a missing table or column.
    """
    name = _collection_name(conn, collection)
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT longembed.vectorize_table(%s::regclass, %s, %s, %s, %s)",
                (table, id_column, text_column, name, backfill),
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        raise ValueError(f"no table named {table!r}") from None
    except psycopg.errors.InvalidName:
        raise ValueError(f"invalid table name {table!r}") from None
    except _BAD_ARGUMENT as exc:
        raise ValueError(exc.diag.message_primary or str(exc)) from None
    return row[0]


def unvectorize_table(conn: psycopg.Connection, table: str, collection: str | Collection) -> None:
    """Remove the triggers; the documents already in the collection stay."""
    name = _collection_name(conn, collection)
    try:
        with conn.transaction():
            conn.execute("SELECT longembed.unvectorize_table(%s::regclass, %s)", (table, name))
    except psycopg.errors.UndefinedTable:
        raise ValueError(f"no table named {table!r}") from None
    except psycopg.errors.InvalidName:
        raise ValueError(f"invalid table name {table!r}") from None
    except _BAD_ARGUMENT as exc:
        raise ValueError(exc.diag.message_primary or str(exc)) from None
