"""Okapi BM25 over a collection's documents: a thin caller of the SQL function longembed.search_bm25.

The scoring and the term statistics live in SQL (migrations/functions/012_bm25.sql): terms are the
lexemes of the collection's text search configuration, idf is Lucene's ln(1 + (N - df + 0.5)/(df + 0.5)),
a term repeated in the query counts once, and a query without any lexeme (empty, only stop words) finds
nothing. k1 and b default to the collection's (`create_collection(bm25_k1=, bm25_b=)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from longembed.plugin.store.collections import Collection, check_bm25_parameters, get_collection

MAX_K = 1000


@dataclass(frozen=True)
class Bm25Hit:
    document_id: int
    external_id: str
    score: float


def search_bm25(
    conn: psycopg.Connection,
    collection: str | Collection,
    query: str,
    k: int = 10,
    *,
    filter: Mapping[str, Any] | None = None,
    k1: float | None = None,
    b: float | None = None,
) -> list[Bm25Hit]:
    """The `k` best documents of `collection` for `query` by BM25, best first (ties: by external id).

    `filter`: documents whose metadata contains this JSON object (jsonb @>); N, df and the mean length
    still count the whole collection. Raises CollectionNotFound, ValueError on bad k, k1, b or filter.
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if "\x00" in query:
        raise ValueError("query contains NUL characters")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    check_bm25_parameters(k1, b)
    if filter is not None and not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a JSON object (a mapping), got {type(filter).__name__}")
    target = collection if isinstance(collection, Collection) else get_collection(conn, collection)
    with conn.cursor(row_factory=class_row(Bm25Hit)) as cur:
        return cur.execute(
            "SELECT document_id, external_id, score FROM longembed.search_bm25(%s, %s, %s, %s, %s, %s)",
            (target.name, query, k, None if filter is None else Jsonb(dict(filter)), k1, b),
        ).fetchall()
