"""Ingest throughput and search latency/recall of longembed on PostgreSQL + pgvector.

Part 1, ingest: real texts (docstrings of the standard library) through add_documents + the worker with
the bundled MiniLM: documents/s end to end and the share of time spent in the database (upsert, claim,
COPY of vectors, bookkeeping) against embedding.

Part 2, search at --vectors (default 100k) vectors of 384 dimensions. The vectors are SYNTHETIC
(embedding 100k real texts would take this CPU most of an hour), two kinds (see synthetic_vectors):
uniform random on the sphere (the worst case for a graph index) and clustered with low intrinsic
dimension (closer to text embeddings). Queries come from the same distribution and are not in the table.
Recall@10 is measured against exact search (numpy brute force over the same vectors).
- index alone: the bare `ORDER BY embedding <=> q LIMIT 10` statement on the chunk table;
- store.search() with a query vector (= SQL longembed.search_vector: best chunk per document, join,
  snippet);
- end to end from Python: store.search() with query text (includes embedding the query);
- end to end from SQL: `SELECT * FROM longembed.search(collection, text, 10)` (PL/Python embeds the
  query in the backend), where that function is installed (server with plpython3u).

Usage: python bench/bench_ingest_search.py --dsn postgresql://... [--vectors 100000] [--queries 300]
A fresh database `longembed_bench_<random>` is created on that server and dropped at the end.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from longembed.plugin.db import connect, register_vector_if_installed
from longembed.plugin.migrate import migrate
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker, WorkerConfig
from longembed.plugin.store.collections import create_collection
from longembed.plugin.store.documents import Document, add_documents
from longembed.plugin.store.search import search

MODULES = [
    "json",
    "os",
    "re",
    "argparse",
    "collections",
    "functools",
    "itertools",
    "pathlib",
    "subprocess",
    "textwrap",
    "dataclasses",
    "logging",
    "email",
    "urllib.parse",
    "sqlite3",
    "csv",
    "decimal",
    "statistics",
    "difflib",
    "shutil",
    "tempfile",
    "asyncio",
    "typing",
    "inspect",
    "threading",
]


def corpus(n: int) -> list[Document]:
    texts = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 200:
                texts.append((f"{name}.{attr}", doc))
    texts = sorted(dict(texts).items())
    return [Document(ident, text, {"module": ident.split(".")[0]}) for ident, text in texts[:n]]


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"


def bench_ingest(conn: psycopg.Connection, model, n_docs: int, batch_tokens: int) -> dict:
    docs = corpus(n_docs)
    collection = create_collection(conn, "ingest", model.info)
    model.embed(["warm up the model"])
    t0 = time.perf_counter()
    add_documents(conn, collection, docs)
    upsert_seconds = time.perf_counter() - t0
    stats = Worker(conn, model, WorkerConfig(batch_tokens=batch_tokens)).drain()
    total = time.perf_counter() - t0
    (chunks,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(collection.chunk_table)).fetchone()
    db_seconds = upsert_seconds + stats.db_seconds
    return {
        "documents": len(docs),
        "chunks": chunks,
        "tokens": stats.tokens,
        "seconds": total,
        "docs_per_s": len(docs) / total,
        "tokens_per_s": stats.tokens / total,
        "embed_seconds": stats.embed_seconds,
        "db_seconds": db_seconds,
        "db_share": db_seconds / total,
        "other_share": (total - db_seconds - stats.embed_seconds) / total,
        "batches": stats.batches,
    }


def synthetic_vectors(
    kind: str, n: int, dim: int, seed: int, latent: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """n base vectors and 1,000 queries from the same distribution (queries are not in the base set).

    "random": uniform on the unit sphere in `dim` dimensions: no neighbourhood structure at all, the
    worst case for any graph index and unlike what an embedding model produces.
    "clustered": low intrinsic dimension like text embeddings: points around 1,000 cluster centres in a
    `latent`-dimensional space (clusters overlap: the spread within a cluster equals the spread of the
    centres), mapped into `dim` dimensions by a fixed random linear map, plus a little isotropic noise.
    """
    rng = np.random.default_rng(seed)
    if kind == "random":
        v = rng.standard_normal((n + 1000, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v[:n], v[n:]
    centres = rng.standard_normal((1000, latent)).astype(np.float32)
    mapping = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)

    def draw(m: int) -> np.ndarray:
        z = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, latent)).astype(np.float32)
        v = z @ mapping + 0.02 * rng.standard_normal((m, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return draw(n), draw(1000)


def load_vectors(conn: psycopg.Connection, model, name: str, vectors: np.ndarray) -> tuple[object, list[int]]:
    """Collection `name` with one document and one chunk per vector; index built after the load."""
    collection = create_collection(conn, name, model.info)
    index = sql.Identifier("longembed", f"chunks_{collection.id}_embedding_idx")
    t0 = time.perf_counter()
    conn.execute(sql.SQL("DROP INDEX {}").format(index))  # bulk load first, then build: much faster
    with conn.transaction():
        ids = [
            r[0]
            for r in conn.execute(
                """INSERT INTO longembed.documents (collection_id, external_id, text, content_hash, status)
                   SELECT %s, 'v' || g, 'synthetic vector ' || g, sha256(g::text::bytea), 'embedded'
                   FROM generate_series(0, %s - 1) g ORDER BY g RETURNING id""",
                (collection.id, len(vectors)),
            ).fetchall()
        ]
        copy_sql = sql.SQL(
            "COPY {} (document_id, ordinal, char_start, char_end, n_tokens, embedding) "
            "FROM STDIN (FORMAT BINARY)"
        ).format(collection.chunk_table)
        with conn.cursor().copy(copy_sql) as copy:
            copy.set_types(["int8", "int4", "int4", "int4", "int4", "vector"])
            for doc_id, vector in zip(ids, vectors, strict=True):
                copy.write_row((doc_id, 0, 0, 10, 3, vector))
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    conn.execute("SET maintenance_work_mem = '1GB'")
    conn.execute(
        sql.SQL(
            "CREATE INDEX {} ON {} USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = 16, ef_construction = 64)"
        ).format(sql.Identifier(f"chunks_{collection.id}_embedding_idx"), collection.chunk_table)
    )
    conn.execute(sql.SQL("ANALYZE {}").format(collection.chunk_table))
    build_seconds = time.perf_counter() - t0
    print(
        f"{name}: loaded {len(vectors):,} vectors in {load_seconds:.1f} s, HNSW build {build_seconds:.1f} s"
    )
    return collection, ids


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def bench_index(conn, collection, ids, vectors, queries, ef_values) -> list[str]:
    """Latency and recall@10 of the bare index statement and of store.search() with a query vector."""
    lines = []
    row_of_id = {doc_id: i for i, doc_id in enumerate(ids)}
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    index_sql = sql.SQL("SELECT document_id FROM {} ORDER BY embedding <=> %s LIMIT 10").format(
        collection.chunk_table
    )
    label = collection.name
    for ef in ef_values:
        conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef),))
        for q in queries[:20]:  # warm the index into shared buffers
            conn.execute(index_sql, (q,)).fetchall()
        times, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            rows = conn.execute(index_sql, (q,)).fetchall()
            times.append(time.perf_counter() - t0)
            found.append([row_of_id[r[0]] for r in rows])
        lines.append(
            f"| {label} | index alone (SQL statement), ef_search {ef} | {percentiles(times)} "
            f"| {recall(found, truth):.3f} |"
        )
        times, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            results = search(conn, collection, q, k=10, ef_search=ef)
            times.append(time.perf_counter() - t0)
            found.append([int(r.external_id[1:]) for r in results])
        lines.append(
            f"| {label} | longembed.plugin.store.search(vector) = longembed.search_vector, ef_search {ef} "
            f"| {percentiles(times)} | {recall(found, truth):.3f} |"
        )
    conn.execute("RESET hnsw.ef_search")
    (plan,) = conn.execute(
        sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + index_sql, (queries[0],)
    ).fetchone()
    top = plan[0]["Plan"]
    lines.append(
        f"| {label} | (one index query at ef_search 40: {top['Shared Hit Blocks']} buffers hit, "
        f"{top['Shared Read Blocks']} read from outside shared_buffers) | | |"
    )
    exact_times = []
    with conn.transaction():
        conn.execute("SET LOCAL enable_indexscan = off")
        for q in queries[:20]:
            t0 = time.perf_counter()
            conn.execute(index_sql, (q,)).fetchall()
            exact_times.append(time.perf_counter() - t0)
    lines.append(
        f"| {label} | exact search in PostgreSQL (index off, 20 queries) | {percentiles(exact_times)} | 1 |"
    )
    return lines


def bench_end_to_end(conn, model, collection, n_queries: int) -> list[str]:
    """Query text in, ranked documents out (recall as the index: the query vector is deterministic)."""
    lines = []
    label = collection.name
    texts = [f"how do I configure feature number {i} of the system" for i in range(n_queries)]
    model.embed(texts[:5], kind="query")
    times, embed_times = [], []
    for text in texts:
        t0 = time.perf_counter()
        model.embed([text], kind="query")
        embed_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        search(conn, collection, text, k=10, model=model)
        times.append(time.perf_counter() - t0)
    lines.append(f"| {label} | end to end, Python: store.search(text) | {percentiles(times)} | as index |")
    lines.append(f"| {label} | (embedding the query alone, Python) | {percentiles(embed_times)} | |")
    if conn.execute("SELECT to_regproc('longembed.search') IS NOT NULL").fetchone()[0]:
        statement = "SELECT * FROM longembed.search(%s, %s, 10)"
        conn.execute(statement, (collection.name, "warm up the backend's model")).fetchall()
        times = []
        for text in texts:
            t0 = time.perf_counter()
            conn.execute(statement, (collection.name, text)).fetchall()
            times.append(time.perf_counter() - t0)
        lines.append(
            f"| {label} | end to end, SQL: longembed.search(text) | {percentiles(times)} | as index |"
        )
    else:
        lines.append(f"| {label} | end to end, SQL | not measured: no longembed.search() (no plpython3u) | |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("LONGEMBED_DSN"), required="LONGEMBED_DSN" not in os.environ
    )
    parser.add_argument("--docs", type=int, default=400, help="documents for the ingest part")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--ef", type=int, nargs="+", default=[40, 100])
    parser.add_argument(
        "--datasets", nargs="+", choices=("random", "clustered"), default=["random", "clustered"]
    )
    parser.add_argument("--e2e-queries", type=int, default=100, help="text queries for the end-to-end rows")
    args = parser.parse_args()

    name = f"longembed_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        versions = admin.execute(
            "SELECT current_setting('server_version'), "
            "(SELECT default_version FROM pg_available_extensions WHERE name = 'vector'), "
            "current_setting('shared_buffers')"
        ).fetchone()
    try:
        with connect(make_conninfo(args.dsn, dbname=name)) as conn:
            migrate(conn)
            register_vector_if_installed(conn)
            model = get_model()
            print(f"# {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
            print(
                f"# PostgreSQL {versions[0]} (shared_buffers {versions[2]}), pgvector {versions[1]}, "
                f"{model.info.name} ({model.info.device}, {model.info.dtype})"
            )
            ing = bench_ingest(conn, model, args.docs, args.batch_tokens)
            print(
                f"ingest: {ing['documents']} docs ({ing['chunks']} chunks, {ing['tokens']:,} tokens) in "
                f"{ing['seconds']:.1f} s = {ing['docs_per_s']:.1f} docs/s, "
                f"{ing['tokens_per_s']:,.0f} tokens/s; "
                f"database {100 * ing['db_share']:.1f}% of the time, embedding "
                f"{100 * ing['embed_seconds'] / ing['seconds']:.1f}%, other {100 * ing['other_share']:.1f}%"
            )
            print(
                f"| data | search path (k=10, {args.vectors:,} vectors, {args.queries} queries) | latency "
                "| recall@10 |"
            )
            print("|---|---|---|---|")
            for kind in args.datasets:
                vectors, queries = synthetic_vectors(kind, args.vectors, model.info.dim, seed=0)
                collection, ids = load_vectors(conn, model, kind, vectors)
                for line in bench_index(conn, collection, ids, vectors, queries[: args.queries], args.ef):
                    print(line, flush=True)
            for line in bench_end_to_end(conn, model, collection, args.e2e_queries):
                print(line, flush=True)
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
