"""The model host's hnswlib fast path: in-process indexes of the collections named with `serve --hnsw NAME`,
kept in sync with PostgreSQL by one background thread, and used by /v1/search.

The thread builds (or loads from disk and catches up) each index, then applies the change log whenever a
NOTIFY wakes it and at least every POLL_S seconds (NOTIFY is only a wake-up: the log is what counts), and
saves each changed index every SAVE_EVERY_S seconds and at stop. Until an index has been built or caught
up once, its collection's searches go to SQL (pgvector), as do hybrid searches. Every step also reads the
collection's row: `collection(name)` hands out that copy, so /v1/search needs no database for a
collection the fast path answers (a dropped or recreated collection is seen within POLL_S).

An unfiltered search is answered from memory alone (CollectionIndex.search: hnswlib's candidates, the
best chunk per document, search_vector's scores from hnswlib's distances, and the rows the index holds
beside its vectors). A filtered search asks hnswlib for candidates (as SQL does: max(4k,
40) chunks), then reads them with their documents' metadata checked in PostgreSQL (jsonb @>) and their
distances computed there; when too few documents pass, the candidates widen 4x at a time up to
MAX_CANDIDATES chunks, then the search goes to SQL, whose iterative index scan suits selective filters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from longembed.plugin.db import connect
from longembed.plugin.service.ann import CollectionIndex, Rebuild, Staleness, key_of, private_dir
from longembed.plugin.store.collections import Collection, get_collection
from longembed.plugin.store.search import (
    SNIPPET_CHARS,
    SearchResult,
    check_arguments,
    resolve_options,
    search_by_vector,
)

log = logging.getLogger(__name__)

CHANNEL = "longembed_vector_changes"  # 040_vector_changes.sql
POLL_S = 1.0
SAVE_EVERY_S = 30.0
RETRY_S = 5.0
DEFAULT_EF = 40  # pgvector's default hnsw.ef_search: the same recall/speed point unless asked otherwise
MAX_CANDIDATES = 4096
HNSWLIB, PGVECTOR = "hnswlib", "pgvector"  # which index answered (/v1/search's "index")


class FastPath:
    def __init__(self, dsn: str, names: tuple[str, ...], directory: Path) -> None:
        self.dsn = dsn
        self.names = names
        self.root = Path(directory)
        self._indexes: dict[str, CollectionIndex] = {}
        self._ready: set[str] = set()
        self._collections: dict[str, Collection] = {}  # as read at the last sync step
        self._lock = threading.Lock()  # guards _indexes, _ready and _collections
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._operators: dict[str, sql.Composable] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        private_dir(self.root)
        self._thread = threading.Thread(target=self._run, name="longembed-hnsw", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        try:
            with connect(self.dsn, application_name="longembed host hnsw") as conn:
                for index in self._all():
                    if index.dirty and index.mark is not None:
                        index.save(conn)
        except (psycopg.Error, OSError) as exc:
            log.warning("hnsw: saving at stop failed (%s); the next start catches up from the last save", exc)

    def wait_ready(self, name: str, timeout: float) -> None:
        """Block until `name`'s index answers searches (tests, benchmarks); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while not self.is_ready(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the hnsw index of {name!r} was not ready within {timeout:g}s")
            time.sleep(0.05)

    def is_ready(self, name: str) -> bool:
        with self._lock:
            return name in self._ready

    def collection(self, name: str) -> Collection | None:
        """The collection `name` as the last sync step read it, where its index answers searches; None
        otherwise (then ask the database)."""
        with self._lock:
            return self._collections.get(name) if name in self._ready else None

    def index(self, name: str) -> CollectionIndex | None:
        with self._lock:
            return self._indexes.get(name)

    def _all(self) -> list[CollectionIndex]:
        with self._lock:
            return list(self._indexes.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with (
                    connect(self.dsn, application_name="longembed host hnsw") as conn,
                    psycopg.connect(
                        self.dsn, autocommit=True, application_name="longembed host hnsw listen"
                    ) as listen,
                ):
                    listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    while not self._stop.is_set():
                        for name in self.names:
                            self._step(conn, name)
                        for _ in listen.notifies(timeout=POLL_S, stop_after=1):
                            pass
            except Exception as exc:
                log.warning("hnsw sync stopped (%s: %s); retrying in %gs", type(exc).__name__, exc, RETRY_S)
                self._stop.wait(RETRY_S)

    def _step(self, conn: psycopg.Connection, name: str) -> None:
        collection = get_collection(conn, name, missing_ok=True)
        with self._lock:
            if collection is None:
                self._collections.pop(name, None)
            else:
                self._collections[name] = collection
        current = self.index(name)
        if current is not None and (
            collection is None
            or (collection.id, collection.created_at)
            != (current.collection.id, current.collection.created_at)
        ):
            self._set(name, None, ready=False)
            current.forget(conn)
            current = None
        if collection is None:
            return
        if current is None:
            fresh = CollectionIndex(collection, self.root)
            try:
                fresh.load(conn)
            except Rebuild as exc:
                log.info("hnsw %s: building from PostgreSQL (%s)", name, exc)
                fresh.build(conn)
            current = fresh
            self._set(name, current, ready=False)
        current.sync(conn)
        self._set(name, current, ready=True)
        if current.dirty and time.monotonic() - current.saved_at > SAVE_EVERY_S:
            current.saved_at = time.monotonic()
            if not current.save(conn):  # dropped as silent meanwhile: start over
                log.warning("hnsw %s: the change log forgot this index; rebuilding", name)
                self._set(name, None, ready=False)

    def _set(self, name: str, index: CollectionIndex | None, *, ready: bool) -> None:
        with self._lock:
            if index is None:
                self._indexes.pop(name, None)
            else:
                self._indexes[name] = index
            (self._ready.add if ready else self._ready.discard)(name)

    # -- search --------------------------------------------------------------------------------

    def search(
        self,
        conn: psycopg.Connection | None,
        collection: Collection,
        vector: np.ndarray,
        k: int,
        *,
        filter: Mapping[str, Any] | None = None,
        ef_search: int | None = None,
        wait: bool = True,
    ) -> list[SearchResult] | None:
        """The SQL search's answer through hnswlib; None when the index cannot give it (not ready,
        another collection of the same name, a filter too selective, or a filter and no `conn`): then
        ask SQL. Without a filter no database is asked. `wait` false: Busy rather than wait for a sync
        step to let go of the index."""
        index = self.index(collection.name) if self.is_ready(collection.name) else None
        if index is None or index.collection.id != collection.id:
            return None
        query = np.asarray(vector, dtype=np.float32)
        if filter is None:
            return index.search(query, k, ef_search or DEFAULT_EF, MAX_CANDIDATES, wait=wait)
        if conn is None:
            return None
        n = max(4 * k, 40)
        while True:
            labels = index.nearest(query, n, ef_search or DEFAULT_EF)
            if labels is None:
                return None
            rows = self._fetch(conn, collection, labels, vector, filter)
            if len({row[0] for row in rows}) >= k or len(labels) < n:
                return self._ranked(collection, rows, k)
            if n >= MAX_CANDIDATES:
                return None
            n = min(4 * n, MAX_CANDIDATES)

    @staticmethod
    def _ranked(collection: Collection, rows: list[tuple], k: int) -> list[SearchResult]:
        best: dict[str, tuple] = {}
        for row in rows:  # the best chunk of each document, by PostgreSQL's distance
            if row[0] not in best or row[1] < best[row[0]][1]:
                best[row[0]] = row
        ranked = sorted(best.values(), key=lambda r: (r[1], r[0]))[:k]
        return [SearchResult(r[0], _score(collection.distance, r[1]), *r[2:]) for r in ranked]

    def _fetch(
        self,
        conn: psycopg.Connection,
        collection: Collection,
        labels: list[int],
        vector: np.ndarray,
        filter: Mapping[str, Any],
    ) -> list[tuple]:
        keys = [key_of(label) for label in labels]
        query = sql.SQL(
            """SELECT d.external_id, c.embedding {op} %(q)s AS distance, c.ordinal, c.char_start, c.char_end,
                      substr(d.text, c.char_start + 1, least(c.char_end - c.char_start, {snippet})),
                      d.metadata, c.truncated
                 FROM unnest(%(docs)s::bigint[], %(ords)s::integer[]) AS u(document_id, ordinal)
                 JOIN {table} c ON c.document_id = u.document_id AND c.ordinal = u.ordinal
                 JOIN longembed.documents d ON d.id = c.document_id
                WHERE d.metadata @> %(filter)s::jsonb"""
        ).format(op=self._operator(conn, collection), snippet=SNIPPET_CHARS, table=collection.chunk_table)
        params = {
            "q": vector,
            "docs": [d for d, _ in keys],
            "ords": [o for _, o in keys],
            "filter": Jsonb(dict(filter)),
        }
        # Prepared: a fixed plan of key lookups, planned once per connection and collection.
        return conn.execute(query, params, prepare=True).fetchall()

    def _operator(self, conn: psycopg.Connection, collection: Collection) -> sql.Composable:
        """pgvector's distance operator, schema-qualified (a caller's search_path may not hold it)."""
        schema = self._operators.get("schema")
        if schema is None:
            row = conn.execute(
                "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                "WHERE e.extname = 'vector'"
            ).fetchone()
            schema = self._operators["schema"] = sql.Identifier(row[0])
        return sql.SQL("OPERATOR({}.{})").format(schema, collection.operator)

    # -- staleness -----------------------------------------------------------------------------

    def staleness(self) -> Iterator[tuple[str, bool, int, Staleness]]:
        """(collection, ready, vectors, staleness) per index, read from the database now."""
        indexes = self._all()
        if not indexes:
            return
        with connect(self.dsn, application_name="longembed host metrics") as conn:
            for index in indexes:
                yield (
                    index.collection.name,
                    self.is_ready(index.collection.name),
                    len(index.live),
                    index.staleness(conn),
                )


def search_vector(
    fast: FastPath | None,
    conn: psycopg.Connection,
    collection: Collection,
    vector: np.ndarray,
    k: int,
    *,
    filter: Mapping[str, Any] | None = None,
    ef_search: int | None = None,
    text: str | None = None,
    mode: str | None = None,
    weights: Mapping[str, float] | None = None,
    fusion: str | None = None,
    rrf_k: int | None = None,
) -> tuple[list[SearchResult], str]:
    """/v1/search's search: the fast path where it answers, else SQL; returns (rows, which index).

    hnswlib mirrors the chunk table, so it answers only the searches that are the best chunk alone with
    its raw score (mode "chunks", or "auto" where the collection chose that); any other mode or fusion
    is SQL's, so HTTP, SQL and Python rank alike."""
    check_arguments(k, ef_search, filter)
    if fast is not None and mirrored(collection, mode, weights, fusion, rrf_k):
        results = fast.search(conn, collection, vector, k, filter=filter, ef_search=ef_search)
        if results is not None:
            return results, HNSWLIB
    rows = search_by_vector(
        conn,
        collection,
        vector,
        k,
        filter=filter,
        ef_search=ef_search,
        text=text,
        mode=mode,
        weights=weights,
        fusion=fusion,
        rrf_k=rrf_k,
    )
    return rows, PGVECTOR


def mirrored(
    collection: Collection,
    mode: str | None,
    weights: Mapping[str, float] | None = None,
    fusion: str | None = None,
    rrf_k: int | None = None,
) -> bool:
    """Whether a search with these options is what hnswlib mirrors: the best chunk alone with its raw
    score (mode "chunks", or "auto" where the collection chose that). ValueError for bad options."""
    options = resolve_options(collection, mode, weights, fusion, rrf_k)
    return options["fusion"] == "raw" and dict(options["weights"]) == {"chunks": 1.0}


def _score(distance: str, value: float) -> float:
    # As search_vector (015_search.sql): cosine similarity, inner product, -L2 distance.
    return 1 - value if distance == "cosine" else -value
