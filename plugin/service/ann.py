"""One collection's hnswlib index, mirrored from its chunk table through the change log.

PostgreSQL is the source of truth. `build` registers this index as a consumer of the table's change log
(migrations/functions/040_vector_changes.sql), then reads every row under one REPEATABLE READ snapshot;
`sync` reads, under a newer snapshot, the keys of the changes the previous snapshot did not see and
applies those rows as they are now (present: insert or replace the vector; gone: delete). The mark is
the snapshot, not the highest seq: a change whose sequence number is below one already read but whose
transaction commits later is still read (see 0006_vector_changes.sql). `save` writes the index, its
labels and its mark under the host's directory (0700), then lets PostgreSQL prune the log below it;
`load` takes it back after a restart and the next `sync` catches up.

Labels: a chunk (document_id, ordinal) is the hnswlib label document_id * 2**24 + ordinal.
Thread safety: one lock around hnswlib calls (resize and concurrent writes are not safe in hnswlib).
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psycopg
from psycopg import sql

from longembed.plugin.store.collections import Collection

if TYPE_CHECKING:
    import hnswlib

log = logging.getLogger(__name__)

ORDINAL_BITS = 24
APPLY_BATCH = 2048  # rows applied per hold of the lock, so searches interleave with a long catch-up
SPACES = {"cosine": "cosine", "l2": "l2", "ip": "ip"}
FORMAT = 1  # of the saved files

PENDING_SQL = """
SELECT count(*), coalesce(max(seq), 0), coalesce(extract(epoch FROM clock_timestamp() - min(changed_at)), 0)
  FROM longembed.vector_changes
 WHERE source = %(source)s AND xid >= pg_snapshot_xmin(%(mark)s::pg_snapshot)
   AND NOT pg_visible_in_snapshot(xid, %(mark)s::pg_snapshot)
"""


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
        self.live: set[int] = set()
        self.mark: str | None = None  # pg_snapshot (text) the index is complete for
        self.applied_seq = 0
        self.dirty = False
        self.saved_at = 0.0  # time.monotonic() of the last save
        self.loaded = False  # taken from disk (then caught up), not built

    # -- from PostgreSQL -----------------------------------------------------------------------

    def build(self, conn: psycopg.Connection) -> None:
        """Register as a consumer, then read the whole table under one snapshot and index it."""
        conn.execute("SELECT longembed.register_vector_consumer(%s, %s)", (self.source, self.consumer))
        t0 = time.perf_counter()
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            mark, seq = conn.execute(
                "SELECT pg_current_snapshot()::text, (SELECT coalesce(max(seq), 0) "
                "FROM longembed.vector_changes WHERE source = %s)",
                (self.source,),
            ).fetchone()
            labels, vectors = self._read(conn, None)
        index = self._new_index(max(len(labels), 1024))
        if len(labels):
            index.add_items(vectors, labels)
        with self.lock:
            self.index, self.live, self.mark, self.applied_seq = index, set(labels.tolist()), mark, seq
            self.dirty = True
        log.info(
            "hnsw %s: built %d vectors in %.1fs", self.collection.name, len(labels), time.perf_counter() - t0
        )

    def sync(self, conn: psycopg.Connection) -> int:
        """Apply the changes committed since the mark; returns how many rows were applied."""
        assert self.mark is not None
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            mark = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
            labels, vectors, seq = self._read(conn, self.mark)
        if len(labels) or seq:
            self._apply(labels, vectors)
        with self.lock:
            self.mark = mark
            self.applied_seq = max(self.applied_seq, seq)
            self.dirty = self.dirty or len(labels) > 0
        return len(labels)

    def _read(self, conn: psycopg.Connection, mark: str | None) -> tuple:
        """Rows of the table: all (mark None: labels, vectors), or the changed keys since `mark`
        (labels, vectors with None for a deleted row, highest seq read)."""
        table = sql.Identifier("longembed", self.source)
        with conn.cursor(binary=True) as cur:
            if mark is None:
                cur.execute(sql.SQL("SELECT document_id, ordinal, embedding FROM {}").format(table))
                rows = cur.fetchall()
                labels = np.fromiter((label_of(d, o) for d, o, _ in rows), dtype=np.uint64, count=len(rows))
                empty = np.empty((0, self.collection.dim))
                vectors = np.stack([v.to_numpy() for _, _, v in rows]) if rows else empty
                return labels, vectors.astype(np.float32, copy=False)
            cur.execute(
                sql.SQL(
                    """SELECT ch.document_id, ch.ordinal, c.embedding, ch.seq
                         FROM (SELECT document_id, ordinal, max(seq) AS seq FROM longembed.vector_changes
                                WHERE source = %(source)s
                                  AND xid >= pg_snapshot_xmin(%(mark)s::pg_snapshot)
                                  AND NOT pg_visible_in_snapshot(xid, %(mark)s::pg_snapshot)
                                GROUP BY document_id, ordinal) ch
                         LEFT JOIN {} c ON c.document_id = ch.document_id AND c.ordinal = ch.ordinal"""
                ).format(table),
                {"source": self.source, "mark": mark},
            )
            rows = cur.fetchall()
        labels = [label_of(d, o) for d, o, _, _ in rows]
        vectors = [None if v is None else v.to_numpy() for _, _, v, _ in rows]
        return labels, vectors, max((s for *_, s in rows), default=0)

    def _apply(self, labels: list[int], vectors: list) -> None:
        for start in range(0, len(labels), APPLY_BATCH):
            part = list(
                zip(labels[start : start + APPLY_BATCH], vectors[start : start + APPLY_BATCH], strict=True)
            )
            with self.lock:
                assert self.index is not None
                index = self.index
                gone = [label for label, v in part if v is None and label in self.live]
                for label in gone:
                    index.mark_deleted(label)
                self.live.difference_update(gone)
                update = [(label, v) for label, v in part if v is not None and label in self.live]
                fresh = []
                for label, v in part:
                    if v is None or label in self.live:
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
                self.live.update(label for label, _ in update + fresh)

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
        """Write the index and its mark (atomically: a new folder renamed into place), then let
        PostgreSQL prune the log below the mark. False: this consumer was dropped, rebuild."""
        tmp, old = self.dir.with_suffix(".new"), self.dir.with_suffix(".old")
        shutil.rmtree(tmp, ignore_errors=True)
        private_dir(tmp)
        with self.lock:
            assert self.index is not None and self.mark is not None
            self.index.save_index(str(tmp / "index.bin"))
            np.save(tmp / "labels.npy", np.fromiter(self.live, dtype=np.uint64, count=len(self.live)))
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
        live = set(np.load(folder / "labels.npy").tolist())
        with self.lock:
            self.index, self.live = index, live
            self.mark, self.applied_seq = meta["mark"], meta["applied_seq"]
            self.dirty, self.loaded = False, True
        log.info("hnsw %s: loaded %d vectors from %s", c.name, len(live), folder)

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
            assert self.index is not None
            n = min(n, len(self.live))
            if n == 0:
                return []
            self.index.set_ef(max(ef, n))
            try:
                labels, _ = self.index.knn_query(vector, k=n, num_threads=1)
            except RuntimeError:  # fewer than n reachable (a graph thinned by deletes)
                return None
        return labels[0].tolist()

    def vectors(self) -> dict[int, np.ndarray]:
        """Every live label with its stored vector (tests compare this with the table)."""
        with self.lock:
            assert self.index is not None
            labels = sorted(self.live)
            data = self.index.get_items(labels, return_type="numpy") if labels else []
        return dict(zip(labels, data, strict=True))


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
