"""The ingestion queue: claim with a lease, write results, retry with backoff, park after the last try.

Lease, not one long transaction. pgai's worker claims, embeds and writes inside one transaction, so a
crash rolls everything back. Our documents run up to 8192 tokens and a batch can keep a GPU (or a CPU)
busy for seconds to minutes; a transaction open that long holds row locks and an old snapshot that
stops VACUUM on the busiest tables. So claiming is its own short transaction that stamps the rows with
`leased_until` and a random `lease_token`; the write is another short transaction that only touches
rows still carrying that token. A crashed worker's rows come back when the lease runs out; a worker
that outlived its lease (or whose document was re-queued with new text meanwhile, which clears the
token) finds its token gone and drops its stale result. Attempts count at claim time, so a document
that kills its worker every time is parked after `max_attempts` instead of looping forever.

A worker claims about one token budget's worth (sized in text bytes, then cut to what fits once
tokenised; the rest is released at once, uncharged), and renews its lease while it embeds (`renew`,
a heartbeat): a crash strands only the batch being embedded, and a slow batch is not taken over.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import psycopg
from psycopg import sql

from longembed.plugin.store.collections import Collection

log = logging.getLogger(__name__)

# upsert_document notifies this channel (payload: the collection id) for every document it queues;
# PostgreSQL delivers it when that transaction commits, once per channel and payload.
CHANNEL = "longembed_queue"
STOP_CHECK_S = 0.1  # how often a waiting Wakeup looks at its stop event


@dataclass(frozen=True)
class ClaimedItem:
    document_id: int
    collection_id: int
    external_id: str
    text: str
    attempts: int  # including this claim
    last_error: str | None


class ChunkRow(Protocol):
    """One chunk to store (encoder.Chunk has these fields)."""

    ordinal: int
    start: int
    end: int
    n_tokens: int
    vector: np.ndarray
    truncated: bool  # the text was cut at the model's window (full mode)


@dataclass(frozen=True)
class Embedded:
    """What the worker writes for one document: its chunks and its document vector."""

    chunks: Sequence[ChunkRow]
    vector: np.ndarray  # the document vector (collection.document_vector: head or mean of chunks)
    n_tokens: int  # tokens it stands for
    truncated: bool  # the head did not hold the whole text


def new_token() -> uuid.UUID:
    return uuid.uuid4()


def claim(
    conn: psycopg.Connection,
    token: uuid.UUID,
    collection_ids: Sequence[int],
    *,
    limit: int,
    lease_seconds: float,
    max_bytes: int | None = None,
) -> list[ClaimedItem]:
    """Lease ready items of the given collections (oldest first) in one short transaction: up to `limit`
    of them, and with `max_bytes` only as many as fit in that many bytes of text (at least one).

    The byte budget is how a worker claims about what fits its token budget before tokenising: every
    item claimed but not embedded is stranded for the lease time if the worker dies.
    """
    if not collection_ids or limit < 1:
        return []
    with conn.transaction():
        rows = conn.execute(
            """WITH ready AS (
                   SELECT q.document_id, q.next_attempt_at FROM longembed.queue q
                   WHERE q.collection_id = ANY(%(collections)s)
                     AND q.next_attempt_at <= now()
                     AND (q.leased_until IS NULL OR q.leased_until < now())
                   ORDER BY q.next_attempt_at, q.document_id
                   LIMIT %(limit)s
                   FOR UPDATE SKIP LOCKED),
               sized AS (
                   -- octet_length reads the stored size, not the (possibly compressed) text itself.
                   SELECT r.document_id, sum(octet_length(d.text)) OVER (
                              ORDER BY r.next_attempt_at, r.document_id) - octet_length(d.text) AS before
                   FROM ready r JOIN longembed.documents d ON d.id = r.document_id),
               picked AS (
                   SELECT document_id FROM sized
                   WHERE %(max_bytes)s::bigint IS NULL OR before < %(max_bytes)s::bigint)
               UPDATE longembed.queue q
               SET leased_until = now() + make_interval(secs => %(lease)s), lease_token = %(token)s,
                   attempts = q.attempts + 1
               FROM picked, longembed.documents d
               WHERE q.document_id = picked.document_id AND d.id = q.document_id
               RETURNING q.document_id, q.collection_id, d.external_id, d.text, q.attempts, q.last_error""",
            {
                "collections": list(collection_ids),
                "limit": limit,
                "lease": lease_seconds,
                "token": token,
                "max_bytes": max_bytes,
            },
        ).fetchall()
    items = [ClaimedItem(*row) for row in rows]
    items.sort(key=lambda item: item.document_id)
    return items


def renew(
    conn: psycopg.Connection, token: uuid.UUID, document_ids: Iterable[int], lease_seconds: float
) -> int:
    """Extend the lease of items still carrying `token` (a worker's heartbeat). Returns how many."""
    ids = list(document_ids)
    if not ids:
        return 0
    cur = conn.execute(
        """UPDATE longembed.queue SET leased_until = now() + make_interval(secs => %s)
           WHERE document_id = ANY(%s) AND lease_token = %s""",
        (lease_seconds, ids, token),
    )
    return cur.rowcount


def release(conn: psycopg.Connection, token: uuid.UUID, document_ids: Iterable[int]) -> None:
    """Give claimed-but-unprocessed items back at once, without counting the attempt."""
    ids = list(document_ids)
    if ids:
        conn.execute(
            """UPDATE longembed.queue SET leased_until = NULL, lease_token = NULL, attempts = attempts - 1
               WHERE document_id = ANY(%s) AND lease_token = %s""",
            (ids, token),
        )


def write_results(
    conn: psycopg.Connection,
    token: uuid.UUID,
    collection: Collection,
    model_revision: str,
    results: dict[int, Embedded],
) -> list[int]:
    """Replace the chunks and document vectors of documents whose lease we still hold, in one
    transaction: search never sees one without the other.

    Returns the document ids written; the others lost their lease (re-queued, or taken over after
    the lease ran out) and their results are dropped.
    """
    ids = sorted(results)
    if not ids:
        return []
    with conn.transaction(), conn.cursor() as cur:
        # Documents first, then queue rows: the same lock order as longembed.upsert_document.
        cur.execute("SELECT id FROM longembed.documents WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,))
        attempts = dict(
            cur.execute(
                """DELETE FROM longembed.queue WHERE document_id = ANY(%s) AND lease_token = %s
                   RETURNING document_id, attempts""",
                (ids, token),
            ).fetchall()
        )
        owned = sorted(attempts)
        if not owned:
            return []
        for table in (collection.chunk_table, collection.document_table):
            cur.execute(sql.SQL("DELETE FROM {} WHERE document_id = ANY(%s)").format(table), (owned,))
        copy_sql = sql.SQL(
            "COPY {} (document_id, ordinal, char_start, char_end, n_tokens, truncated, embedding) "
            "FROM STDIN (FORMAT BINARY)"
        ).format(collection.chunk_table)
        with cur.copy(copy_sql) as copy:
            copy.set_types(["int8", "int4", "int4", "int4", "int4", "bool", "vector"])
            for doc_id in owned:
                for c in results[doc_id].chunks:
                    copy.write_row((doc_id, c.ordinal, c.start, c.end, c.n_tokens, c.truncated, c.vector))
        copy_sql = sql.SQL(
            "COPY {} (document_id, n_tokens, truncated, embedding) FROM STDIN (FORMAT BINARY)"
        ).format(collection.document_table)
        with cur.copy(copy_sql) as copy:
            copy.set_types(["int8", "int4", "bool", "vector"])
            for doc_id in owned:
                done = results[doc_id]
                copy.write_row((doc_id, done.n_tokens, done.truncated, done.vector))
        cur.execute(
            """UPDATE longembed.documents d SET status = 'embedded', error = NULL, model_revision = %s,
                   attempts = a.attempts, embed_count = d.embed_count + 1, embedded_at = now()
               FROM unnest(%s::bigint[], %s::int[]) AS a(id, attempts)
               WHERE d.id = a.id""",
            (model_revision, owned, [attempts[i] for i in owned]),
        )
    return owned


def record_failures(
    conn: psycopg.Connection,
    token: uuid.UUID,
    errors: dict[int, str],
    *,
    max_attempts: int,
    backoff_base: float,
    backoff_cap: float,
) -> tuple[list[int], list[int]]:
    """Schedule a retry (exponential backoff) or park each failed item. Returns (retrying, parked)."""
    ids = sorted(errors)
    if not ids:
        return [], []
    messages = [errors[i][:2000] for i in ids]
    with conn.transaction():
        parked = [
            row[0]
            for row in conn.execute(
                """WITH failed AS (
                       DELETE FROM longembed.queue q
                       USING unnest(%s::bigint[], %s::text[]) AS f(id, message)
                       WHERE q.document_id = f.id AND q.lease_token = %s AND q.attempts >= %s
                       RETURNING q.document_id, q.attempts, f.message)
                   UPDATE longembed.documents d
                   SET status = 'failed', error = failed.message, attempts = failed.attempts
                   FROM failed WHERE d.id = failed.document_id
                   RETURNING d.id""",
                (ids, messages, token, max_attempts),
            ).fetchall()
        ]
        retrying = [
            row[0]
            for row in conn.execute(
                """UPDATE longembed.queue q
                   SET leased_until = NULL, lease_token = NULL, last_error = f.message,
                       next_attempt_at = now() + make_interval(
                           secs => least(%s, %s * power(2, q.attempts - 1)))
                   FROM unnest(%s::bigint[], %s::text[]) AS f(id, message)
                   WHERE q.document_id = f.id AND q.lease_token = %s
                   RETURNING q.document_id""",
                (backoff_cap, backoff_base, ids, messages, token),
            ).fetchall()
        ]
    return retrying, parked


class Wakeup:
    """An idle worker's wait that ends as soon as documents are queued: LISTEN on CHANNEL on a
    connection of its own, so embedding starts at once instead of at the next poll (up to a second
    later for a document added through SQL or `longembed ingest` with the worker in another process).
    The poll stays the longest wait: a retry whose back-off has ended is announced by nobody. Where the
    connection cannot be made or breaks (a pooler that does not keep sessions also never delivers a
    notification), it is a plain wait."""

    def __init__(self, dsn: str) -> None:
        self._conn: psycopg.Connection | None = None
        try:
            self._conn = psycopg.connect(dsn, autocommit=True, application_name="longembed worker wake-up")
            self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        except psycopg.Error as exc:
            log.warning("not woken by queued documents, polling only (%s)", str(exc).strip())
            self.close()

    def wait(self, stop: threading.Event, timeout: float) -> None:
        """Until a notification, `stop` (looked at every STOP_CHECK_S) or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if self._conn is None:
                stop.wait(left)
                return
            try:
                for _ in self._conn.notifies(timeout=min(left, STOP_CHECK_S), stop_after=1):
                    return
            except psycopg.Error as exc:
                log.warning("the wake-up connection failed, polling only (%s)", str(exc).strip())
                self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Wakeup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
