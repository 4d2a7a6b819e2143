"""pgvector HNSW (SQL) against the model host's hnswlib fast path, in process and over HTTP, at matched
recall@10, on --vectors vectors of 384 dimensions (one chunk per document, so documents = vectors).

Datasets: "clustered" synthetic vectors (bench_ingest_search.synthetic_vectors: low intrinsic dimension,
like text embeddings) and "real": MiniLM embeddings of prose lines this machine ships
(bench/real_texts.py; cached), queries being held-out lines embedded as queries. Recall@10 is measured
against exact search (numpy over the same vectors). For each path ef rises through --ef until recall@10
reaches --target; QPS is one client, one query at a time (1 / mean latency).

Paths, each with k=10 documents:
- pgvector, SQL: `longembed.search_vector` (store.search_by_vector: candidates, best chunk per document,
  the documents' rows), and the bare index statement `ORDER BY embedding <=> q LIMIT 10`;
- hnswlib in process: the host's FastPath.search (hnswlib candidates, best chunk per document, scores and
  rows from the host's memory: no PostgreSQL), and hnswlib's knn_query alone;
- over HTTP, to a `longembed serve --hnsw` subprocess: `POST /v1/search` with the query vector, through
  pgvector (`"index": "pgvector"`) and through hnswlib (no database on that path);
- end to end over HTTP: `POST /v1/search` with the query text (the host embeds it, then searches), through
  each index at the ef it needed for the target with vectors; beside it `POST /v1/embeddings` of the same
  text alone. On real data the recall is measured; on clustered vectors (not MiniLM's space) only the time,
  with the real-data query texts.
The collection searches in mode "chunks" (the best chunk per document: what the fast path mirrors).

Usage: python bench/bench_hnsw.py --dsn postgresql://... [--vectors 100000] [--queries 300]
A fresh database `longembed_bench_<random>` is made on that server and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import numpy as np
import psycopg
from bench_ingest_search import load_vectors, synthetic_vectors
from psycopg import sql
from psycopg.conninfo import make_conninfo
from real_texts import real_vectors

from longembed.plugin.db import connect
from longembed.plugin.migrate import migrate
from longembed.plugin.models import get_model
from longembed.plugin.service.fastpath import HNSWLIB, PGVECTOR, FastPath
from longembed.plugin.store.collections import get_collection
from longembed.plugin.store.search import search_by_vector

EFS = [10, 16, 24, 32, 40, 64, 100, 150, 200, 300, 400, 600, 800]
notes: list[str] = []  # memory of the held rows, per dataset


def stats(times: list[float]) -> tuple[float, float, float]:
    ms = sorted(t * 1000 for t in times)
    return (
        len(ms) / (sum(ms) / 1000),
        statistics.median(ms),
        ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
    )


def sweep(
    label: str, run: Callable[[np.ndarray, int], list[int]], queries: np.ndarray, truth: np.ndarray, args
) -> list[str]:
    """Raise ef until recall@10 >= target; rows for ef 40 (the default) and the matched point."""
    rows = []
    for ef in args.ef:
        for q in queries[:20]:  # warm up
            run(q, ef)
        times, hits = [], 0
        for q, t in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            found = run(q, ef)
            times.append(time.perf_counter() - t0)
            hits += len(set(found[:10]) & set(t.tolist()))
        recall = hits / (10 * len(queries))
        qps, p50, p99 = stats(times)
        line = f"| {label} | {ef} | {recall:.3f} | {qps:,.0f} | {p50:.2f} | {p99:.2f} |"
        if ef == 40 or recall >= args.target:
            rows.append(line + (" **matched**" if recall >= args.target else ""))
            print(rows[-1], flush=True)
        if recall >= args.target:
            return rows
    rows.append(f"| {label} | - | target {args.target} not reached up to ef {args.ef[-1]} | | | |")
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_to_end(label: str, run: Callable[[str], object], texts: list[str], truth, ef: int | None) -> str:
    """One query text at a time: latency, and recall@10 where `truth` is given."""
    for text in texts[:20]:  # warm up
        run(text)
    times, hits = [], 0
    for i, text in enumerate(texts):
        t0 = time.perf_counter()
        found = run(text)
        times.append(time.perf_counter() - t0)
        if truth is not None:
            hits += len(set(found[:10]) & set(truth[i].tolist()))
    qps, p50, p99 = stats(times)
    recall = f"{hits / (10 * len(texts)):.3f}" if truth is not None else "-"
    line = f"| {label} | {ef if ef is not None else ''} | {recall} | {qps:,.0f} | {p50:.2f} | {p99:.2f} |"
    print(line, flush=True)
    return line


def deep_size(held: dict) -> int:
    """Bytes of a dict of tuples of ints, strs and bools, each object once (small ints are shared)."""
    seen: set[int] = set()
    total = 0
    stack: list[object] = [held]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, tuple):
            stack.extend(obj)
    return total


def bench_dataset(
    dsn: str, kind: str, base: np.ndarray, queries: np.ndarray, texts: list[str], with_recall: bool, args
) -> list[str]:
    model = get_model()
    rows = [f"| **{kind}** ({len(base):,} x {base.shape[1]}, load {os.getloadavg()[0]:.1f}) | | | | | |"]
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    with connect(dsn) as conn, tempfile.TemporaryDirectory() as tmp:
        collection, ids = load_vectors(conn, model, f"bench-{kind}", base)
        conn.execute(
            "UPDATE longembed.collections SET search_mode = 'chunks' WHERE id = %s", (collection.id,)
        )
        collection = get_collection(conn, collection.name)
        row_of = {doc_id: i for i, doc_id in enumerate(ids)}
        index_sql = sql.SQL("SELECT document_id FROM {} ORDER BY embedding <=> %s LIMIT 10").format(
            collection.chunk_table
        )

        def pg_index(q: np.ndarray, ef: int) -> list[int]:
            conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef),))
            return [row_of[r[0]] for r in conn.execute(index_sql, (q,))]

        def pg_search(q: np.ndarray, ef: int) -> list[int]:
            return [int(r.external_id[1:]) for r in search_by_vector(conn, collection, q, 10, ef_search=ef)]

        host = None
        try:
            rows += sweep("pgvector: `longembed.search_vector` (SQL)", pg_search, queries, truth, args)
            rows += sweep("pgvector: bare index statement (SQL)", pg_index, queries, truth, args)
            conn.execute("RESET hnsw.ef_search")

            fast = FastPath(dsn, (collection.name,), Path(tmp) / "inproc")
            t0 = time.perf_counter()
            fast.start()
            fast.wait_ready(collection.name, 1800)
            print(f"{kind}: in-process hnswlib index built in {time.perf_counter() - t0:.1f} s", flush=True)

            def fast_search(q: np.ndarray, ef: int) -> list[int]:
                return [int(r.external_id[1:]) for r in fast.search(collection, q, 10, ef_search=ef)]

            index = fast.index(collection.name).index

            def knn(q: np.ndarray, ef: int) -> list[int]:
                index.set_ef(ef)
                labels, _ = index.knn_query(q, k=10, num_threads=1)
                return [row_of[int(label) >> 24] for label in labels[0]]

            rows += sweep("hnswlib in process: FastPath.search (rows in memory, no PostgreSQL)", fast_search,
                          queries, truth, args)  # fmt: skip
            rows += sweep("hnswlib in process: knn_query alone", knn, queries, truth, args)
            held = fast.index(collection.name)
            n_chunks, held_bytes = len(held.rows), deep_size(held.rows) + deep_size(held.documents)
            fast.stop()  # saves
            saved = next(Path(tmp, "inproc").glob("c*/rows.npz")).stat().st_size
            memory = (
                f"rows held beside the index: {held_bytes / 2**20:.1f} MiB for {n_chunks:,} chunks "
                f"({held_bytes / max(n_chunks, 1):.0f} bytes per chunk and its document; snippets of "
                f"{len(next(iter(held.rows.values()))[2])} characters here); rows.npz {saved / 2**20:.1f} MiB"
            )
            print(f"# {kind}: {memory}", flush=True)
            notes.append(f"{kind}: {memory}")

            # The HTTP host builds its own index now (a subprocess: its own GIL and threads).
            port = free_port()
            host = subprocess.Popen(
                [sys.executable, "-m", "longembed.plugin.cli", "serve", "--dsn", dsn, "--port", str(port),
                 "--no-worker", "--hnsw", collection.name, "--hnsw-dir", f"{tmp}/host"],
                stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/host.log", "w"),  # noqa: SIM115
            )  # fmt: skip
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
            deadline = time.monotonic() + 1800
            while True:  # until the host answers from its index
                try:
                    body = {"collection": collection.name, "vector": queries[0].tolist()}
                    if client.post("/v1/search", json=body).json().get("index") == HNSWLIB:
                        break
                except httpx.HTTPError:
                    pass
                assert host.poll() is None and time.monotonic() < deadline, Path(
                    f"{tmp}/host.log"
                ).read_text()
                time.sleep(1)

            times = []
            for _ in range(len(queries)):
                t0 = time.perf_counter()
                client.get("/health")
                times.append(time.perf_counter() - t0)
            qps, p50, p99 = stats(times)
            rows.append(
                f"| (HTTP floor: `GET /health` on the same host) | | | {qps:,.0f} | {p50:.2f} | {p99:.2f} |"
            )
            print(rows[-1], flush=True)

            def http_search(q: np.ndarray, ef: int, index: str) -> list[int]:
                body = {"collection": collection.name, "vector": q.tolist(), "k": 10, "ef_search": ef,
                        "index": "pgvector" if index == PGVECTOR else "auto"}  # fmt: skip
                answer = client.post("/v1/search", json=body).json()
                assert answer["index"] == index, answer
                return [int(r["external_id"][1:]) for r in answer["data"]]

            matched = {}
            for index_name, label in ((PGVECTOR, "pgvector"), (HNSWLIB, "hnswlib")):
                title = f"{label} over HTTP: `POST /v1/search` with the vector"
                found = sweep(title, lambda q, ef, i=index_name: http_search(q, ef, i), queries, truth, args)
                rows += found
                matched[index_name] = int(found[-1].split("|")[2]) if "matched" in found[-1] else args.ef[-1]

            def embed_only(text: str) -> None:
                answer = client.post("/v1/embeddings", json={"input": text, "kind": "query"})
                assert answer.status_code == 200, answer.text

            rows.append(
                end_to_end("`POST /v1/embeddings` of the query text alone", embed_only, texts, None, None)
            )
            for index_name, label in ((PGVECTOR, "pgvector"), (HNSWLIB, "hnswlib")):
                ef = matched[index_name]

                def text_search(text: str, ef: int = ef, index: str = index_name) -> list[int]:
                    body = {"collection": collection.name, "query": text, "k": 10, "ef_search": ef,
                            "index": "pgvector" if index == PGVECTOR else "auto"}  # fmt: skip
                    answer = client.post("/v1/search", json=body).json()
                    assert answer["index"] == index, answer
                    return [int(r["external_id"][1:]) for r in answer["data"]]

                title = f"end to end over HTTP, {label}: `POST /v1/search` with the text (embed + search)"
                rows.append(end_to_end(title, text_search, texts, truth if with_recall else None, ef))
        finally:
            if host is not None:
                host.terminate()
                host.wait(timeout=60)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("LONGEMBED_DSN"), required="LONGEMBED_DSN" not in os.environ
    )
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--real", type=int, default=None, help="real vectors (default --vectors)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--ef", type=int, nargs="+", default=EFS)
    parser.add_argument("--datasets", nargs="+", choices=("clustered", "real"), default=["clustered", "real"])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/longembed-real"))
    args = parser.parse_args()

    name = f"longembed_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        versions = admin.execute(
            "SELECT current_setting('server_version'), "
            "(SELECT default_version FROM pg_available_extensions WHERE name = 'vector'), "
            "current_setting('shared_buffers')"
        ).fetchone()
    dsn = make_conninfo(args.dsn, dbname=name)
    try:
        with connect(dsn) as conn:
            migrate(conn)
        print(f"# {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()}")
        print(
            f"# PostgreSQL {versions[0]} (shared_buffers {versions[2]}), pgvector {versions[1]}, "
            f"hnswlib {metadata.version('hnswlib')}, numpy {np.__version__}, psycopg {psycopg.__version__}"
        )
        rows = ["| path | ef | recall@10 | QPS | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for kind in args.datasets:
            # The query texts: real data's own; clustered vectors (not MiniLM's space) get the same texts
            # for the end-to-end timing alone.
            _, real_queries, texts = real_vectors(args.real or args.vectors, args.cache)
            if kind == "clustered":
                base, queries = synthetic_vectors("clustered", args.vectors, 384, seed=1)
            else:
                base, queries = real_vectors(args.real or args.vectors, args.cache)[0], real_queries
            rows += bench_dataset(
                dsn, kind, base, queries[: args.queries], texts[: args.queries], kind == "real", args
            )
        print(f"# load average at the end {os.getloadavg()}")
        print("\n".join(rows))
        print("\n".join(f"# {note}" for note in notes))
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
