"""Prometheus metrics of the model host, in a registry of its own (several hosts may share a process).

Counters and histograms are updated as requests and batches finish; queue depths and the ingestion
queue's backlog are read when /metrics is scraped (the backlog from the database, so it counts the
work of every worker, not only ours).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from longembed.plugin.service.batcher import PRIORITIES, BatchStats

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)
BACKLOG_SQL = """
SELECT count(*),
       count(*) FILTER (WHERE leased_until > now()),
       coalesce(extract(epoch FROM now() - min(enqueued_at)), 0)
  FROM longembed.queue
"""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "longembed_http_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.inputs = Counter(
            "longembed_embedding_inputs",
            "Texts embedded for /v1/embeddings callers (HTTP and SQL)",
            ["model"],
            registry=r,
        )
        self.errors = Counter(
            "longembed_http_errors",
            "HTTP error answers by endpoint and type",
            ["endpoint", "type"],
            registry=r,
        )
        self.latency = Histogram(
            "longembed_http_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_sequences = Histogram(
            "longembed_batch_sequences",
            "Sequences per forward pass",
            ["model"],
            buckets=SEQUENCE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "longembed_batch_tokens",
            "Real tokens per forward pass",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "longembed_batch_seconds",
            "Time of one forward pass",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "longembed_tokens_embedded",
            "Tokens run through the model, by priority (rate() of it is tokens/s)",
            ["model", "priority"],
            registry=r,
        )

    def on_batch(self, model: str) -> Callable[[BatchStats], None]:
        def record(stats: BatchStats) -> None:
            self.batch_sequences.labels(model).observe(stats.sequences)
            self.batch_tokens.labels(model).observe(stats.tokens)
            self.batch_seconds.labels(model).observe(stats.seconds)
            for priority, n in stats.tokens_by_priority.items():
                if n:
                    self.tokens.labels(model, PRIORITIES[priority]).inc(n)

        return record

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class QueueDepth(Collector):
    """The batchers' queues at scrape time: sequences and tokens waiting, per model."""

    def __init__(self, depths: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self._depths = depths

    def describe(self) -> list[Metric]:
        return []  # collected live: no fixed description

    def collect(self) -> Iterable[Metric]:
        sequences = GaugeMetricFamily(
            "longembed_queue_sequences", "Sequences waiting for the model", labels=["model"]
        )
        tokens = GaugeMetricFamily("longembed_queue_tokens", "Tokens waiting for the model", labels=["model"])
        for model, n_seq, n_tok in self._depths():
            sequences.add_metric([model], n_seq)
            tokens.add_metric([model], n_tok)
        yield sequences
        yield tokens


class IngestionBacklog(Collector):
    """The ingestion queue (longembed.queue) at scrape time: documents waiting, leased, oldest age."""

    def __init__(self, connect: Callable[[], object]) -> None:
        self._connect = connect

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("longembed_database_up", "1 when the database answered this scrape")
        try:
            with self._connect() as conn:
                total, leased, age = conn.execute(BACKLOG_SQL).fetchone()
        except Exception as exc:  # a scrape must not fail because the database is away
            log.warning("ingestion backlog unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "longembed_ingestion_backlog_documents", "Documents in the ingestion queue", value=total
        )
        yield GaugeMetricFamily(
            "longembed_ingestion_leased_documents", "Queued documents a worker is embedding now", value=leased
        )
        yield GaugeMetricFamily(
            "longembed_ingestion_oldest_age_seconds",
            "Age of the oldest document in the ingestion queue (0 when empty)",
            value=float(age),
        )


class IndexStaleness(Collector):
    """The hnswlib fast path's indexes at scrape time (fastpath.py): how far each is behind its table."""

    def __init__(self, rows: Callable[[], Iterable[tuple]]) -> None:
        self._rows = rows

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        labels = ["collection"]
        ready = GaugeMetricFamily("longembed_hnsw_ready", "1 when the index answers searches", labels=labels)
        vectors = GaugeMetricFamily("longembed_hnsw_vectors", "Chunk vectors in the index", labels=labels)
        pending = GaugeMetricFamily(
            "longembed_hnsw_pending_changes",
            "Committed changes of the table not in the index yet",
            labels=labels,
        )
        seq_lag = GaugeMetricFamily(
            "longembed_hnsw_seq_lag",
            "Highest committed change seq minus the highest the index applied (0 when none is pending)",
            labels=labels,
        )
        seconds = GaugeMetricFamily(
            "longembed_hnsw_lag_seconds",
            "Age of the oldest committed change not in the index (0 when up to date)",
            labels=labels,
        )
        try:
            for name, is_ready, n, lag in self._rows():
                ready.add_metric([name], int(is_ready))
                vectors.add_metric([name], n)
                pending.add_metric([name], lag.pending)
                seq_lag.add_metric([name], lag.seq_lag)
                seconds.add_metric([name], lag.seconds)
        except Exception as exc:  # a scrape must not fail because the database is away
            log.warning("hnsw staleness unavailable: %s", exc)
            return
        yield from (ready, vectors, pending, seq_lag, seconds)
