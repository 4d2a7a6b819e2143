"""A model as the host serves it: the encoder for tokenising, its batcher for the forward passes.

Request policy lives here, not in the encoder: the overflow of a text longer than the model's window
(`error`, `truncate`, or `split` into windows mean-pooled) and Matryoshka truncation (`dimensions`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from longembed.encoder.profiles import check_dimensions
from longembed.plugin.service.batcher import INGESTION, Batcher
from longembed.plugin.service.errors import invalid

OVERFLOWS = ("truncate", "error", "split")


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (n, dim or dimensions) float32, rows L2-normalised
    n_tokens: list[int]  # per input: tokens fed to the model ([CLS], [SEP] and prefix included)
    truncated: list[int]  # indices of inputs cut at the model's window (overflow "truncate")


class ServedModel:
    def __init__(self, model: Any, batcher: Batcher, aliases: Seq[str] = ()) -> None:
        self.model = model  # encoder.EmbeddingModel
        self.batcher = batcher
        self.info = model.info
        self.aliases = {model.info.name, *aliases}
        self.created = int(time.time())  # OpenAI's model "created": when this host loaded it

    def plan(self, texts: list[str], kind: str, instruction: str | None, overflow: str) -> Any:
        """Tokenise (in the caller's thread). Input problems raise ApiError 400."""
        if overflow not in OVERFLOWS:
            raise invalid(f"overflow must be one of {', '.join(OVERFLOWS)}, got {overflow!r}", "overflow")
        try:
            if overflow == "split":  # windows as large as the model takes, no overlap
                room = self.model.room(kind, instruction)
                plan = self.model.prepare(texts, "chunk", room, 0, kind, instruction)
            else:
                plan = self.model.prepare(texts, "full", None, 0, kind, instruction)
        except (ValueError, TypeError) as exc:
            raise invalid(str(exc)) from None
        if overflow == "error":
            for i, spans in enumerate(plan.layout):
                if spans[0][3]:
                    raise invalid(
                        f"input[{i}] is longer than {self.info.name}'s window of {self.info.max_tokens} "
                        f"tokens; send overflow 'truncate' or 'split' to embed it anyway",
                        "input",
                        "context_length_exceeded",
                    )
        return plan

    def submit(self, plan: Any, priority: int) -> Future:
        return self.batcher.submit(plan.sequences, plan.n_out, priority)

    def finish(self, plan: Any, rows: np.ndarray, overflow: str, dimensions: int | None) -> Embedded:
        """One vector per input from the plan's pooled rows: split windows are averaged (weighted by
        their tokens) and re-normalised; `dimensions` truncates and re-normalises."""
        chunks = plan.assemble(rows)
        if overflow == "split":
            vectors = np.stack([_mean_of_windows(doc) for doc in chunks])
        else:
            vectors = np.stack([doc[0].vector for doc in chunks])
        truncated = [i for i, doc in enumerate(chunks) if doc[0].truncated]
        vectors = self.info.sized(vectors, dimensions)  # Nomic's recipe
        return Embedded(vectors.astype(np.float32, copy=False), list(plan.n_tokens), truncated)

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None or dimensions == self.info.dim:
            return
        allowed = self.info.matryoshka_dims
        if not allowed:
            raise invalid(
                f"{self.info.name} was not trained for shorter vectors (no Matryoshka profile): "
                f"dimensions must be omitted or {self.info.dim}",
                "dimensions",
            )
        if dimensions not in allowed:
            sizes = ", ".join(str(d) for d in sorted(allowed))
            raise invalid(f"dimensions must be one of {sizes} for {self.info.name}", "dimensions")


class BatchedModel:
    """What the ingestion Worker needs of a model (info, embed_chunks, count_tokens), with the forward
    passes going through the host's batcher at ingestion priority."""

    def __init__(self, served: ServedModel, priority: int = INGESTION) -> None:
        self._served = served
        self._priority = priority
        self.info = served.info

    def embed_chunks(
        self,
        texts: Seq[str],
        mode: str = "chunk",
        chunk_tokens: int | None = None,
        overlap: int = 32,
        kind: str = "document",
        instruction: str | None = None,
        batch_tokens: int | None = None,  # the batcher's own budget applies
        progress: bool = False,
        dimensions: int | None = None,  # a Matryoshka size: as EmbeddingModel.embed_chunks
    ) -> list:
        check_dimensions(dimensions, self.info.dim, self.info.matryoshka_dims, self.info.name)
        plan = self._served.model.prepare(texts, mode, chunk_tokens, overlap, kind, instruction)
        rows = self._served.batcher.submit(plan.sequences, plan.n_out, self._priority).result()
        rows = self.info.sized(rows, dimensions)
        return plan.assemble(rows)

    def embed_documents(
        self,
        texts: Seq[str],
        mode: str = "chunk",
        chunk_tokens: int | None = None,
        overlap: int = 32,
        kind: str = "document",
        instruction: str | None = None,
        batch_tokens: int | None = None,  # the batcher's own budget applies
        progress: bool = False,
        dimensions: int | None = None,
    ) -> list:
        """As EmbeddingModel.embed_documents: chunks and head vectors in one submission."""
        check_dimensions(dimensions, self.info.dim, self.info.matryoshka_dims, self.info.name)
        plan = self._served.model.prepare(texts, mode, chunk_tokens, overlap, kind, instruction, head=True)
        rows = self._served.batcher.submit(plan.sequences, plan.n_out, self._priority).result()
        rows = self.info.sized(rows, dimensions)
        return plan.documents(rows)

    def count_tokens(self, texts: Seq[str]) -> list[int]:
        return self._served.model.count_tokens(texts)


def _mean_of_windows(doc: list) -> np.ndarray:
    weights = np.array([max(chunk.n_tokens, 1) for chunk in doc], dtype=np.float32)
    mean = (np.stack([chunk.vector for chunk in doc]) * weights[:, None]).sum(axis=0)
    return _normalise(mean[None, :])[0]


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
