"""Search mode `auto`: the fusion of dense, chunk and lexical signals chosen per collection from its data.

No relevance judgements exist for a user's collection, so `calibrate` makes its own: pseudo-queries taken
from the documents (a short first line, a title or heading, else the first sentence) used as queries for
their own documents. Taken verbatim they would find themselves by exact match, so each target document is
scored with its pseudo-query cut out: its document vector re-embedded from the remaining text, its chunks
that held the pseudo-query replaced by that vector, its lexical score computed on the remaining text
(longembed.search_lexical_score). The other documents keep their stored vectors and scores, from the same
candidate pools a search uses (015_search.sql). Every candidate -- each signal alone, and weights 0, 0.5
or 1 per signal fused by reciprocal rank fusion (rrf_k 60) and by min-max normalised scores -- is scored
by nDCG@10 of the targets; the best wins; near-ties (within MARGIN) go to the fewest signals for short
documents, the most for long ones.

Statistics decide where pseudo-queries cannot: with fewer than MIN_DOCUMENTS embedded documents, or fewer
than MIN_QUERIES usable pseudo-queries, a collection whose documents fit the model's window (at most
SHORT_CHUNKS chunks per document on average) gets dense alone; one of longer documents gets rrf over all
three signals. Where documents fit one chunk, the chunk signal is the dense one again and is left out.

The choice is stored in collections.auto_fusion with how it was made, and made again by the worker when
the number of embedded documents has doubled or halved since (`due`), or on `longembed collection
calibrate`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from longembed.plugin.store.collections import Collection

SAMPLE = 100  # pseudo-queries per calibration
POOL = 100  # candidates per signal, as 015_search.sql's pool
MIN_DOCUMENTS = 20
MIN_QUERIES = 10
SHORT_CHUNKS = 1.5
MARGIN = 0.01  # candidates this close (nDCG@10) to the best count as equal (see _pick)
RRF_K = 60
QUERY_WORDS = (3, 32)  # a pseudo-query has this many words at least / at most

# texts -> (n, dim) vectors: queries with the collection's query prefix, documents with its document one.
Embed = Callable[[Sequence[str]], np.ndarray]


def due(conn: psycopg.Connection, collection: Collection) -> bool:
    """Whether `auto`'s choice should be made again: never made, or the number of embedded documents
    has doubled or halved since."""
    (embedded,) = conn.execute(
        "SELECT count(*) FROM longembed.documents WHERE collection_id = %s AND status = 'embedded'",
        (collection.id,),
    ).fetchone()
    before = (collection.auto_fusion or {}).get("documents")
    if before is None:
        return embedded > 0
    return embedded >= 2 * max(before, 1) or embedded * 2 < before


def calibrate(
    conn: psycopg.Connection, collection: Collection, embed_queries: Embed, embed_documents: Embed
) -> dict[str, Any]:
    """Choose and store the fusion of search mode auto for `collection`; returns it (see the module)."""
    stats = _statistics(conn, collection)
    short = stats["chunks_per_document"] <= SHORT_CHUNKS
    signals = ("dense", "lexical") if short else ("dense", "chunks", "lexical")
    samples = _pseudo_queries(conn, collection) if stats["documents"] >= MIN_DOCUMENTS else []
    if len(samples) < MIN_QUERIES:
        weights = {"dense": 1} if short else {"dense": 1, "chunks": 1, "lexical": 1}
        chosen = _fusion(weights, "rrf") | {"basis": "statistics", "scores": {}}
    else:
        ranks = _signal_ranks(conn, collection, samples, signals, embed_queries, embed_documents)
        scores = {_name(w, f): _ndcg(ranks, w, f) for w, f in _candidates(signals)}
        pick = _pick(scores, short)
        chosen = _fusion(*_parse(pick)) | {
            "basis": "pseudo-queries",
            "queries": len(samples),
            "scores": scores,
        }
    chosen |= {"documents": stats["documents"], "chunks_per_document": stats["chunks_per_document"]}
    with conn.transaction():
        conn.execute(
            "UPDATE longembed.collections SET auto_fusion = %s WHERE id = %s", (Jsonb(chosen), collection.id)
        )
    return chosen


def _pick(scores: dict[str, float], short: bool) -> str:
    """The best candidate, where candidates within MARGIN of it count as equal: then, for documents that
    fit the window, the one with the fewest signals (dense alone first); for longer ones the one with the
    most. Pseudo-queries are easier than real queries (a title still shares words with its page), so
    near-ties are common, and for long documents a fusion is the safer bet (a signal that misses a page
    is outvoted), for short ones dense alone (fusing a weaker signal in only adds noise)."""
    best = max(scores.values())

    def preference(name: str) -> tuple:
        n_signals = name.count("=")
        return (n_signals if short else -n_signals, name != "dense=1", -scores[name], name)

    return min((name for name in scores if scores[name] >= best - MARGIN), key=preference)


def _fusion(weights: dict[str, float], fusion: str) -> dict[str, Any]:
    if len(weights) == 1:
        return {"weights": weights, "fusion": "raw"}
    if fusion == "minmax":
        return {"weights": weights, "fusion": "minmax"}
    return {"weights": weights, "fusion": "rrf", "rrf_k": RRF_K}


def _statistics(conn: psycopg.Connection, collection: Collection) -> dict[str, Any]:
    documents, chunks = conn.execute(
        sql.SQL(
            """SELECT count(*), coalesce(sum((SELECT count(*) FROM {chunks} c WHERE c.document_id = d.id)), 0)
               FROM longembed.documents d WHERE d.collection_id = %s AND d.status = 'embedded'"""
        ).format(chunks=collection.chunk_table),
        (collection.id,),
    ).fetchone()
    per_document = round(float(chunks) / documents, 3) if documents else 0.0
    return {"documents": int(documents), "chunks_per_document": per_document}


def pseudo_query(text: str) -> str | None:
    """A document's own query: its first line when that is short (a title, a heading), else its first
    sentence; None when neither has QUERY_WORDS words."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    first = lines[0]
    if len(first.split()) > QUERY_WORDS[1] or (len(lines) == 1 and len(first.split()) >= QUERY_WORDS[1]):
        first = re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0]
    words = first.split()
    if len(words) < QUERY_WORDS[0] or len(words) > QUERY_WORDS[1] or len(first) >= len(text.strip()):
        return None
    return first


def _pseudo_queries(conn: psycopg.Connection, collection: Collection) -> list[tuple[int, str, str, str]]:
    """(document id, external id, pseudo-query, text without it) for a fixed sample of documents."""
    rows = conn.execute(
        """SELECT id, external_id, text FROM longembed.documents
           WHERE collection_id = %s AND status = 'embedded'
           ORDER BY md5(external_id) LIMIT %s""",
        (collection.id, 3 * SAMPLE),
    ).fetchall()
    out = []
    for doc_id, external_id, text in rows:
        query = pseudo_query(text)
        if query is not None:
            out.append((doc_id, external_id, query, text.replace(query, " ", 1)))
        if len(out) == SAMPLE:
            break
    return out


def _signal_ranks(
    conn: psycopg.Connection,
    collection: Collection,
    samples: list[tuple[int, str, str, str]],
    signals: Sequence[str],
    embed_queries: Embed,
    embed_documents: Embed,
) -> list[tuple[str, dict[str, list[tuple[str, float]]]]]:
    """Per pseudo-query its target and, per signal: the pool's (external id, score), best first, with the
    target at the place its pseudo-query-free version earns (absent when it would not make the pool)."""
    queries = embed_queries([q for _, _, q, _ in samples])
    heads = embed_documents([rest for _, _, _, rest in samples])
    out = []
    for (doc_id, external_id, query, rest), qv, head in zip(samples, queries, heads, strict=True):
        ranked: dict[str, list[tuple[str, float]]] = {}
        for signal in signals:
            pool = _pool(conn, collection, signal, query, qv)
            pool = [(eid, score) for eid, score in pool if eid != external_id]
            if signal == "dense":
                own = _similarity(collection.distance, qv, head[None, :])[0]
            elif signal == "chunks":
                own = _chunk_score(conn, collection, doc_id, query, qv, head)
            else:
                (own,) = conn.execute(
                    "SELECT longembed.search_lexical_score(%s, %s, %s)", (collection.id, query, rest)
                ).fetchone()
            ranked[signal] = _insert(pool, external_id, own)
        out.append((external_id, ranked))
    return out


def _pool(
    conn: psycopg.Connection, collection: Collection, signal: str, query: str, qv: np.ndarray
) -> list[tuple[str, float]]:
    function = f"search_{signal}_pool"  # 015_search.sql: the pools a fused search uses
    return conn.execute(
        sql.SQL(
            "SELECT d.external_id, p.score FROM longembed.{}(%s, %s, %s) p "
            "JOIN longembed.documents d ON d.id = p.document_id ORDER BY p.score DESC, d.external_id"
        ).format(sql.Identifier(function)),
        (collection.id, query if signal == "lexical" else qv, POOL),
    ).fetchall()


def _chunk_score(
    conn: psycopg.Connection,
    collection: Collection,
    doc_id: int,
    query: str,
    qv: np.ndarray,
    head: np.ndarray,
) -> float:
    """The target's best chunk without its pseudo-query: chunks after the pseudo-query's span keep
    their vectors, the ones that held it are replaced by the re-embedded head."""
    text, *_ = conn.execute("SELECT text FROM longembed.documents WHERE id = %s", (doc_id,)).fetchone()
    end = text.find(query) + len(query)
    rows = conn.execute(
        sql.SQL("SELECT embedding FROM {} WHERE document_id = %s AND char_start >= %s").format(
            collection.chunk_table
        ),
        (doc_id, end),
    ).fetchall()
    vectors = np.stack([head, *(row[0].to_numpy() for row in rows)])
    return float(_similarity(collection.distance, qv, vectors).max())


def _similarity(distance: str, query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The search functions' score (higher is better) of `vectors` for `query`."""
    if distance == "l2":
        return -np.linalg.norm(vectors - query[None, :], axis=1)
    dots = vectors @ query
    if distance == "cosine":
        return dots / np.maximum(np.linalg.norm(vectors, axis=1) * np.linalg.norm(query), 1e-12)
    return dots


def _insert(pool: list[tuple[str, float]], external_id: str, score: float | None) -> list[tuple[str, float]]:
    if score is None:
        return pool
    position = sum(1 for _, other in pool if other > score)
    if position >= POOL:
        return pool
    return [*pool[:position], (external_id, score), *pool[position:]]


def _candidates(signals: Sequence[str]) -> list[tuple[dict[str, float], str]]:
    """Each signal alone, and every mix of weights 0, 0.5, 1 fused by rrf and by minmax."""
    out = []
    for values in itertools.product((0, 0.5, 1), repeat=len(signals)):
        weights = {s: w for s, w in zip(signals, values, strict=True) if w > 0}
        if len(weights) > 1:
            out += [(weights, "rrf"), (weights, "minmax")]
        elif weights and values.count(1) == 1:
            out.append((weights, "raw"))
    return out


def _name(weights: dict[str, float], fusion: str) -> str:
    """`dense=1` for a signal alone, `rrf dense=1 lexical=0.5` for a fusion."""
    pairs = " ".join(f"{s}={w:g}" for s, w in weights.items())
    return pairs if fusion == "raw" else f"{fusion} {pairs}"


def _parse(name: str) -> tuple[dict[str, float], str]:
    parts = name.split()
    fusion = parts.pop(0) if "=" not in parts[0] else "raw"
    pairs = (part.split("=") for part in parts)
    return {signal: (int(w) if float(w).is_integer() else float(w)) for signal, w in pairs}, fusion


def _ndcg(
    ranks: list[tuple[str, dict[str, list[tuple[str, float]]]]], weights: dict[str, float], fusion: str
) -> float:
    """Mean nDCG@10 of the targets (one relevant document each) under `fusion` with `weights`, as
    longembed.search_modes fuses (rrf; minmax, where a document missing from a pool counts 0; a signal
    alone ranks by its score: rrf gives that order)."""
    total = 0.0
    for target, ranked in ranks:
        fused: dict[str, float] = {}
        for signal, weight in weights.items():
            pool = ranked[signal]
            lo, hi = (min(s for _, s in pool), max(s for _, s in pool)) if pool else (0.0, 0.0)
            for rank, (eid, score) in enumerate(pool, start=1):
                if fusion == "minmax":
                    value = (score - lo) / (hi - lo) if hi > lo else 1.0
                else:
                    value = 1 / (RRF_K + rank)
                fused[eid] = fused.get(eid, 0.0) + weight * value
        if target not in fused:
            continue
        position = 1 + sum(
            1 for eid, s in fused.items() if s > fused[target] or (s == fused[target] and eid < target)
        )
        if position <= 10:
            total += 1 / math.log2(position + 1)
    return round(total / len(ranks), 4)
