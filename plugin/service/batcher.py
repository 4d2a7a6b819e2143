"""One batcher thread per model: sequences of many callers -> token-budget packed batches -> futures.

Callers tokenise in their own threads (`EmbeddingModel.prepare`) and `submit` the plan's sequences
with a priority. The batcher thread is the only one that runs the model: it takes queued sequences
in (priority, arrival) order up to a token budget of real tokens, packs them (varlen, no padding),
runs one forward pass and scatters the pooled rows back to each caller's future. A job's sequences
may be spread over several batches, so an interactive query slips in between the batches of a large
ingestion job instead of waiting for all of it.

Dispatch: a lone job goes at once (a single short query never waits for the window); with several
jobs queued and the budget not yet full, the batcher waits up to `max_wait` after the oldest arrival
so that requests arriving together share one pass. A small interactive job (at most `inline_tokens`)
that finds the model idle and nothing queued runs in the caller's thread instead: no hop to the
batcher thread and back, which costs a short query more than its forward pass on a busy machine.
Either way one forward pass runs at a time. For HTTP the caller is the event loop, which such a pass
holds for about as long as it takes (a few milliseconds at most for `inline_tokens` on a CPU).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from longembed.encoder.batching import Sequence

log = logging.getLogger(__name__)

INTERACTIVE = 0  # HTTP and SQL callers
INGESTION = 1  # the in-process ingestion worker: runs when no interactive work is queued
PRIORITIES = {INTERACTIVE: "interactive", INGESTION: "ingestion"}
# An inline job runs on `forward_alone` only if no job had to wait for the model this long before.
CONTENTION_MEMORY_S = 1.0


class QueueFull(Exception):
    """The interactive queue holds too many tokens; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BatcherStopped(Exception):
    """The batcher is shutting down and takes no more work."""


@dataclass(frozen=True)
class BatchStats:
    sequences: int
    tokens: int
    seconds: float
    tokens_by_priority: dict[int, int]


@dataclass(eq=False)
class _Job:
    priority: int
    n_tokens: int
    out: np.ndarray  # (n_out, dim), filled as batches finish
    future: Future = field(default_factory=Future)
    remaining: int = 0  # sequences still queued
    unfinished: int = 0  # sequences not yet run (touched by the batcher thread only)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Batcher:
    """Owns the model's forward passes; `submit` from any thread, results arrive on futures."""

    def __init__(
        self,
        forward: Callable[[list[Sequence]], np.ndarray],
        dim: int,
        *,
        batch_tokens: int = 4096,
        max_wait: float = 0.002,
        max_queued_tokens: int = 262_144,
        inline_tokens: int = 64,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "batcher",
        forward_alone: Callable[[list[Sequence]], np.ndarray] | None = None,
    ) -> None:
        if batch_tokens <= 0 or max_queued_tokens <= 0 or max_wait < 0:
            raise ValueError("batch_tokens and max_queued_tokens must be positive, max_wait non-negative")
        self._forward = forward  # one packed pass: rows per pool span, in sequence order
        # The same pass for an inline job while no other work has had to wait for the model lately:
        # it may take every core (EmbeddingModel.forward_batch's spare_cores), which would only slow
        # concurrent callers' tokenising down when they are there (bench_cpu_encode.py concurrent).
        self._forward_alone = forward_alone
        self._waited_at = -float("inf")  # when a job last queued because the model was busy
        self._dim = dim
        self.batch_tokens = batch_tokens
        self.max_wait = max_wait
        self.max_queued_tokens = max_queued_tokens
        self.inline_tokens = inline_tokens
        self._on_batch = on_batch
        self._cond = threading.Condition()
        # (priority, arrival, -length, n, job, sequence, enqueued): highest priority first, then oldest,
        # then longest; n (unique) keeps the tuples from ever comparing jobs or sequences.
        self._heap: list[tuple[int, int, int, int, _Job, Sequence, float]] = []
        self._entries = itertools.count()
        self._arrivals = itertools.count()
        self._queued_tokens = {INTERACTIVE: 0, INGESTION: 0}
        self._jobs_queued = 0  # jobs with at least one sequence still in the heap
        self._running = False  # a forward pass is in progress (batcher thread or an inline caller)
        self._stopping = False
        self._seconds_per_token = 1e-4  # running estimate, for Retry-After
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- callers -------------------------------------------------------------------------------

    def submit(self, sequences: list[Sequence], n_out: int, priority: int = INTERACTIVE) -> Future:
        """A future of the (n_out, dim) float32 rows of `sequences` (rows at their `outputs` indices).

        Raises QueueFull for interactive work beyond `max_queued_tokens` queued tokens (ingestion is
        never refused: its worker has one job in flight at a time), BatcherStopped after `stop`."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}")
        n_tokens = sum(len(s.ids) for s in sequences)
        job = _Job(priority, n_tokens, np.zeros((n_out, self._dim), dtype=np.float32))
        job.remaining = job.unfinished = len(sequences)
        if not sequences:
            job.future.set_result(job.out)
            return job.future
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the model host is shutting down")
            inline = (
                priority == INTERACTIVE
                and n_tokens <= self.inline_tokens
                and not self._heap
                and not self._running
            )
            if not inline:
                if self._running:
                    self._waited_at = time.monotonic()
                self._enqueue(job, sequences, priority, n_tokens)
                return job.future
            self._running = True
            alone = time.monotonic() - self._waited_at > CONTENTION_MEMORY_S
        self._run_inline(job, sequences, alone)
        return job.future

    def _enqueue(self, job: _Job, sequences: list[Sequence], priority: int, n_tokens: int) -> None:
        """Queue the job's sequences for the batcher thread; the caller holds the lock."""
        queued = self._queued_tokens[INTERACTIVE]
        if priority == INTERACTIVE and queued and queued + n_tokens > self.max_queued_tokens:
            raise QueueFull(
                f"the queue is full ({queued} tokens waiting, limit {self.max_queued_tokens})",
                retry_after=max(1.0, queued * self._seconds_per_token),
            )
        arrival = next(self._arrivals)
        now = time.monotonic()
        for seq in sequences:
            entry = (priority, arrival, -len(seq.ids), next(self._entries), job, seq, now)
            heapq.heappush(self._heap, entry)
        self._queued_tokens[priority] += n_tokens
        self._jobs_queued += 1
        self._cond.notify()

    def _run_inline(self, job: _Job, sequences: list[Sequence], alone: bool) -> None:
        try:
            forward = self._forward_alone if alone and self._forward_alone is not None else self._forward
            self._run([(job, seq) for seq in sequences], forward)
        except Exception as exc:
            log.exception("an inline batch of %d sequences failed", len(sequences))
            job.fail(exc)
        finally:
            with self._cond:
                self._running = False
                # The batcher thread waits while a caller runs the model: woken only for work that
                # queued meanwhile (waking it for nothing cost a lone query ~30 us, bench_cpu_encode).
                if self._heap:
                    self._cond.notify()

    def queue_depth(self) -> tuple[int, int]:
        """(sequences, tokens) waiting."""
        with self._cond:
            return len(self._heap), sum(self._queued_tokens.values())

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the batch in progress, fail what is still queued, end the thread."""
        with self._cond:
            self._stopping = True
            leftover = {entry[4] for entry in self._heap}
            self._heap.clear()
            self._cond.notify_all()
        for job in leftover:
            job.fail(BatcherStopped("the model host is shutting down"))
        self._thread.join(timeout)

    # -- the batcher thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                if batch:
                    self._run(batch, self._forward)
            except Exception as exc:  # the model (or scattering its rows) failed: callers get the error
                log.exception("a batch of %d sequences failed", len(batch))
                for job, _ in batch:
                    job.fail(exc)
            finally:
                with self._cond:
                    self._running = False

    def _next_batch(self) -> list[tuple[_Job, Sequence]] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if not self._heap or self._running:
                    self._cond.wait()
                    continue
                queued = sum(self._queued_tokens.values())
                deadline = min(entry[6] for entry in self._heap) + self.max_wait
                wait = deadline - time.monotonic()
                if self._jobs_queued <= 1 or queued >= self.batch_tokens or wait <= 0:
                    self._running = True
                    return self._take()
                self._cond.wait(wait)

    def _take(self) -> list[tuple[_Job, Sequence]]:
        """Sequences off the heap up to the token budget (at least one, however long; none when all
        that was queued belonged to cancelled jobs)."""
        taken: list[tuple[_Job, Sequence]] = []
        used = 0
        while self._heap:
            length = -self._heap[0][2]
            if taken and used + length > self.batch_tokens:
                break
            job, seq = heapq.heappop(self._heap)[4:6]
            self._queued_tokens[job.priority] -= length
            job.remaining -= 1
            if job.remaining == 0:
                self._jobs_queued -= 1
            if job.future.done():  # cancelled (the client went away) or failed: skip its other sequences
                continue
            taken.append((job, seq))
            used += length
        return taken

    def _run(
        self, batch: list[tuple[_Job, Sequence]], forward: Callable[[list[Sequence]], np.ndarray]
    ) -> None:
        t0 = time.perf_counter()
        sequences = [seq for _, seq in batch]
        rows = forward(sequences)
        n_rows = sum(len(s.outputs) for s in sequences)
        if rows.shape != (n_rows, self._dim):
            raise ValueError(f"the model gave {rows.shape} rows for {n_rows} pooled spans of {self._dim}-d")
        seconds = time.perf_counter() - t0
        tokens = sum(len(s.ids) for s in sequences)
        self._seconds_per_token = 0.8 * self._seconds_per_token + 0.2 * seconds / max(tokens, 1)
        k = 0
        by_priority = {INTERACTIVE: 0, INGESTION: 0}
        for job, seq in batch:
            n = len(seq.outputs)
            job.out[seq.outputs] = rows[k : k + n]
            k += n
            by_priority[job.priority] += len(seq.ids)
            job.unfinished -= 1
            if job.unfinished == 0 and not job.future.done():
                job.future.set_result(job.out)
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(sequences), tokens, seconds, by_priority))
