"""Run every query of a dataset in every search mode against one collection; score and time them.

The one place that knows how a search mode is called is `run_query` (with the list `MODES`): Python
`longembed.plugin.store.search.search()` or SQL `longembed.search(...)`, which embeds the query through the
model host. Both end in the same SQL search functions, so they must give the same rankings.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from longembed.plugin.eval.dataset import Dataset
from longembed.plugin.eval.metrics import mrr_at_k, ndcg_at_k, recall_at_k
from longembed.plugin.store.collections import Collection
from longembed.plugin.store.search import search

# The search modes (store/search.py; migrations/functions/015_search.sql).
MODES = ("dense", "chunks", "lexical", "hybrid", "auto")
VIA = ("python", "sql")
WARM_UP = "a warm-up query outside the dataset"  # loads the model and fills caches; not timed or scored


def run_query(
    conn: psycopg.Connection, collection: Collection, mode: str, query: str, k: int, via: str
) -> list[str]:
    """The ids of the top-`k` documents for `query` in search mode `mode`, best first."""
    if via == "python":
        return [hit.external_id for hit in search(conn, collection, query, k, mode=mode)]
    rows = conn.execute(
        "SELECT external_id FROM longembed.search(%s, %s, %s, mode => %s)", (collection.name, query, k, mode)
    ).fetchall()
    return [row[0] for row in rows]


def sql_search_available(conn: psycopg.Connection) -> bool:
    """Whether SQL longembed.search() exists (it needs plpython3u; 020_embed.sql)."""
    row = conn.execute("SELECT to_regproc('longembed.search') IS NOT NULL").fetchone()
    return bool(row[0])


def evaluate(
    conn: psycopg.Connection,
    collection: Collection,
    dataset: Dataset,
    modes: Sequence[str],
    *,
    k: int = 10,
    via: str = "python",
    progress: bool = False,
    fresh_connection: Callable[[], psycopg.Connection] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per mode: mean nDCG@k, Recall@k, MRR@k over the dataset's queries and latency p50/p99 in ms.

    `fresh_connection`: run each mode on a new connection. For SQL search it matters: a backend keeps
    the query vectors it got from the host, so the second mode would be timed without embedding.
    """
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        with fresh_connection() if fresh_connection else contextlib.nullcontext(conn) as mode_conn:
            results[mode] = _evaluate_mode(mode_conn, collection, dataset, mode, k, via, progress)
    return results


def _evaluate_mode(
    conn: psycopg.Connection,
    collection: Collection,
    dataset: Dataset,
    mode: str,
    k: int,
    via: str,
    progress: bool,
) -> dict[str, Any]:
    from tqdm import tqdm

    queries = sorted(dataset.queries.items())
    run_query(conn, collection, mode, WARM_UP, k, via)
    ndcg, recall, mrr, latency = [], [], [], []
    for ident, text in tqdm(
        queries, desc=f"search {mode}", unit="query", disable=not progress, file=sys.stderr
    ):
        start = time.perf_counter()
        ranked = run_query(conn, collection, mode, text, k, via)
        latency.append((time.perf_counter() - start) * 1000)
        relevant = dataset.qrels[ident]
        ndcg.append(ndcg_at_k(ranked, relevant, k))
        recall.append(recall_at_k(ranked, relevant, k))
        mrr.append(mrr_at_k(ranked, relevant, k))
    return {
        f"ndcg@{k}": statistics.fmean(ndcg),
        f"recall@{k}": statistics.fmean(recall),
        f"mrr@{k}": statistics.fmean(mrr),
        "latency_ms": {"p50": _percentile(latency, 50), "p99": _percentile(latency, 99)},
        "queries": len(queries),
    }


def _percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (a value that was measured, not an interpolation)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100)
    return ordered[int(rank) - 1]


def table(results: dict[str, dict[str, Any]], k: int) -> str:
    """The results as a fixed-width text table, one row per mode."""
    lines = [
        f"{'mode':<10} {f'nDCG@{k}':>9} {f'Recall@{k}':>10} {f'MRR@{k}':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'queries':>8}"
    ]
    for mode, r in results.items():
        lines.append(
            f"{mode:<10} {r[f'ndcg@{k}']:>9.4f} {r[f'recall@{k}']:>10.4f} {r[f'mrr@{k}']:>8.4f} "
            f"{r['latency_ms']['p50']:>8.1f} {r['latency_ms']['p99']:>8.1f} {r['queries']:>8}"
        )
    return "\n".join(lines)
