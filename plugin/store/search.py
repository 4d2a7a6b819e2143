"""Search: top-k documents of a collection by their best chunk, with metadata filters and optional hybrid.

The search itself is SQL, longembed.search_vector / longembed.search_hybrid
(migrations/functions/015_search.sql), so Python, the CLI and SQL return the same documents with the same
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

from longembed.plugin.store.collections import Collection, get_collection

SNIPPET_CHARS = 300  # as in 015_search.sql

MAX_K = 1000


@dataclass(frozen=True)
class SearchResult:
    external_id: str
    score: float  # higher is better: cosine similarity, inner product, -L2 distance, or the RRF score
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
    hybrid: bool = False,
    model: Any = None,
) -> list[SearchResult]:
    """The `k` documents nearest to `query` (text, embedded as a query, or a vector), best first.

    `filter`: JSON object the document metadata must contain (jsonb `@>`). `hybrid`: fuse the vector
    ranking with PostgreSQL full-text ranking (reciprocal rank fusion; text queries only). `model`:
    the encoder for text queries (default: the collection's model, loaded once per process).
    """
    target = collection if isinstance(collection, Collection) else get_collection(conn, collection)
    check_arguments(k, ef_search, filter)
    text = query if isinstance(query, str) else None
    if hybrid and text is None:
        raise ValueError("hybrid search needs a text query")
    vector = embed_query(target, text, model) if text is not None else as_vector(query, target.dim)
    return search_by_vector(
        conn, target, vector, k, filter=filter, ef_search=ef_search, hybrid_text=text if hybrid else None
    )


def search_by_vector(
    conn: psycopg.Connection,
    collection: Collection,
    vector: np.ndarray,
    k: int = 10,
    *,
    filter: Mapping[str, Any] | None = None,
    ef_search: int | None = None,
    hybrid_text: str | None = None,
) -> list[SearchResult]:
    """The search for a query vector embedded elsewhere (the model host's /v1/search); `hybrid_text`:
    fuse with full-text ranking of that text."""
    check_arguments(k, ef_search, filter)
    params = (collection.name, vector, k, Jsonb(dict(filter)) if filter is not None else None, ef_search)
    if hybrid_text is not None:
        rows = conn.execute(
            "SELECT * FROM longembed.search_hybrid(%s, %s, %s, %s, %s, %s)",
            (collection.name, hybrid_text, *params[1:]),
        ).fetchall()
    else:
        rows = conn.execute("SELECT * FROM longembed.search_vector(%s, %s, %s, %s, %s)", params).fetchall()
    return [SearchResult(*row) for row in rows]


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
