"""The model host's state and lifecycle: served models and their batchers, metrics, the database,
the in-process ingestion workers.

Models load in a background thread at `start`, so /health answers at once and /ready says when the
host can embed. A request may name a model that was not given at start: it is loaded on demand only
when a collection in the database uses it (the host never loads arbitrary names for strangers).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from longembed.plugin.db import connect
from longembed.plugin.service.batcher import INTERACTIVE, Batcher
from longembed.plugin.service.errors import ApiError
from longembed.plugin.service.fastpath import FastPath
from longembed.plugin.service.metrics import IndexStaleness, IngestionBacklog, Metrics, QueueDepth
from longembed.plugin.service.served import BatchedModel, ServedModel

log = logging.getLogger(__name__)

DB_TIMEOUT_S = 3  # connect timeout of the host's own short database calls
IDLE_CONNECTIONS = 8  # search connections kept open between requests
WORKER_RETRY_S = 5.0  # pause before reconnecting after the worker's connection broke


@dataclass(frozen=True)
class HostConfig:
    models: tuple[str | None, ...] = (None,)  # None: the bundled all-MiniLM-L6-v2
    dsn: str | None = None
    worker: bool = True  # run the ingestion worker in-process (needs dsn)
    batch_tokens: int | None = None  # per forward pass; default by device (encoder.DEFAULT_BATCH_TOKENS)
    max_wait: float = 0.002  # seconds the batcher waits for more requests when several are queued
    max_queued_tokens: int = 262_144  # interactive tokens waiting before 429
    max_inputs: int = 2048  # inputs per request
    max_input_chars: int = 1_000_000  # characters per input
    max_body_bytes: int = 16 * 1024 * 1024
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    hnsw: tuple[str, ...] = ()  # collections searched through an in-process hnswlib index (fastpath.py)
    hnsw_dir: str | None = None  # where those indexes are saved (needed with hnsw)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("serve at least one model")
        if min(self.max_inputs, self.max_input_chars, self.max_body_bytes, self.max_queued_tokens) < 1:
            raise ValueError("limits must be positive")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError("batch_tokens must be positive")
        if not 0 <= self.max_wait <= 1:
            raise ValueError(f"the batching window must be 0 to 1000 ms, got {self.max_wait * 1000:g} ms")
        if self.hnsw and not (self.dsn and self.hnsw_dir):
            raise ValueError("an hnsw index needs the database (dsn) and a directory to keep it in")
        if self.hnsw and importlib.util.find_spec("hnswlib") is None:
            raise ValueError("the hnsw fast path needs hnswlib: pip install 'longembed[fast]'")


class Host:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.metrics.add_collector(QueueDepth(self._depths))
        if config.dsn:
            self.metrics.add_collector(IngestionBacklog(self.connect))
        self.fastpath: FastPath | None = None
        if config.hnsw:
            self.fastpath = FastPath(config.dsn, config.hnsw, Path(config.hnsw_dir))
            self.metrics.add_collector(IndexStaleness(self.fastpath.staleness))
        self._models: list[ServedModel] = []  # the first is the default
        self._lock = threading.Lock()  # guards _models
        self._load_lock = threading.Lock()  # one model load at a time
        self._loaded = threading.Event()
        self._load_error: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._idle: queue.LifoQueue[psycopg.Connection] = queue.LifoQueue(maxsize=IDLE_CONNECTIONS)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, wait: bool = False) -> None:
        """Load the models in the background (or now, with `wait`), then start the workers."""
        thread = threading.Thread(target=self._load_all, name="longembed-load", daemon=True)
        thread.start()
        if self.fastpath is not None:
            self.fastpath.start()
        if wait:
            thread.join()
            if self._load_error:
                raise RuntimeError(self._load_error)

    def _load_all(self) -> None:
        try:
            for name in self.config.models:
                self._add(name)
        except Exception as exc:
            log.exception("loading the models failed")
            self._load_error = f"loading the models failed: {type(exc).__name__}: {exc}"
        finally:
            self._loaded.set()

    def wait_loaded(self, timeout: float) -> None:
        """Block until the models given at start are loaded; raises on a load error or timeout."""
        if not self._loaded.wait(timeout):
            raise TimeoutError(f"the models did not load within {timeout:g}s")
        if self._load_error:
            raise RuntimeError(self._load_error)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        with self._lock:
            models = list(self._models)
        for served in models:
            served.batcher.stop()
        while not self._idle.empty():
            self._idle.get_nowait().close()
        if self.fastpath is not None:
            self.fastpath.stop()

    # -- models --------------------------------------------------------------------------------

    def models(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models)

    def model(self, name: str | None) -> ServedModel:
        """The served model answering to `name` (None: the default); loads a collection's model on demand."""
        if not self._loaded.is_set():
            raise ApiError(503, "the model host is still loading its models", retry_after=2)
        if self._load_error:
            raise ApiError(503, self._load_error)
        found = self._find(name)
        if found is not None:
            return found
        if not self.config.dsn or not self._collection_uses(name):
            raise ApiError(
                404,
                f"model {name!r} is not served here; served: {', '.join(m.info.name for m in self.models())}",
                param="model",
                code="model_not_found",
            )
        with self._load_lock:
            found = self._find(name)
            if found is None:
                try:
                    found = self._add(name)
                except Exception as exc:
                    log.exception("loading model %s failed", name)
                    raise ApiError(503, f"model {name!r} could not be loaded: {exc}") from None
        return found

    def is_served(self, name: str | None) -> bool:
        """Whether `model(name)` answers without loading anything or asking the database."""
        return self._loaded.is_set() and not self._load_error and self._find(name) is not None

    def _find(self, name: str | None) -> ServedModel | None:
        with self._lock:
            if name is None:
                return self._models[0] if self._models else None
            return next((m for m in self._models if name in m.aliases), None)

    def _add(self, name: str | None) -> ServedModel:
        from longembed.plugin.models import get_model  # imports torch

        model = get_model(name)
        info = model.info
        batcher = Batcher(
            model.forward_batch,
            info.dim,
            batch_tokens=self.config.batch_tokens or _default_budget(model),
            max_wait=self.config.max_wait,
            max_queued_tokens=self.config.max_queued_tokens,
            on_batch=self.metrics.on_batch(info.name),
            name=f"longembed-batcher {info.name}",
            forward_alone=functools.partial(model.forward_batch, spare_cores=True),
        )
        served = ServedModel(model, batcher, [name] if name else [])
        _warm_up(served)
        with self._lock:
            self._models.append(served)
        log.info("serving %s (%d-d, %d tokens, %s)", info.name, info.dim, info.max_tokens, info.device)
        if self.config.dsn and self.config.worker:
            self._start_worker(served)
        return served

    def _collection_uses(self, name: str) -> bool:
        try:
            with self.connect() as conn:
                if not conn.execute("SELECT to_regclass('longembed.collections') IS NOT NULL").fetchone()[0]:
                    return False  # not migrated yet: no collection uses anything
                # model_source: what get_model loads from anywhere (model_name is only for display).
                row = conn.execute("SELECT 1 FROM longembed.collections WHERE model_source = %s", (name,))
                return row.fetchone() is not None
        except psycopg.Error as exc:
            raise ApiError(503, f"the database did not answer: {exc}", retry_after=5) from None

    def _depths(self) -> Iterator[tuple[str, int, int]]:
        for served in self.models():
            yield (served.info.name, *served.batcher.queue_depth())

    # -- database ------------------------------------------------------------------------------

    def connect(self, application_name: str = "longembed host") -> psycopg.Connection:
        assert self.config.dsn is not None
        return psycopg.connect(
            self.config.dsn,
            autocommit=True,
            connect_timeout=DB_TIMEOUT_S,
            application_name=application_name,
        )

    @contextlib.contextmanager
    def database(self) -> Iterator[psycopg.Connection]:
        """A connection for a request (search), pgvector's types registered, reused by later requests;
        one that broke is dropped. ApiError 503 when the database does not answer."""
        if not self.config.dsn:
            raise ApiError(503, "this host has no database: start it with --dsn (or LONGEMBED_DSN)")
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            try:
                conn = connect(self.config.dsn, application_name="longembed host search")
            except psycopg.Error as exc:
                raise ApiError(503, f"the database did not answer: {exc}", retry_after=5) from None
        try:
            yield conn
        finally:
            idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            if conn.broken or conn.closed or not idle:
                conn.close()
            else:
                try:
                    self._idle.put_nowait(conn)
                except queue.Full:
                    conn.close()

    def ready(self) -> str | None:
        """None when the host can embed (models loaded, database answering), else the reason."""
        if not self._loaded.is_set():
            return "loading models"
        if self._load_error:
            return self._load_error
        if self.config.dsn:
            try:
                with self.connect() as conn:
                    conn.execute("SELECT 1")
            except psycopg.Error as exc:
                return f"database unreachable: {str(exc).strip()}"
        return None

    # -- ingestion -----------------------------------------------------------------------------

    def _start_worker(self, served: ServedModel) -> None:
        thread = threading.Thread(
            target=self._work, args=(served,), name=f"longembed-worker {served.info.name}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self, served: ServedModel) -> None:
        """Run a Worker over the batcher at ingestion priority until stop; reconnect when the database
        goes away (the queue's leases bring back whatever a broken batch held)."""
        from longembed.plugin.pipeline.queue import Wakeup
        from longembed.plugin.pipeline.worker import Worker

        model = BatchedModel(served)
        while not self._stop.is_set():
            try:
                with (
                    connect(self.config.dsn, application_name="longembed host worker") as conn,
                    Wakeup(self.config.dsn) as wakeup,
                ):
                    Worker(conn, model).run(self._stop, wakeup=wakeup)
            except Exception as exc:
                log.warning("ingestion worker for %s stopped (%s); retrying", served.info.name, exc)
                self._stop.wait(WORKER_RETRY_S)


def _default_budget(model: object) -> int:
    from longembed.encoder.model import DEFAULT_BATCH_TOKENS

    return DEFAULT_BATCH_TOKENS.get(model.device.type, 16384)


def _warm_up(served: ServedModel) -> None:
    """One tiny pass through the batcher, so the first real request does not pay for lazy init."""
    plan = served.plan(["warm up"], "document", None, "truncate")
    served.submit(plan, INTERACTIVE).result(timeout=120)
