"""One collection's hnswlib index, mirrored from its chunk table through the change log.

PostgreSQL is the source of truth. `build` registers this index as a consumer of the table's change log
(migrations/functions/040_vector_changes.sql), then reads every row under one REPEATABLE READ snapshot;
`sync` reads, under a newer snapshot, the keys of the changes the previous snapshot did not see and
applies those rows as they are now (present: insert or replace the vector; gone: delete). The mark is
the snapshot, not the highest seq: a change whose sequence number is below one already read but whose
transaction commits later is still read (see 0006_vector_changes.sql). `save` writes the index, its
labels and its mark under the host's directory (0700), then lets PostgreSQL prune the log below it;
`load` takes it back after a restart and the next `sync` catches up.

Rows: beside the vectors the index holds what a search result needs, so a search (filtered too) answers
without PostgreSQL: per chunk its char span, snippet (computed by PostgreSQL, as search_vector computes
it) and truncated flag; per document (one with chunks) its external id and metadata (jsonb's text).
They are read under the same snapshots as the vectors. The chunk table's log names changed chunks; a
trigger on longembed.documents logs (document_id, DOCUMENT_ORDINAL) when a row's external id, text,
metadata or collection changes without its chunks (a metadata update, a text waiting for the worker).
`sync` then reads every touched document whole (its row and all its chunks' rows), so a document's rows
always come from one snapshot, and applies the documents' changes whole under the lock.

Labels: a chunk (document_id, ordinal) is the hnswlib label document_id * 2**24 + ordinal.
Thread safety: one lock around hnswlib calls and the rows (resize and concurrent writes are not safe in
hnswlib; a search reads labels, vectors and rows under one hold, so they agree).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, KeysView
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psycopg
from psycopg import sql

from longembed.plugin.store.collections import Collection
from longembed.plugin.store.search import SNIPPET_CHARS, SearchResult

if TYPE_CHECKING:
    import hnswlib

log = logging.getLogger(__name__)

ORDINAL_BITS = 24
DOCUMENT_ORDINAL = -1  # the log's key of a document-row change (040_vector_changes.sql)
# Rows applied per hold of the lock, so searches interleave with a long catch-up: hnswlib inserts a
# 384-d vector in ~0.2 ms here, so a hold lasts some 50 ms at most.
APPLY_BATCH = 256
SETTLE_S = 0.05  # poll interval while waiting for transactions older than a registration
SPACES = {"cosine": "cosine", "l2": "l2", "ip": "ip"}
FORMAT = 2  # of the saved files (2: with the rows)

PENDING_SQL = """
SELECT count(*), coalesce(max(seq), 0), coalesce(extract(epoch FROM clock_timestamp() - min(changed_at)), 0)
  FROM longembed.vector_changes
 WHERE source = %(source)s AND xid >= pg_snapshot_xmin(%(mark)s::pg_snapshot)
   AND NOT pg_visible_in_snapshot(xid, %(mark)s::pg_snapshot)
"""
CHANGED_SQL = """
SELECT document_id, ordinal, max(seq) FROM longembed.vector_changes
 WHERE source = %(source)s AND xid >= pg_snapshot_xmin(%(mark)s::pg_snapshot)
   AND NOT pg_visible_in_snapshot(xid, %(mark)s::pg_snapshot)
 GROUP BY document_id, ordinal
"""
# The snippet exactly as longembed.search_vector computes it (015_search.sql).
SNIPPET = sql.SQL("substr(d.text, c.char_start + 1, least(c.char_end - c.char_start, {}))").format(
    sql.Literal(SNIPPET_CHARS)
)

# What a chunk's label holds: (char_start, char_end, snippet, truncated); a document's: (external_id,
# metadata as jsonb's text, parsed per result so callers never share the cached object).
ChunkRow = tuple[int, int, str, bool]
DocumentRow = tuple[str, str]


class Busy(RuntimeError):
    """The index is being written (a sync step holds its lock) and the caller asked not to wait."""


class Rebuild(RuntimeError):
    """The saved index cannot be caught up (no file, another collection, the log pruned past it)."""


def label_of(document_id: int, ordinal: int) -> int:
    if not 0 <= ordinal < 1 << ORDINAL_BITS:
        raise ValueError(f"chunk ordinal {ordinal} does not fit the index's label ({ORDINAL_BITS} bits)")
    return (document_id << ORDINAL_BITS) | ordinal


def key_of(label: int) -> tuple[int, int]:
    return label >> ORDINAL_BITS, label & ((1 << ORDINAL_BITS) - 1)


@dataclass(frozen=True)
class Staleness:
    pending: int  # committed changes not in the index yet
    seq_lag: int  # highest committed seq minus the highest applied (0 when nothing is pending)
    seconds: float  # age of the oldest pending change (0 when nothing is pending)


@dataclass
class _Changes:
    """What one sync read: per touched document, its changed chunk vectors (None: gone), its row (None:
    gone) and all its chunks' rows now."""

    vectors: dict[int, dict[int, np.ndarray | None]]
    documents: dict[int, DocumentRow | None]
    chunks: dict[int, dict[int, ChunkRow]]


class CollectionIndex:
    def __init__(self, collection: Collection, root: Path) -> None:
        self.collection = collection
        self.source = f"chunks_{collection.id}"
        # The collection's id and creation time: a recreated collection (or one of another database
        # with the same id) never picks up this file.
        stamp = hashlib.sha256(f"{collection.id}|{collection.created_at.isoformat()}".encode()).hexdigest()
        self.dir = root / f"c{collection.id}-{stamp[:16]}"
        # One name per host directory: a host that lost its files registers under the same name again.
        self.consumer = f"{socket.gethostname()}:{self.dir}"
        self.lock = threading.Lock()
        self.index: hnswlib.Index | None = None
        self.rows: dict[int, ChunkRow] = {}  # label -> chunk row; its keys are the live labels
        self.documents: dict[int, DocumentRow] = {}  # document id -> row, for documents with chunks
        self.mark: str | None = None  # pg_snapshot (text) the index is complete for
        self.applied_seq = 0
        self.dirty = False
        self.saved_at = 0.0  # time.monotonic() of the last save
        self.loaded = False  # taken from disk (then caught up), not built

    @property
    def live(self) -> KeysView[int]:
        """The labels in the index (a view of the rows' keys: no copy)."""
        return self.rows.keys()

    # -- from PostgreSQL -----------------------------------------------------------------------

    def build(self, conn: psycopg.Connection) -> None:
        """Register as a consumer, then read the whole table under one snapshot and index it."""
        conn.execute("SELECT longembed.register_vector_consumer(%s, %s)", (self.source, self.consumer))
        _settle(conn)
        t0 = time.perf_counter()
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            mark, seq = conn.execute(
                "SELECT pg_current_snapshot()::text, (SELECT coalesce(max(seq), 0) "
                "FROM longembed.vector_changes WHERE source = %s)",
                (self.source,),
            ).fetchone()
            labels, vectors, rows, documents = self._read_all(conn)
        index = self._new_index(max(len(labels), 1024))
        if len(labels):
            index.add_items(vectors, labels)
        with self.lock:
            self.index, self.rows, self.documents = index, rows, documents
            self.mark, self.applied_seq = mark, seq
            self.dirty = True
        log.info(
            "hnsw %s: built %d vectors in %.1fs", self.collection.name, len(labels), time.perf_counter() - t0
        )

    def sync(self, conn: psycopg.Connection) -> int:
        """Apply the changes committed since the mark; returns how many logged keys were applied."""
        assert self.mark is not None
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            mark = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
            keys = conn.execute(CHANGED_SQL, {"source": self.source, "mark": self.mark}).fetchall()
            changes = self._read_changes(conn, keys) if keys else None
        if changes is not None:
            self._apply(changes)
        with self.lock:
            self.mark = mark
            self.applied_seq = max(self.applied_seq, max((s for *_, s in keys), default=0))
            self.dirty = self.dirty or bool(keys)
        return len(keys)

    def _read_all(self, conn: psycopg.Connection) -> tuple:
        """Every chunk (labels, vectors, rows) and the rows of the documents that have chunks."""
        table = sql.Identifier("longembed", self.source)
        with conn.cursor(binary=True) as cur:
            cur.execute(
                sql.SQL(
                    "SELECT c.document_id, c.ordinal, c.embedding, c.char_start, c.char_end, {snippet}, "
                    "c.truncated FROM {table} c JOIN longembed.documents d ON d.id = c.document_id"
                ).format(snippet=SNIPPET, table=table)
            )
            found = cur.fetchall()
            cur.execute(
                sql.SQL(
                    "SELECT d.id, d.external_id, d.metadata::text FROM longembed.documents d "
                    "WHERE d.id IN (SELECT document_id FROM {table})"
                ).format(table=table)
            )
            documents = {d: (ext, meta) for d, ext, meta in cur}
        labels = np.fromiter((label_of(r[0], r[1]) for r in found), dtype=np.uint64, count=len(found))
        empty = np.empty((0, self.collection.dim))
        vectors = np.stack([r[2].to_numpy() for r in found]) if found else empty
        rows = {int(label): r[3:] for label, r in zip(labels, found, strict=True)}
        return labels, vectors.astype(np.float32, copy=False), rows, documents

    def _read_changes(self, conn: psycopg.Connection, keys: list[tuple]) -> _Changes:
        """The logged chunks' vectors and, whole, every document the log touched (in the caller's
        snapshot)."""
        table = sql.Identifier("longembed", self.source)
        touched = sorted({d for d, _, _ in keys})
        chunk_keys = [(d, o) for d, o, _ in keys if o != DOCUMENT_ORDINAL]
        changes = _Changes({d: {} for d in touched}, dict.fromkeys(touched), {d: {} for d in touched})
        with conn.cursor(binary=True) as cur:
            if chunk_keys:
                cur.execute(
                    sql.SQL(
                        """SELECT u.document_id, u.ordinal, c.embedding
                             FROM unnest(%s::bigint[], %s::integer[]) AS u(document_id, ordinal)
                             LEFT JOIN {} c ON c.document_id = u.document_id AND c.ordinal = u.ordinal"""
                    ).format(table),
                    ([d for d, _ in chunk_keys], [o for _, o in chunk_keys]),
                )
                for d, o, v in cur:
                    changes.vectors[d][label_of(d, o)] = None if v is None else v.to_numpy()
            cur.execute(
                "SELECT id, external_id, metadata::text FROM longembed.documents WHERE id = ANY(%s)",
                (touched,),
            )
            for d, ext, meta in cur:
                changes.documents[d] = (ext, meta)
            cur.execute(
                sql.SQL(
                    "SELECT c.document_id, c.ordinal, c.char_start, c.char_end, {snippet}, c.truncated "
                    "FROM {table} c JOIN longembed.documents d ON d.id = c.document_id "
                    "WHERE c.document_id = ANY(%s)"
                ).format(snippet=SNIPPET, table=table),
                (touched,),
            )
            for d, o, *row in cur:
                changes.chunks[d][label_of(d, o)] = tuple(row)
        return changes

    def _apply(self, changes: _Changes) -> None:
        """Apply whole documents, a batch of them per hold of the lock: a search sees each document
        either before or after its change, never half of it."""
        batch: list[int] = []
        size = 0
        for doc in changes.documents:
            batch.append(doc)
            size += len(changes.vectors[doc]) + len(changes.chunks[doc])
            if size >= APPLY_BATCH:
                self._apply_documents(changes, batch)
                batch, size = [], 0
        if batch:
            self._apply_documents(changes, batch)

    def _apply_documents(self, changes: _Changes, docs: list[int]) -> None:
        part = [(label, v) for doc in docs for label, v in changes.vectors[doc].items()]
        with self.lock:
            assert self.index is not None
            index = self.index
            gone = [label for label, v in part if v is None and label in self.rows]
            for label in gone:
                index.mark_deleted(label)
            update = [(label, v) for label, v in part if v is not None and label in self.rows]
            fresh = []
            for label, v in part:
                if v is None or label in self.rows:
                    continue
                try:  # a deleted label still in the graph: bring it back and overwrite it
                    index.unmark_deleted(label)
                    update.append((label, v))
                except RuntimeError:
                    fresh.append((label, v))
            if update:
                index.add_items(np.stack([v for _, v in update]), [label for label, _ in update])
            if fresh:
                needed = index.get_current_count() + len(fresh)
                if needed > index.get_max_elements():
                    index.resize_index(max(needed, 2 * index.get_max_elements()))
                index.add_items(
                    np.stack([v for _, v in fresh]), [label for label, _ in fresh], replace_deleted=True
                )
            # Rows: a chunk of these documents that is gone was logged (so it is in `gone` or was never
            # held); every chunk they have now is in changes.chunks, read under the same snapshot.
            for label in gone:
                del self.rows[label]
            for doc in docs:
                self.rows.update(changes.chunks[doc])
                row = changes.documents[doc]
                if changes.chunks[doc] and row is not None:
                    self.documents[doc] = row
                else:
                    self.documents.pop(doc, None)

    def staleness(self, conn: psycopg.Connection) -> Staleness:
        with self.lock:
            mark, applied = self.mark, self.applied_seq
        if mark is None:
            return Staleness(0, 0, 0.0)
        pending, seq, seconds = conn.execute(PENDING_SQL, {"source": self.source, "mark": mark}).fetchone()
        return Staleness(pending, max(0, seq - applied) if pending else 0, float(seconds))

    def _new_index(self, capacity: int) -> hnswlib.Index:
        c = self.collection
        index = _hnswlib().Index(space=SPACES[c.distance], dim=c.dim)
        index.init_index(
            max_elements=capacity,
            ef_construction=c.hnsw_ef_construction,
            M=c.hnsw_m,
            allow_replace_deleted=True,
        )
        return index

    # -- on disk -------------------------------------------------------------------------------

    def save(self, conn: psycopg.Connection) -> bool:
        """Write the index, its rows and its mark (atomically: a new folder renamed into place), then
        let PostgreSQL prune the log below the mark. False: this consumer was dropped, rebuild."""
        tmp, old = self.dir.with_suffix(".new"), self.dir.with_suffix(".old")
        shutil.rmtree(tmp, ignore_errors=True)
        private_dir(tmp)
        with self.lock:
            assert self.index is not None and self.mark is not None
            self.index.save_index(str(tmp / "index.bin"))
            with open(tmp / "rows.npz", "wb") as f:
                np.savez(f, **_columns(self.rows, self.documents))
            meta = {
                "format": FORMAT,
                "collection_id": self.collection.id,
                "created_at": self.collection.created_at.isoformat(),
                "dim": self.collection.dim,
                "distance": self.collection.distance,
                "mark": self.mark,
                "applied_seq": self.applied_seq,
                "consumer": self.consumer,
                "capacity": self.index.get_max_elements(),
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            self.dirty = False
            mark = self.mark
        for path in tmp.iterdir():
            path.chmod(0o600)
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)
        row = conn.execute(
            "SELECT longembed.advance_vector_consumer(%s, %s, pg_snapshot_xmin(%s::pg_snapshot))",
            (self.source, self.consumer, mark),
        ).fetchone()
        return bool(row[0])

    def load(self, conn: psycopg.Connection) -> None:
        """Take the saved index back; Rebuild when there is none or it cannot be caught up."""
        folder = self.dir if self.dir.exists() else self.dir.with_suffix(".old")  # a save cut short
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise Rebuild(f"no saved index ({exc})") from None
        c = self.collection
        expected = (FORMAT, c.id, c.created_at.isoformat(), c.dim, c.distance, self.consumer)
        found = tuple(
            meta.get(k) for k in ("format", "collection_id", "created_at", "dim", "distance", "consumer")
        )
        if found != expected:
            raise Rebuild(f"the saved index is of something else: {found} != {expected}")
        registered, complete = conn.execute(
            """SELECT EXISTS (SELECT 1 FROM longembed.vector_consumers
                               WHERE source = %(s)s AND consumer = %(c)s),
                      coalesce((SELECT below FROM longembed.vector_pruned WHERE source = %(s)s)
                               <= pg_snapshot_xmin(%(m)s::pg_snapshot), true)""",
            {"s": self.source, "c": self.consumer, "m": meta["mark"]},
        ).fetchone()
        if not registered or not complete:
            raise Rebuild("the change log no longer reaches back to the saved index")
        index = _hnswlib().Index(space=SPACES[c.distance], dim=c.dim)
        index.load_index(str(folder / "index.bin"), max_elements=meta["capacity"], allow_replace_deleted=True)
        try:
            with np.load(folder / "rows.npz", allow_pickle=False) as columns:
                rows, documents = _from_columns(columns)
        except (OSError, ValueError, KeyError) as exc:
            raise Rebuild(f"the saved rows cannot be read ({exc})") from None
        with self.lock:
            self.index, self.rows, self.documents = index, rows, documents
            self.mark, self.applied_seq = meta["mark"], meta["applied_seq"]
            self.dirty, self.loaded = False, True
        log.info("hnsw %s: loaded %d vectors from %s", c.name, len(rows), folder)

    def forget(self, conn: psycopg.Connection | None) -> None:
        """The collection is gone: drop the files and (when the database answers) the registration."""
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.dir.with_suffix(".old"), ignore_errors=True)
        if conn is not None:
            conn.execute("SELECT longembed.drop_vector_consumer(%s, %s)", (self.source, self.consumer))

    # -- queries -------------------------------------------------------------------------------

    def nearest(self, vector: np.ndarray, n: int, ef: int) -> list[int] | None:
        """Labels of up to `n` nearest chunks (ef at least n); None when hnswlib cannot answer."""
        with self.lock:
            found = self._nearest(vector, n, ef)
        return None if found is None else found[0]

    def _nearest(self, vector: np.ndarray, n: int, ef: int) -> tuple[list[int], np.ndarray] | None:
        """(labels, hnswlib's distances), nearest first; the caller holds the lock."""
        assert self.index is not None
        n = min(n, len(self.rows))
        if n == 0:
            return [], np.empty(0, dtype=np.float32)
        self.index.set_ef(max(ef, n))
        try:
            labels, distances = self.index.knn_query(vector, k=n, num_threads=1)
        except RuntimeError:  # fewer than n reachable (a graph thinned by deletes)
            return None
        return labels[0].tolist(), distances[0]

    def search(
        self,
        vector: np.ndarray,
        k: int,
        ef: int,
        max_candidates: int,
        *,
        accept: Callable[[str], bool] | None = None,
        wait: bool = True,
    ) -> list[SearchResult] | None:
        """The k best documents by their best chunk, as longembed.search_vector ranks them
        (015_search.sql: max(4k, 40) candidate chunks, widened 4x while fewer than k documents come
        back), from this index and its rows alone. Scores are search_vector's (cosine similarity, inner
        product, -L2 distance) from hnswlib's exact distances to the candidates (float32 sums, as
        pgvector's); ties go by external id. `accept`: which documents count, by their metadata's text
        (a filter). None when hnswlib cannot answer or more than max_candidates would be needed. Busy
        when `wait` is false and a sync step holds the lock (an event loop then hops to a thread rather
        than stall)."""
        n = max(4 * k, 40)
        verdicts: dict[int, bool] = {}  # document -> accepted, across widenings
        while True:
            if not self.lock.acquire(blocking=wait):
                raise Busy(self.collection.name)
            try:  # labels and rows of one moment
                found = self._nearest(vector, n, ef)
                if found is None:
                    return None
                labels, distances = found
                first: dict[int, int] = {}  # document -> index of its best candidate (nearest first)
                for i, label in enumerate(labels):
                    first.setdefault(key_of(label)[0], i)
                chunks = {i: self.rows[labels[i]] for i in first.values()}
                docs = {d: self.documents[d] for d in first}
            finally:
                self.lock.release()
            best = first
            if accept is not None:
                for doc in first.keys() - verdicts.keys():
                    verdicts[doc] = accept(docs[doc][1])
                best = {doc: i for doc, i in first.items() if verdicts[doc]}
            if len(best) >= k or len(labels) < n:
                break
            if n >= max_candidates:
                return None
            n = min(4 * n, max_candidates)
        scores = _scores(self.collection.distance, distances)
        ranked = sorted(best.items(), key=lambda item: (-scores[item[1]], docs[item[0]][0]))[:k]
        results = []
        for doc, i in ranked:
            external_id, metadata = docs[doc]
            start, end, snippet, truncated = chunks[i]
            ordinal = key_of(labels[i])[1]
            meta = json.loads(metadata)
            score = float(scores[i])
            results.append(SearchResult(external_id, score, ordinal, start, end, snippet, meta, truncated))
        return results

    def vectors(self) -> dict[int, np.ndarray]:
        """Every live label with its stored vector (tests compare this with the table)."""
        with self.lock:
            assert self.index is not None
            labels = sorted(self.rows)
            data = self.index.get_items(labels, return_type="numpy") if labels else []
        return dict(zip(labels, data, strict=True))

    def held_rows(self) -> tuple[dict[int, ChunkRow], dict[int, DocumentRow]]:
        """Copies of the rows held (tests compare them with the tables)."""
        with self.lock:
            return dict(self.rows), dict(self.documents)


def _scores(distance: str, distances: np.ndarray) -> np.ndarray:
    """search_vector's scores (015_search.sql) from hnswlib's distances: its cosine space is 1 - the dot
    product of the normalised vectors, its ip space 1 - the dot product, its l2 space the squared
    distance. In float64 from there; pgvector clamps a cosine similarity to [-1, 1]."""
    d = distances.astype(np.float64)
    if distance == "l2":
        return -np.sqrt(np.maximum(d, 0.0))
    if distance == "ip":
        return 1.0 - d
    return np.clip(1.0 - d, -1.0, 1.0)


def _settle(conn: psycopg.Connection) -> None:
    """Wait until every transaction running when this consumer registered has ended. One that wrote a
    tracked table before the registration committed logged nothing; the build's snapshot, taken after
    this, sees it instead. (The registration's SHARE lock covers the chunk table's writers; this covers
    longembed.documents' too, whose trigger logs document-row changes.) Not covered: a REPEATABLE READ or
    SERIALIZABLE writer whose snapshot predates the registration but which first writes after it (its
    trigger looks for consumers in that old snapshot); longembed's own writers run in READ COMMITTED."""
    snapshot = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
    while conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_snapshot_xip(%s::pg_snapshot) x "
        "WHERE pg_xact_status(x) = 'in progress')",
        (snapshot,),
    ).fetchone()[0]:
        time.sleep(SETTLE_S)


def _columns(rows: dict[int, ChunkRow], documents: dict[int, DocumentRow]) -> dict[str, np.ndarray]:
    """The rows as plain arrays (np.savez without pickle): numbers as they are, strings as one UTF-8
    blob with end offsets."""
    chunks = list(rows.items())
    docs = list(documents.items())
    return {
        "labels": np.fromiter((label for label, _ in chunks), dtype=np.uint64, count=len(chunks)),
        "char_start": np.fromiter((r[0] for _, r in chunks), dtype=np.int64, count=len(chunks)),
        "char_end": np.fromiter((r[1] for _, r in chunks), dtype=np.int64, count=len(chunks)),
        "truncated": np.fromiter((r[3] for _, r in chunks), dtype=np.bool_, count=len(chunks)),
        **_strings("snippet", [r[2] for _, r in chunks]),
        "documents": np.fromiter((d for d, _ in docs), dtype=np.int64, count=len(docs)),
        **_strings("external_id", [r[0] for _, r in docs]),
        **_strings("metadata", [r[1] for _, r in docs]),
    }


def _strings(name: str, values: list[str]) -> dict[str, np.ndarray]:
    encoded = [v.encode() for v in values]
    ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
    return {f"{name}_blob": np.frombuffer(b"".join(encoded), dtype=np.uint8), f"{name}_ends": ends}


def _unstrings(columns, name: str) -> list[str]:
    blob = columns[f"{name}_blob"].tobytes()
    ends = columns[f"{name}_ends"].tolist()
    return [blob[a:b].decode() for a, b in zip([0, *ends], ends, strict=False)]


def _from_columns(columns) -> tuple[dict[int, ChunkRow], dict[int, DocumentRow]]:
    labels = columns["labels"].tolist()
    rows = dict(
        zip(
            labels,
            zip(
                columns["char_start"].tolist(),
                columns["char_end"].tolist(),
                _unstrings(columns, "snippet"),
                columns["truncated"].tolist(),
                strict=True,
            ),
            strict=True,
        )
    )
    documents = dict(
        zip(
            columns["documents"].tolist(),
            zip(_unstrings(columns, "external_id"), _unstrings(columns, "metadata"), strict=True),
            strict=True,
        )
    )
    return rows, documents


def _hnswlib():
    """hnswlib, an optional dependency: the host imports this module whether or not it uses --hnsw."""
    try:
        import hnswlib
    except ImportError:
        raise RuntimeError("the hnsw fast path needs hnswlib: pip install 'longembed[fast]'") from None
    return hnswlib


def private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
