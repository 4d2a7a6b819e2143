"""Search: top-k documents of a collection in one of its search modes, with metadata filters.

The search itself is SQL, longembed.search_modes (migrations/functions/015_search.sql, which also says
what each mode does), so Python, the CLI and SQL return the same documents with the same
scores. Those functions build the statement per call and EXECUTE it, so PostgreSQL plans it with the real
vector and LIMIT each time: a caller's prepared statements cannot pin a generic plan that sorts the whole
table instead of walking the HNSW index (tests/test_search_plan.py). Here: validate arguments, embed a
text query with the collection's model and query prefix, call the function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from longembed.plugin.store.collections import SEARCH_MODES, Collection, get_collection

SNIPPET_CHARS = 300  # as in 015_search.sql

MAX_K = 1000
SIGNALS = ("dense", "chunks", "lexical")
VECTOR_SIGNALS = ("dense", "chunks")
FUSIONS = ("rrf", "minmax", "zscore")
# What mode "hybrid" fuses when neither the call nor the collection says otherwise.
DEFAULT_FUSION: dict[str, Any] = {
    "weights": {"dense": 1, "chunks": 1, "lexical": 1},
    "fusion": "rrf",
    "rrf_k": 60,
}


@dataclass(frozen=True)
class SearchResult:
    external_id: str
    score: float  # higher is better: cosine similarity, inner product, -L2 distance, BM25, or the fused score
    chunk_ordinal: int  # the best-matching chunk of the document
    char_start: int  # its span [char_start, char_end) in the document text
    char_end: int
    snippet: str  # the chunk's text, cut to SNIPPET_CHARS
    metadata: dict[str, Any]
    truncated: bool  # the chunk's text was cut at the model's window: its vector saw only the start


def search(
    conn: psycopg.Connection,
    collection: str | Collection,
    query: str | Sequence[float] | np.ndarray,
    k: int = 10,
    *,
    filter: Mapping[str, Any] | None = None,
    ef_search: int | None = None,
    mode: str | None = None,
    weights: Mapping[str, float] | None = None,
    fusion: str | None = None,
    rrf_k: int | None = None,
    hybrid: bool = False,
    model: Any = None,
) -> list[SearchResult]:
    """The `k` documents nearest to `query` (text, embedded as a query, or a vector), best first.

    `filter`: JSON object the document metadata must contain (jsonb `@>`). `mode`: "dense" (document
    vector), "chunks" (best chunk), "lexical" (BM25), "hybrid" (fusion of the signals in `weights`, by
    `fusion` "rrf" with `rrf_k`, "minmax" or "zscore") or "auto" (the fusion chosen for the collection);
    None: the collection's search_mode (see migrations/functions/015_search.sql). `hybrid=True`:
    deprecated, mode "hybrid". `model`: the encoder for text queries (default: the collection's model,
    loaded once per process). A vector query works in the modes that need no text.
    """
    target = collection if isinstance(collection, Collection) else get_collection(conn, collection)
    check_arguments(k, ef_search, filter)
    mode = _alias_hybrid(mode, hybrid)
    options = resolve_options(target, mode, weights, fusion, rrf_k)
    text = query if isinstance(query, str) else None
    needs_vector = options["mode"] == "chunks" or any(
        options["weights"].get(s, 0) > 0 for s in VECTOR_SIGNALS
    )
    if text is None and options["weights"].get("lexical", 0) > 0:
        raise ValueError(f"search mode {options['mode']!r} needs a text query (it ranks by BM25 too)")
    if text is not None:
        require_text(text)
    vector = None
    if needs_vector:
        vector = embed_query(target, text, model) if text is not None else as_vector(query, target.dim)
    return search_by_vector(
        conn,
        target,
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


def search_by_vector(
    conn: psycopg.Connection,
    collection: Collection,
    vector: np.ndarray | None,
    k: int = 10,
    *,
    filter: Mapping[str, Any] | None = None,
    ef_search: int | None = None,
    text: str | None = None,
    mode: str | None = None,
    weights: Mapping[str, float] | None = None,
    fusion: str | None = None,
    rrf_k: int | None = None,
    hybrid_text: str | None = None,
) -> list[SearchResult]:
    """The search for a query vector embedded elsewhere (the model host's /v1/search) and the query's
    `text` (the lexical signal). `hybrid_text`: deprecated, `text` with mode "hybrid"."""
    check_arguments(k, ef_search, filter)
    if hybrid_text is not None:
        text, mode = hybrid_text, _alias_hybrid(mode, True)
    resolve_options(collection, mode, weights, fusion, rrf_k)  # clear errors before any SQL
    rows = conn.execute(
        "SELECT * FROM longembed.search_modes(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            collection.name,
            text,
            vector,
            k,
            Jsonb(dict(filter)) if filter is not None else None,
            ef_search,
            mode,
            Jsonb(dict(weights)) if weights is not None else None,
            fusion,
            rrf_k,
        ),
    ).fetchall()
    return [SearchResult(*row) for row in rows]


def resolve_options(
    collection: Collection,
    mode: str | None,
    weights: Mapping[str, float] | None = None,
    fusion: str | None = None,
    rrf_k: int | None = None,
) -> dict[str, Any]:
    """The options a search runs with, checked as longembed.search_options checks them (015_search.sql):
    {"mode", "weights", "fusion", "rrf_k"}. ValueError with the reason for a bad one."""
    mode = collection.search_mode if mode is None else mode
    if mode not in SEARCH_MODES:
        raise ValueError(
            f"unknown search mode {mode!r}: use {', '.join(SEARCH_MODES)} (None: the collection's)"
        )
    if mode != "hybrid" and (weights is not None or fusion is not None or rrf_k is not None):
        raise ValueError(f"weights, fusion and rrf_k apply to mode 'hybrid', not {mode!r}")
    if mode in ("dense", "chunks", "lexical"):
        return {"mode": mode, "weights": {mode: 1.0}, "fusion": "raw"}
    if mode == "auto":
        chosen = collection.auto_fusion or {"weights": {"dense": 1.0}, "fusion": "raw"}
        return {"mode": mode, **chosen}
    options = {**DEFAULT_FUSION, **(collection.fusion or {})}
    if weights is not None:
        options["weights"] = weights
    if fusion is not None:
        options["fusion"] = fusion
    if rrf_k is not None:
        options["rrf_k"] = rrf_k
    check_fusion(options)
    return {"mode": mode, **options}


def check_fusion(options: Mapping[str, Any]) -> None:
    """ValueError unless `options` are valid hybrid options (weights, fusion, rrf_k)."""
    weights = options.get("weights")
    if not isinstance(weights, Mapping):
        raise ValueError(
            f'weights must be a JSON object like {{"dense": 1, "lexical": 0.5}}, got {weights!r}'
        )
    for signal, weight in weights.items():
        if signal not in SIGNALS:
            raise ValueError(f"unknown signal {signal!r} in weights: use {', '.join(SIGNALS)}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1e6:
            raise ValueError(f"weight of {signal} must be a number in 0..1000000, got {weight!r}")
    if not any(weight > 0 for weight in weights.values()):
        raise ValueError("at least one weight must be above 0")
    if options.get("fusion") not in FUSIONS:
        raise ValueError(f"unknown fusion {options.get('fusion')!r}: use {', '.join(FUSIONS)}")
    rrf_k = options.get("rrf_k")
    if options["fusion"] == "rrf" and (
        isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or not 1 <= rrf_k <= 100000
    ):
        raise ValueError(f"rrf_k must be an integer in 1..100000, got {rrf_k!r}")


def _alias_hybrid(mode: str | None, hybrid: bool) -> str | None:
    if not hybrid:
        return mode
    if mode not in (None, "hybrid"):
        raise ValueError(f"hybrid=True is mode 'hybrid', but mode is {mode!r}")
    return "hybrid"


def check_arguments(k: Any, ef_search: Any, filter: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    if ef_search is not None and (
        isinstance(ef_search, bool) or not isinstance(ef_search, int) or not 1 <= ef_search <= 1000
    ):
        raise ValueError(f"ef_search must be an integer in 1..1000, got {ef_search!r}")
    if filter is not None and not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a JSON object (dict), got {type(filter).__name__}")


def require_text(text: str, what: str = "query text") -> None:
    """The one rule for blank text, in search and in SQL embed(): a text that is empty or only
    whitespace means nothing to embed or search for, so it is refused (ValueError) rather than turned
    into the vector of [CLS][SEP], which is near arbitrary documents."""
    if not text.strip():
        raise ValueError(f"the {what} is empty (or only whitespace): nothing to embed")


def embed_query(collection: Collection, text: str, model: Any = None) -> np.ndarray:
    """The query vector of `text` for `collection` (its query prefix, its model)."""
    require_text(text)
    if model is None:
        from longembed.plugin.models import get_model

        model = get_model(collection.model_source)
    if model.info.dim != collection.dim and collection.dim not in model.info.matryoshka_dims:
        raise ValueError(
            f"dimension mismatch: collection {collection.name!r} has {collection.dim}-d vectors, "
            f"model {model.info.name} gives {model.info.dim}-d"
        )
    if model.info.revision != collection.model_revision:
        # The worker refuses such a model too: vectors of other weights live in another space.
        raise ValueError(
            f"model revision mismatch: collection {collection.name!r} holds vectors of revision "
            f"{collection.model_revision} of {collection.model_name}, the model loaded from "
            f"{model.info.source} is revision {model.info.revision}. Put the original weights back, or "
            "create a new collection with this model and ingest the documents into it again"
        )
    # A collection of a Matryoshka size gets its queries cut to that size too.
    sized = {"dimensions": collection.dim} if collection.dim != model.info.dim else {}
    return model.embed([text], kind="query", instruction=collection.query_prefix, **sized)[0]


def as_vector(query: Any, dim: int) -> np.ndarray:
    try:
        vector = np.asarray(query, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError("query must be a text or a sequence of numbers") from exc
    if vector.shape != (dim,):
        raise ValueError(f"query vector has shape {vector.shape}, the collection needs ({dim},)")
    if not np.all(np.isfinite(vector)):
        raise ValueError("query vector has NaN or infinite values")
    return vector
