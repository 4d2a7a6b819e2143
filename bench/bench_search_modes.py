"""SQL latency of every search mode on one collection, the best chunk alone (`chunks`) as the peer.

    longembed eval ~/.cache/longembed/devsets/long --keep          # prints the kept collection's name
    .venv/bin/python bench/bench_search_modes.py --dsn "$(longembed dsn)" -c eval_... \\
        --queries ~/.cache/longembed/devsets/long/queries.jsonl [--k 10] [--rounds 2]

Query vectors are embedded once, before timing (the model's cost is bench_cpu_encode.py's); each query
is one `longembed.search_modes` statement over the same connection. The modes take turns in every round
(best round's p50 kept), so a change in the load of this shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from psycopg import sql

from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.store.collections import get_collection
from longembed.plugin.store.search import embed_query

MODES = ("chunks", "dense", "lexical", "hybrid", "auto")
STATEMENT = "SELECT count(*) FROM longembed.search_modes(%s, %s, %s, %s, p_mode => %s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("-c", "--collection", required=True)
    parser.add_argument(
        "--queries", type=Path, required=True, help="BEIR queries.jsonl ({'text': ...} per line)"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    texts = [json.loads(line)["text"] for line in args.queries.read_text().splitlines() if line.strip()]
    with connect(args.dsn) as conn:
        collection = get_collection(conn, args.collection)
        model = get_model(collection.model_source)
        vectors = [embed_query(collection, text, model) for text in texts]
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for mode in MODES:
                seconds = []
                for text, vector in zip(texts, vectors, strict=True):
                    t0 = time.perf_counter()
                    conn.execute(STATEMENT, (collection.name, text, vector, args.k, mode)).fetchall()
                    seconds.append(time.perf_counter() - t0)
                if mode not in times or statistics.median(seconds) < statistics.median(times[mode]):
                    times[mode] = sorted(seconds)
        (chunks, docs, version) = conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {}), "
                "(SELECT count(*) FROM longembed.documents WHERE collection_id = %s), "
                "current_setting('server_version')"
            ).format(collection.chunk_table),
            (collection.id,),
        ).fetchone()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, PostgreSQL {version}; load {os.getloadavg()[0]:.2f}; "
        f"collection {collection.name}: {docs} documents, {chunks} chunks; {len(texts)} queries, k {args.k}; "
        f"auto = {collection.auto_fusion and collection.auto_fusion.get('weights')}"
    )
    peer = statistics.median(times["chunks"])
    print(f"{'mode':<8} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs chunks':>14}")
    for mode in MODES:
        t = times[mode]
        p50, p99 = statistics.median(t), t[min(len(t) - 1, int(0.99 * len(t)))]
        print(f"{mode:<8} {1000 * p50:>8.1f} {1000 * p99:>8.1f} {p50 / peer:>13.2f}x")


if __name__ == "__main__":
    main()
