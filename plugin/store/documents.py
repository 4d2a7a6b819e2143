"""Documents: upsert by external id (content-hash aware), delete, inspect.

The upsert itself is the SQL function longembed.upsert_document (migrations/functions/010_documents.sql),
shared with the triggers of vectorized tables: same text and vectors from the collection's model revision
-> nothing to do; changed text -> re-queued (the worker replaces the chunks); metadata is always replaced.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from longembed.plugin.store.collections import Collection, get_collection

# ~250k tokens: a document bigger than this is almost certainly not one document (a log dump, a
# concatenated corpus) and would hold the worker for minutes; refuse it instead.
MAX_DOCUMENT_CHARS = 1_000_000
MAX_EXTERNAL_ID_CHARS = 1024


class InvalidDocument(ValueError):
    """A document that cannot be stored; nothing of the call it came with was written."""


@dataclass(frozen=True)
class Document:
    external_id: str
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class AddResult:
    """Counts per outcome of longembed.upsert_document: inserted / updated / requeued / unchanged."""

    counts: Counter[str] = field(default_factory=Counter)

    @property
    def queued(self) -> int:
        return self.counts["inserted"] + self.counts["updated"] + self.counts["requeued"]

    @property
    def unchanged(self) -> int:
        return self.counts["unchanged"]


def validate_document(doc: Document) -> None:
    """Raise InvalidDocument with the document's id and the reason."""
    ident = doc.external_id
    if not isinstance(ident, str) or not ident.strip():
        raise InvalidDocument(f"document id must be a non-empty string, got {ident!r}")
    if len(ident) > MAX_EXTERNAL_ID_CHARS or "\x00" in ident:
        raise InvalidDocument(f"document id {ident[:40]!r}: longer than {MAX_EXTERNAL_ID_CHARS} or has NUL")
    if not isinstance(doc.text, str):
        raise InvalidDocument(f"document {ident!r}: text must be a str, got {type(doc.text).__name__}")
    if not doc.text.strip():
        raise InvalidDocument(f"document {ident!r}: text is empty")
    if "\x00" in doc.text:
        # PostgreSQL text cannot hold NUL; stripping it silently would change the content hash meaning.
        raise InvalidDocument(f"document {ident!r}: text contains NUL bytes (binary data?)")
    try:
        doc.text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDocument(f"document {ident!r}: text is not valid Unicode ({exc.reason})") from None
    if len(doc.text) > MAX_DOCUMENT_CHARS:
        raise InvalidDocument(
            f"document {ident!r}: {len(doc.text):,} characters, more than the limit of {MAX_DOCUMENT_CHARS:,}"
        )
    if not isinstance(doc.metadata, Mapping):
        raise InvalidDocument(f"document {ident!r}: metadata must be a JSON object")
    try:
        json.dumps(doc.metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidDocument(f"document {ident!r}: metadata is not JSON-serialisable: {exc}") from exc
    if "\\u0000" in json.dumps(doc.metadata):
        raise InvalidDocument(f"document {ident!r}: metadata contains NUL characters")


def add_documents(
    conn: psycopg.Connection, collection: str | Collection, docs: Iterable[Document]
) -> AddResult:
    """Upsert documents into a collection and queue those needing vectors, in one transaction.

    All documents are validated first: one bad document raises InvalidDocument and writes nothing.
    Duplicate ids within one call: the last one wins.
    """
    target = collection if isinstance(collection, Collection) else get_collection(conn, collection)
    batch = list(docs)
    for doc in batch:
        validate_document(doc)
    latest = {doc.external_id: doc for doc in batch}
    result = AddResult()
    if not latest:
        return result
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "SELECT longembed.upsert_document(%s, %s, %s, %s)",
            [(target.id, d.external_id, d.text, Jsonb(dict(d.metadata))) for d in latest.values()],
            returning=True,
        )
        while True:
            result.counts[cur.fetchone()[0]] += 1
            if not cur.nextset():
                break
    return result


def delete_documents(
    conn: psycopg.Connection, collection: str | Collection, external_ids: Iterable[str]
) -> int:
    """Delete documents (their chunks and queue items go with them). Returns how many existed."""
    target = collection if isinstance(collection, Collection) else get_collection(conn, collection)
    ids = list(external_ids)
    with conn.transaction():
        cur = conn.execute(
            "DELETE FROM longembed.documents WHERE collection_id = %s AND external_id = ANY(%s)",
            (target.id, ids),
        )
    return cur.rowcount


@dataclass(frozen=True)
class DocumentState:
    external_id: str
    status: str
    error: str | None
    attempts: int
    embed_count: int
    model_revision: str | None
    n_chunks: int


def document_states(conn: psycopg.Connection, collection: str | Collection) -> dict[str, DocumentState]:
    """external_id -> status, error and chunk count of every document in the collection."""
    target = collection if isinstance(collection, Collection) else get_collection(conn, collection)
    rows = conn.execute(
        sql.SQL(
            """SELECT d.external_id, d.status, d.error, d.attempts, d.embed_count, d.model_revision,
                      (SELECT count(*) FROM {chunks} c WHERE c.document_id = d.id)
               FROM longembed.documents d WHERE d.collection_id = %s"""
        ).format(chunks=target.chunk_table),
        (target.id,),
    ).fetchall()
    return {row[0]: DocumentState(*row) for row in rows}
