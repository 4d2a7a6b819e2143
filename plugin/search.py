"""Search: top-k documents of a collection by their best chunk, with metadata filters and optional hybrid.

One SQL statement walks the collection's HNSW index for the nearest chunks, keeps the best chunk per
document and joins the document. Settings go in with set_config(..., is_local => true), so they last for
this call's transaction only:
- plan_cache_mode = force_custom_plan: a caller's connection may prepare statements server-side (psycopg
  does after 5 runs by default); a generic plan cannot see the LIMIT or the vector and may sort the
  whole table instead of using the index (ENVIRONMENT.md). Our own connections (plugin.db) do not
  prepare at all.
- hnsw.ef_search when asked; hnsw.iterative_scan = relaxed_order (pgvector >= 0.8) so a filter or many
  chunks per document cannot starve the result: the index keeps producing candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from plugin.collections import Collection, get_collection

SNIPPET_CHARS = 300
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
MAX_K = 1000
_MAX_CANDIDATES = 20000  # pgvector's default hnsw.max_scan_tuples


@dataclass(frozen=True)
class SearchResult:
    external_id: str
    score: float  # higher is better: cosine similarity, inner product, -L2 distance, or the RRF score
    chunk_ordinal: int  # the best-matching chunk of the document
    char_start: int  # its span [char_start, char_end) in the document text
    char_end: int
    snippet: str  # the chunk's text, cut to SNIPPET_CHARS
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _Hit:
    document_id: int
    distance: float
    result: SearchResult


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
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    if ef_search is not None and (
        isinstance(ef_search, bool) or not isinstance(ef_search, int) or not 1 <= ef_search <= 1000
    ):
        raise ValueError(f"ef_search must be an integer in 1..1000, got {ef_search!r}")
    if filter is not None and not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a JSON object (dict), got {type(filter).__name__}")
    text = query if isinstance(query, str) else None
    if hybrid and text is None:
        raise ValueError("hybrid search needs a text query")
    vector = embed_query(target, text, model) if text is not None else _as_vector(query, target.dim)

    with conn.transaction():
        _configure(conn, ef_search)
        if not hybrid:
            return [hit.result for hit in _vector_hits(conn, target, vector, k, filter)]
        pool = max(k, 50)
        by_vector = _vector_hits(conn, target, vector, pool, filter)
        by_text = _lexical_ranking(conn, target, text, pool, filter)
        return _fuse(conn, target, vector, by_vector, by_text, k)


def embed_query(collection: Collection, text: str, model: Any = None) -> np.ndarray:
    """The query vector of `text` for `collection` (its query prefix, its model)."""
    if not text.strip():
        raise ValueError("the query text is empty")
    if model is None:
        from plugin.models import get_model

        model = get_model(collection.model_name)
    if model.info.dim != collection.dim:
        raise ValueError(
            f"dimension mismatch: collection {collection.name!r} has {collection.dim}-d vectors, "
            f"model {model.info.name} gives {model.info.dim}-d"
        )
    return model.embed([text], kind="query", instruction=collection.query_prefix)[0]


def _as_vector(query: Any, dim: int) -> np.ndarray:
    try:
        vector = np.asarray(query, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError("query must be a text or a sequence of numbers") from exc
    if vector.shape != (dim,):
        raise ValueError(f"query vector has shape {vector.shape}, the collection needs ({dim},)")
    if not np.all(np.isfinite(vector)):
        raise ValueError("query vector has NaN or infinite values")
    return vector


def _configure(conn: psycopg.Connection, ef_search: int | None) -> None:
    """The settings of this transaction, in one round trip."""
    settings = [sql.SQL("set_config('plan_cache_mode', 'force_custom_plan', true)")]
    if ef_search is not None:
        settings.append(sql.SQL("set_config('hnsw.ef_search', {}, true)").format(sql.Literal(str(ef_search))))
    # Iterative index scans exist from pgvector 0.8 on; older servers reject the setting.
    settings.append(
        sql.SQL(
            "CASE WHEN (SELECT string_to_array(extversion, '.')::int[] >= '{{0,8}}' FROM pg_extension "
            "WHERE extname = 'vector') THEN set_config('hnsw.iterative_scan', 'relaxed_order', true) END"
        )
    )
    conn.execute(sql.SQL("SELECT ") + sql.SQL(", ").join(settings))


def _score(collection: Collection, distance: float) -> float:
    # pgvector returns distances: cosine 1 - cos, ip the negated inner product, l2 the distance.
    if collection.distance == "cosine":
        return 1.0 - distance
    return -distance


def _candidates_sql(collection: Collection, filtered: bool) -> sql.Composed:
    join = (
        sql.SQL("JOIN longembed.documents fd ON fd.id = c.document_id AND fd.metadata @> %(filter)s")
        if filtered
        else sql.SQL("")
    )
    return sql.SQL(
        """WITH cand AS MATERIALIZED (
               SELECT c.document_id, c.ordinal, c.char_start, c.char_end, c.embedding {op} %(q)s AS distance
               FROM {chunks} c {join}
               ORDER BY c.embedding {op} %(q)s
               LIMIT %(n)s),
           best AS (SELECT DISTINCT ON (document_id) * FROM cand ORDER BY document_id, distance)
           SELECT b.document_id, b.distance, d.external_id, b.ordinal, b.char_start, b.char_end,
                  substr(d.text, b.char_start + 1, least(b.char_end - b.char_start, %(snippet)s)),
                  d.metadata, (SELECT count(*) FROM cand)
           FROM best b JOIN longembed.documents d ON d.id = b.document_id
           ORDER BY b.distance, d.external_id
           LIMIT %(k)s"""
    ).format(op=collection.operator, chunks=collection.chunk_table, join=join)


def _vector_hits(
    conn: psycopg.Connection,
    collection: Collection,
    vector: np.ndarray,
    k: int,
    filter: Mapping[str, Any] | None,
) -> list[_Hit]:
    # Several chunks of one document can fill the candidate list: widen it until k documents come
    # back or the index has nothing more to give.
    query = _candidates_sql(collection, filter is not None)
    params = {"q": vector, "k": k, "snippet": SNIPPET_CHARS, "filter": Jsonb(dict(filter or {}))}
    n = max(4 * k, 40)
    while True:
        rows = conn.execute(query, params | {"n": n}).fetchall()
        n_candidates = rows[0][-1] if rows else 0
        if len(rows) >= k or n_candidates < n or n >= _MAX_CANDIDATES:
            break
        n = min(4 * n, _MAX_CANDIDATES)
    return [
        _Hit(
            doc_id,
            distance,
            SearchResult(ext, _score(collection, distance), ordinal, start, end, snippet, meta),
        )
        for doc_id, distance, ext, ordinal, start, end, snippet, meta, _ in rows
    ]


def _lexical_ranking(
    conn: psycopg.Connection, collection: Collection, text: str, n: int, filter: Mapping[str, Any] | None
) -> list[int]:
    """Document ids by full-text rank (websearch syntax), only documents that have vectors."""
    rows = conn.execute(
        sql.SQL(
            """SELECT d.id FROM longembed.documents d,
                      websearch_to_tsquery(%(cfg)s::regconfig, %(text)s) AS q
               WHERE d.collection_id = %(cid)s AND d.tsv @@ q AND d.metadata @> %(filter)s
                 AND EXISTS (SELECT 1 FROM {chunks} c WHERE c.document_id = d.id)
               ORDER BY ts_rank_cd(d.tsv, q) DESC, d.id
               LIMIT %(n)s"""
        ).format(chunks=collection.chunk_table),
        {
            "cfg": collection.text_search_config,
            "text": text,
            "cid": collection.id,
            "filter": Jsonb(dict(filter or {})),
            "n": n,
        },
    ).fetchall()
    return [row[0] for row in rows]


def _fuse(
    conn: psycopg.Connection,
    collection: Collection,
    vector: np.ndarray,
    by_vector: list[_Hit],
    by_text: list[int],
    k: int,
) -> list[SearchResult]:
    fused: dict[int, float] = {}
    for rank, doc_id in enumerate([hit.document_id for hit in by_vector], start=1):
        fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (RRF_K + rank)
    for rank, doc_id in enumerate(by_text, start=1):
        fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (RRF_K + rank)
    known = {hit.document_id: hit for hit in by_vector}
    top = sorted(fused, key=lambda d: (-fused[d], known[d].distance if d in known else np.inf, d))[:k]
    missing = [d for d in top if d not in known]
    if missing:  # found by text only: its best chunk still comes from the vectors (exact, few rows)
        rows = conn.execute(
            sql.SQL(
                """SELECT DISTINCT ON (c.document_id) c.document_id, c.embedding {op} %(q)s, d.external_id,
                          c.ordinal, c.char_start, c.char_end,
                          substr(d.text, c.char_start + 1, least(c.char_end - c.char_start, %(snippet)s)),
                          d.metadata
                   FROM {chunks} c JOIN longembed.documents d ON d.id = c.document_id
                   WHERE c.document_id = ANY(%(ids)s)
                   ORDER BY c.document_id, c.embedding {op} %(q)s"""
            ).format(op=collection.operator, chunks=collection.chunk_table),
            {"q": vector, "ids": missing, "snippet": SNIPPET_CHARS},
        ).fetchall()
        for doc_id, distance, ext, ordinal, start, end, snippet, meta in rows:
            known[doc_id] = _Hit(doc_id, distance, SearchResult(ext, 0.0, ordinal, start, end, snippet, meta))
    return [SearchResult(**{**known[d].result.__dict__, "score": fused[d]}) for d in top if d in known]


def search_plan(
    conn: psycopg.Connection,
    collection: str | Collection,
    vector: np.ndarray,
    k: int = 10,
    *,
    filter: Mapping[str, Any] | None = None,
    ef_search: int | None = None,
) -> str:
    """EXPLAIN of the vector search statement with search()'s settings (to check the index is used)."""
    target = collection if isinstance(collection, Collection) else get_collection(conn, collection)
    query = sql.SQL("EXPLAIN ") + _candidates_sql(target, filter is not None)
    params = {
        "q": _as_vector(vector, target.dim),
        "k": k,
        "snippet": SNIPPET_CHARS,
        "filter": Jsonb(dict(filter or {})),
        "n": max(4 * k, 40),
    }
    with conn.transaction():
        _configure(conn, ef_search)
        return "\n".join(row[0] for row in conn.execute(query, params).fetchall())
