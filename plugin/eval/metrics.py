"""Ranking metrics at a cutoff, as BEIR and pytrec_eval define them.

`ranked` is a system's ranking of document ids, best first; `relevant` maps a document id to its graded
relevance (> 0 means relevant; ids absent from it are not relevant). Each function scores one query; the
caller averages over queries, counting a query with nothing retrieved as 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    """Normalised discounted cumulative gain with linear gains (trec_eval's ndcg_cut)."""
    gain = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(_unique(ranked)[:k]))
    ideal_gains = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal_gains))
    return gain / ideal if ideal > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    """Share of the relevant documents found in the first k."""
    wanted = {doc for doc, grade in relevant.items() if grade > 0}
    if not wanted:
        return 0.0
    return len(wanted.intersection(_unique(ranked)[:k])) / len(wanted)


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    """Reciprocal rank of the first relevant document within the first k (0 when none is there)."""
    for rank, doc in enumerate(_unique(ranked)[:k]):
        if relevant.get(doc, 0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def _unique(ranked: Sequence[str]) -> list[str]:
    # A document returned twice must not be counted twice (a buggy fusion could do that).
    return list(dict.fromkeys(ranked))
