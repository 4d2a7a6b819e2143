"""The embedding worker: claim a token-budget batch, embed it, write it in one transaction, repeat.

Any number of workers (threads, processes, machines) can share one queue; see plugin/queue.py for the
lease protocol that makes that safe and lets a crashed worker's items come back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import psycopg

from longembed.plugin.pipeline import queue
from longembed.plugin.store import calibrate
from longembed.plugin.store.collections import Collection, get_collection, list_collections

log = logging.getLogger(__name__)
INITIAL_BYTES_PER_TOKEN = 4.0  # English text in BERT WordPiece; learnt per worker from what it claims


class EmbeddingModel(Protocol):
    """The part of encoder's model the worker uses."""

    info: Any  # encoder.ModelInfo: name, revision, dim, ...

    def embed_documents(self, texts: Sequence[str], **kwargs: Any) -> list[Any]: ...  # DocumentVectors

    def embed_chunks(self, texts: Sequence[str], **kwargs: Any) -> list[list[queue.ChunkRow]]: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


@dataclass(frozen=True)
class WorkerConfig:
    batch_tokens: int = 16384  # tokens per claimed batch (one write transaction)
    max_docs: int = 256  # documents per claim at most
    lease_seconds: float = 600.0  # a batch must be written within this, or others may take it over
    max_attempts: int = 5
    backoff_base: float = 2.0  # seconds before the first retry; doubles per attempt
    backoff_cap: float = 300.0
    poll_interval: float = 1.0  # idle sleep when the queue is empty

    def __post_init__(self) -> None:
        if self.batch_tokens < 1 or self.max_docs < 1 or self.max_attempts < 1:
            raise ValueError("batch_tokens, max_docs and max_attempts must be positive")
        if self.lease_seconds <= 0 or self.backoff_base < 0 or self.backoff_cap < 0:
            raise ValueError("lease_seconds must be positive, backoff times non-negative")


@dataclass
class WorkerStats:
    batches: int = 0
    embedded: int = 0  # documents written
    retrying: int = 0  # failures scheduled for another try
    parked: int = 0  # failures after the last try
    dropped: int = 0  # results discarded: lease lost (document re-queued or taken over)
    truncated: int = 0  # documents written whose text was cut at the model's window (full mode)
    tokens: int = 0
    embed_seconds: float = 0.0
    db_seconds: float = 0.0

    def add(self, other: WorkerStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def incompatibility(collection: Collection, info: Any) -> str | None:
    """Why a model with ModelInfo `info` must not embed `collection`, or None when it may."""
    # A Matryoshka model also gives the shorter sizes it was trained for (profiles.truncate_dim).
    if collection.dim != info.dim and collection.dim not in info.matryoshka_dims:
        return (
            f"dimension mismatch: collection {collection.name!r} stores {collection.dim}-d vectors "
            f"({collection.model_name}), the loaded model {info.name} gives {info.dim}-d vectors"
        )
    if collection.model_name != info.name:
        return f"collection {collection.name!r} was built with model {collection.model_name}, not {info.name}"
    if collection.model_revision != info.revision:
        return (
            f"collection {collection.name!r} was built with revision {collection.model_revision} of "
            f"{info.name}; the loaded weights are revision {info.revision}"
        )
    return None


class Heartbeat:
    """Renews the lease of the items being embedded, every third of the lease, from a thread: a batch
    that takes longer than the lease is not taken over (and its work wasted) while its worker lives.

    The worker's connection is idle while it embeds (psycopg serialises use across threads anyway).
    """

    def __init__(self, conn: psycopg.Connection, token: Any, document_ids: list[int], lease_seconds: float):
        self.conn, self.token, self.ids, self.lease_seconds = conn, token, document_ids, lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="longembed lease heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        if self.ids:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                with self.conn.transaction():
                    queue.renew(self.conn, self.token, self.ids, self.lease_seconds)
            except psycopg.Error as exc:  # the write will find out too; the lease then simply runs out
                log.warning("could not renew the lease of %d documents: %s", len(self.ids), exc)
                return


class Worker:
    """Embeds queued documents of the collections `model` can serve (all of them, or those named)."""

    def __init__(
        self,
        conn: psycopg.Connection,
        model: EmbeddingModel,
        config: WorkerConfig | None = None,
        collections: Sequence[str] | None = None,
    ) -> None:
        self.conn = conn
        self.model = model
        self.config = config or WorkerConfig()
        self.names = list(collections) if collections else None
        self.token = queue.new_token()
        # Text bytes per token, learnt from what was claimed: claims are sized in bytes (the database
        # cannot count tokens) so that about one token budget's worth is leased at a time.
        self._bytes_per_token = INITIAL_BYTES_PER_TOKEN
        self._warned: set[str] = set()
        self._written: set[int] = set()  # collections written to since auto's choice was last checked
        if self.names:
            for name in self.names:  # fail now, clearly, rather than idle forever
                reason = incompatibility(get_collection(conn, name), model.info)
                if reason:
                    raise ValueError(reason)

    def _collections(self) -> dict[int, Collection]:
        candidates = (
            [get_collection(self.conn, name) for name in self.names]
            if self.names
            else list_collections(self.conn)
        )
        usable = {}
        for collection in candidates:
            reason = incompatibility(collection, self.model.info)
            if reason is None:
                usable[collection.id] = collection
            elif collection.name not in self._warned:
                self._warned.add(collection.name)
                log.warning("skipping collection %s: %s", collection.name, reason)
        return usable

    def run_once(self) -> WorkerStats:
        """Claim, embed and write one batch. `stats.batches == 0` means nothing was ready."""
        stats = WorkerStats()
        cfg = self.config
        t0 = time.perf_counter()
        collections = self._collections()
        self.token = queue.new_token()  # one per claim: results are written only under it
        items = queue.claim(
            self.conn,
            self.token,
            list(collections),
            limit=cfg.max_docs,
            lease_seconds=cfg.lease_seconds,
            max_bytes=max(1, int(cfg.batch_tokens * self._bytes_per_token)),
        )
        stats.db_seconds += time.perf_counter() - t0
        if not items:
            self.recalibrate(collections)
            return stats
        stats.batches = 1
        errors: dict[int, str] = {}
        for item in items:
            if item.attempts > cfg.max_attempts:  # leases ran out every time: crashed or too slow
                errors[item.document_id] = (
                    f"no result after {item.attempts - 1} leases of {cfg.lease_seconds:g}s (worker crashed "
                    f"or too slow); last error: {item.last_error}"
                )
        items = [item for item in items if item.document_id not in errors]

        t0 = time.perf_counter()
        n_tokens = self.model.count_tokens([item.text for item in items]) if items else []
        keep, budget = 0, 0
        while keep < len(items) and (keep == 0 or budget + n_tokens[keep] <= cfg.batch_tokens):
            budget += n_tokens[keep]
            keep += 1
        if items:
            observed = sum(len(item.text.encode()) for item in items) / max(1, sum(n_tokens))
            self._bytes_per_token = max(0.5, (self._bytes_per_token + observed) / 2)
        # What does not fit goes back now, in its own statement and without an attempt: it must not
        # wait for this batch (nor share the fate of its write), nor be stranded if this worker dies.
        with self.conn.transaction():
            queue.release(self.conn, self.token, [item.document_id for item in items[keep:]])
        items = items[:keep]
        stats.tokens = budget
        results: dict[int, queue.Embedded] = {}
        by_collection: dict[int, list[queue.ClaimedItem]] = {}
        for item in items:
            by_collection.setdefault(item.collection_id, []).append(item)
        with Heartbeat(self.conn, self.token, [item.document_id for item in items], cfg.lease_seconds):
            for collection_id, group in by_collection.items():
                self._embed_group(collections[collection_id], group, results, errors)
        stats.embed_seconds += time.perf_counter() - t0

        t0 = time.perf_counter()
        try:
            written, retrying, parked = self._write(collections, by_collection, results, errors)
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
            # Rolled back; count it as a failed attempt of every item so they come back after a backoff.
            log.warning("write of a batch failed (%s); retrying later", exc)
            written = []
            errors = {item.document_id: f"write failed: {exc}" for item in items} | errors
            retrying, parked = self._record_failures(errors)
        stats.embedded = len(written)
        if written:
            self._written.update(by_collection)
        stats.truncated = sum(any(c.truncated for c in results[doc_id].chunks) for doc_id in written)
        stats.dropped = len(results) - len(written)
        stats.retrying, stats.parked = len(retrying), len(parked)
        stats.db_seconds += time.perf_counter() - t0
        for doc_id in parked:
            log.warning("parked document %s after %d attempts: %s", doc_id, cfg.max_attempts, errors[doc_id])
        return stats

    def _write(
        self,
        collections: dict[int, Collection],
        by_collection: dict[int, list[queue.ClaimedItem]],
        results: dict[int, queue.Embedded],
        errors: dict[int, str],
    ) -> tuple[list[int], list[int], list[int]]:
        """One transaction: write results, record failures."""
        written: list[int] = []
        with self.conn.transaction():
            for collection_id, group in by_collection.items():
                done = {i.document_id: results[i.document_id] for i in group if i.document_id in results}
                written += queue.write_results(
                    self.conn, self.token, collections[collection_id], self.model.info.revision, done
                )
            retrying, parked = self._record_failures(errors)
        return written, retrying, parked

    def recalibrate(self, collections: dict[int, Collection] | None = None) -> None:
        """Choose `auto`'s fusion again for the collections this worker wrote to that changed enough
        (store/calibrate.py), with this worker's model; run_once does it when the queue is drained."""
        collections = self._collections() if collections is None else collections
        for collection_id in sorted(self._written & set(collections)):
            collection = collections[collection_id]
            try:
                if calibrate.due(self.conn, collection):
                    chosen = calibrate.calibrate(self.conn, collection, *embedders(self.model, collection))
                    log.info("collection %s: search mode auto chose %s", collection.name, chosen["weights"])
            except Exception as exc:  # searches go on with the previous choice; ingestion goes on
                log.warning("could not calibrate search mode auto of %s: %s", collection.name, exc)
        self._written.clear()

    def _record_failures(self, errors: dict[int, str]) -> tuple[list[int], list[int]]:
        cfg = self.config
        return queue.record_failures(
            self.conn,
            self.token,
            errors,
            max_attempts=cfg.max_attempts,
            backoff_base=cfg.backoff_base,
            backoff_cap=cfg.backoff_cap,
        )

    def _embed_group(
        self,
        collection: Collection,
        group: list[queue.ClaimedItem],
        results: dict[int, queue.Embedded],
        errors: dict[int, str],
    ) -> None:
        try:
            chunks = self._embed(collection, [item.text for item in group])
            results.update({item.document_id: c for item, c in zip(group, chunks, strict=True)})
            return
        except Exception as exc:
            if len(group) == 1:
                errors[group[0].document_id] = f"{type(exc).__name__}: {exc}"
                return
            log.warning("batch of %d failed (%s); embedding one by one", len(group), exc)
        for item in group:  # find which documents fail, so one bad document does not sink the others
            try:
                results[item.document_id] = self._embed(collection, [item.text])[0]
            except Exception as exc:
                errors[item.document_id] = f"{type(exc).__name__}: {exc}"

    def _embed(self, collection: Collection, texts: list[str]) -> list[queue.Embedded]:
        # Chunks and head vectors in one encoder run; a chunk that is the head is not embedded twice.
        documents = self.model.embed_documents(
            texts,
            mode=collection.mode,
            chunk_tokens=collection.chunk_tokens,
            overlap=collection.overlap,
            kind="document",
            instruction=collection.document_prefix,
            batch_tokens=self.config.batch_tokens,
            # Only when truncating: a model of the collection's own size needs no `dimensions`.
            **({"dimensions": collection.dim} if collection.dim != self.model.info.dim else {}),
        )
        out = []
        for doc in documents:
            if not doc.chunks:
                raise ValueError("the encoder returned no chunk for a document")
            for vector in [doc.head, *(chunk.vector for chunk in doc.chunks)]:
                if vector.shape != (collection.dim,):
                    raise ValueError(
                        f"encoder gave a {vector.shape} vector for {collection.dim}-d {collection.name}"
                    )
            if collection.document_vector == "mean":
                n_tokens = sum(chunk.n_tokens for chunk in doc.chunks)
                out.append(queue.Embedded(doc.chunks, mean_of_chunks(doc.chunks), n_tokens, False))
            else:
                out.append(queue.Embedded(doc.chunks, doc.head, doc.head_tokens, doc.head_truncated))
        return out

    def drain(self, stop: threading.Event | None = None, total: WorkerStats | None = None) -> WorkerStats:
        """Process batches until nothing is ready (items leased by others or backing off: not waited for).

        Counts go into `total` as batches finish (so a caller keeps them if the connection breaks).
        """
        total = WorkerStats() if total is None else total
        while stop is None or not stop.is_set():
            stats = self.run_once()
            if stats.batches == 0:
                break
            total.add(stats)
        return total

    def run(
        self, stop: threading.Event, total: WorkerStats | None = None, wakeup: queue.Wakeup | None = None
    ) -> WorkerStats:
        """Process batches until `stop` is set; the batch in progress is finished and written first.
        Idle, it waits for `wakeup` (documents queued) or the poll interval."""
        total = WorkerStats() if total is None else total
        while not stop.is_set():
            stats = self.run_once()
            total.add(stats)
            if stats.batches == 0:
                _idle(stop, self.config.poll_interval, wakeup)
        return total


def _idle(stop: threading.Event, poll: float, wakeup: queue.Wakeup | None) -> None:
    if wakeup is None:
        stop.wait(poll)
    else:
        wakeup.wait(stop, poll)


def embedders(model: Any, collection: Collection) -> tuple[calibrate.Embed, calibrate.Embed]:
    """(queries, document heads) -> vectors for `collection` with `model` (EmbeddingModel or the host's
    BatchedModel): its prefixes and size, as searches and the worker embed them."""
    sized = {"dimensions": collection.dim} if collection.dim != model.info.dim else {}

    def embed(kind: str, instruction: str | None) -> calibrate.Embed:
        def run(texts: Sequence[str]) -> np.ndarray:
            if not texts:
                return np.zeros((0, collection.dim), dtype=np.float32)
            docs = model.embed_chunks(list(texts), mode="full", kind=kind, instruction=instruction, **sized)
            return np.stack([doc[0].vector for doc in docs])

        return run

    return embed("query", collection.query_prefix), embed("document", collection.document_prefix)


def mean_of_chunks(chunks: Sequence[queue.ChunkRow]) -> np.ndarray:
    """The chunk vectors' mean weighted by their tokens, L2-normalised: a document vector that sees all
    of a long text (of late chunks: windows that each saw their whole block)."""
    weights = np.array([max(chunk.n_tokens, 1) for chunk in chunks], dtype=np.float32)
    mean = (np.stack([chunk.vector for chunk in chunks]) * weights[:, None]).sum(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def ready_work(conn: psycopg.Connection, names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Model source -> names of its collections with queue items claimable now (busiest model first)."""
    rows = conn.execute(
        """SELECT c.model_source, array_agg(DISTINCT c.name ORDER BY c.name), count(*)
             FROM longembed.queue q JOIN longembed.collections c ON c.id = q.collection_id
            WHERE q.next_attempt_at <= now() AND (q.leased_until IS NULL OR q.leased_until < now())
              AND (%(names)s::text[] IS NULL OR c.name = ANY(%(names)s::text[]))
            GROUP BY c.model_source ORDER BY count(*) DESC, c.model_source""",
        {"names": list(names) if names else None},
    ).fetchall()
    return {source: list(collections) for source, collections, _ in rows}


class EveryModel:
    """A worker for every collection, whatever its model: each round, the models of the collections with
    ready work are loaded (at most `max_models` held at once; the least recently used goes) and drained
    in turn. A model that fails to load is logged and retried after `retry_seconds`; its collections
    wait, the others go on."""

    def __init__(
        self,
        conn: psycopg.Connection | None,
        load: Callable[[str], EmbeddingModel],
        config_for: Callable[[EmbeddingModel], WorkerConfig],
        names: Sequence[str] | None = None,
        max_models: int = 2,
        retry_seconds: float = 60.0,
        unload: Callable[[str], None] | None = None,
    ) -> None:
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.conn = conn
        self.load = load
        self.config_for = config_for
        self.names = list(names) if names else None
        self.max_models = max_models
        self.retry_seconds = retry_seconds
        self.unload = unload  # where `load` caches its models, this lets an evicted one go
        self.loaded: OrderedDict[str, EmbeddingModel] = OrderedDict()
        self._broken: dict[str, float] = {}  # source -> when loading it failed

    def _model(self, source: str) -> EmbeddingModel | None:
        if source in self.loaded:
            self.loaded.move_to_end(source)
            return self.loaded[source]
        failed_at = self._broken.get(source)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_seconds:
            return None
        while len(self.loaded) >= self.max_models:
            evicted, _ = self.loaded.popitem(last=False)
            if self.unload is not None:
                self.unload(evicted)
            log.info("unloading %s (at most %d models at once)", evicted, self.max_models)
        try:
            model = self.load(source)
        except Exception as exc:  # a deleted folder, a broken checkpoint: the other models go on
            self._broken[source] = time.monotonic()
            log.error("cannot load model %s (retrying in %.0f s): %s", source, self.retry_seconds, exc)
            return None
        self._broken.pop(source, None)
        self.loaded[source] = model
        return model

    def drain(self, stop: threading.Event | None = None, total: WorkerStats | None = None) -> WorkerStats:
        """Rounds over the models with ready work until none has any (or only unloadable ones)."""
        total = WorkerStats() if total is None else total
        while stop is None or not stop.is_set():
            progressed = False
            for source, collections in ready_work(self.conn, self.names).items():
                model = self._model(source)
                if model is None:
                    continue
                before = total.batches
                try:
                    worker = Worker(self.conn, model, self.config_for(model), collections)
                except ValueError as exc:  # e.g. the weights' revision changed: never embed into it
                    log.warning("%s", exc)
                    continue
                worker.drain(stop, total)
                progressed |= total.batches > before
            if not progressed:
                break
        return total

    def run(
        self,
        stop: threading.Event,
        total: WorkerStats | None = None,
        wakeup: queue.Wakeup | None = None,
        poll: float = 1.0,
    ) -> WorkerStats:
        total = WorkerStats() if total is None else total
        while not stop.is_set():
            self.drain(stop, total)
            _idle(stop, poll, wakeup)
        return total
