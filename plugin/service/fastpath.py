"""The model host's hnswlib fast path: in-process indexes of the collections named with `serve --hnsw NAME`,
kept in sync with PostgreSQL by one background thread, and used by /v1/search.

The thread builds (or loads from disk and catches up) each index, then applies the change log whenever a
NOTIFY wakes it and at least every POLL_S seconds (NOTIFY is only a wake-up: the log is what counts), and
saves each changed index every SAVE_EVERY_S seconds and at stop. Until an index has been built or caught
up once, its collection's searches go to SQL (pgvector), as do hybrid searches. Every step also reads the
collection's row: `collection(name)` hands out that copy, so /v1/search needs no database for a
collection the fast path answers (a dropped or recreated collection is seen within POLL_S).

A search is answered from memory alone (CollectionIndex.search: hnswlib's candidates, as SQL takes
them max(4k, 40) chunks, the best chunk per document, search_vector's scores from hnswlib's distances,
and the rows the index holds beside its vectors). A filter is checked there too, as PostgreSQL's jsonb
@> decides it (jsonb.py); when too few documents pass, the candidates widen 4x at a time up to
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

from longembed.plugin.db import connect
from longembed.plugin.service import jsonb
from longembed.plugin.service.ann import CollectionIndex, Rebuild, Staleness, private_dir
from longembed.plugin.store.collections import Collection, get_collection
from longembed.plugin.store.search import SearchResult, check_arguments, resolve_options, search_by_vector

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
        collection: Collection,
        vector: np.ndarray,
        k: int,
        *,
        filter: Mapping[str, Any] | None = None,
        ef_search: int | None = None,
        wait: bool = True,
    ) -> list[SearchResult] | None:
        """The SQL search's answer through hnswlib and the rows held beside it, no database asked; None
        when the index cannot give it (not ready, another collection of the same name, a filter too
        selective or not plain JSON): then ask SQL. `wait` false: Busy rather than wait for a sync step
        to let go of the index."""
        index = self.index(collection.name) if self.is_ready(collection.name) else None
        if index is None or index.collection.id != collection.id:
            return None
        accept = None
        if filter is not None:
            try:
                wanted = jsonb.pattern(filter)
            except jsonb.Unsupported:  # SQL's answer, or its error
                return None

            def accept(metadata: str) -> bool:
                return jsonb.contains(jsonb.parse(metadata), wanted)

        query = np.asarray(vector, dtype=np.float32)
        return index.search(query, k, ef_search or DEFAULT_EF, MAX_CANDIDATES, accept=accept, wait=wait)

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
        results = fast.search(collection, vector, k, filter=filter, ef_search=ef_search)
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
