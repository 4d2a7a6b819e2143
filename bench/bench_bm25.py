"""BM25 in PostgreSQL: query latency of longembed.search_bm25 and the cost of its statistics on ingest.

    .venv/bin/python bench/bench_bm25.py --dsn "$(longembed dsn --admin)" [--docs 10000 100000]

Per corpus size, in a scratch database: short documents (8..40 words cut from Python standard-library
docstrings: a real, skewed vocabulary) ingested through add_documents in batches of 1,000, once with the
statistics trigger and once, into a second collection, with it disabled (the peer: what ingest cost
before BM25), batch by batch in turn. Then `--queries` queries of 2..4 words drawn from the corpus,
k=10, each as one SQL statement: search_bm25 against the peer it replaces, ts_rank_cd over
documents.tsv with the same terms OR-ed (as BM25 matches) and AND-ed (websearch_to_tsquery, what
search_hybrid's text side used).
No model runs. Needs a superuser DSN (CREATE DATABASE, disabling the trigger).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import platform
import random
import statistics
import time
import uuid

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from longembed.plugin.db import connect
from longembed.plugin.migrate import migrate
from longembed.plugin.store.collections import create_collection
from longembed.plugin.store.documents import Document, add_documents

MODULES = ("json", "os", "re", "argparse", "collections", "pathlib", "subprocess", "logging", "email",
           "http.client", "sqlite3", "decimal", "difflib", "shutil", "tempfile", "typing", "inspect",
           "threading", "asyncio", "unittest", "xml.etree.ElementTree", "urllib.request")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class NoModel:
    """A collection's model description: BM25 needs no vectors."""

    name: str = "none"
    source: str = "none"
    revision: str = "r1"
    dim: int = 4
    max_tokens: int = 256
    architecture: str = "none"
    pooling: str = "mean"
    prefixes = {"query": "", "document": ""}  # noqa: RUF012 (read only)


def word_stream() -> list[str]:
    words = []
    for name in MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                words.extend(doc.split())
    return words


def short_documents(words: list[str], n: int, rng: random.Random) -> list[Document]:
    docs = []
    for i in range(n):
        length = rng.randint(8, 40)
        start = rng.randrange(len(words) - length)
        docs.append(Document(f"doc{i:07d}", " ".join(words[start : start + length]), {"shard": i % 10}))
    return docs


def ingest_both(conn: psycopg.Connection, n: int, docs: list[Document]) -> tuple[float, float]:
    """Seconds to ingest `docs` through add_documents in batches of 1,000 with the statistics trigger
    (collection bm25_<n>) and without it (plain_<n>), batch by batch in turn, the first of each pair
    alternating: run one whole ingest after the other, whichever ran first took ~2.5x longer per
    document (a cold server, a database growing from empty), which made the trigger look 6x dearer."""
    names = (f"bm25_{n}", f"plain_{n}")
    for name in names:
        create_collection(conn, name, NoModel())
    seconds = [0.0, 0.0]
    for k, i in enumerate(range(0, len(docs), 1000)):
        for j in (0, 1) if k % 2 == 0 else (1, 0):
            if j == 1:
                conn.execute("ALTER TABLE longembed.documents DISABLE TRIGGER bm25_statistics")
            try:
                started = time.perf_counter()
                add_documents(conn, names[j], docs[i : i + 1000])
                seconds[j] += time.perf_counter() - started
            finally:
                if j == 1:
                    conn.execute("ALTER TABLE longembed.documents ENABLE TRIGGER bm25_statistics")
    return seconds[0], seconds[1]


def latencies(conn: psycopg.Connection, statement: str, params: list[tuple]) -> list[float]:
    conn.execute(statement, params[0]).fetchall()  # warm the caches once
    out = []
    for p in params:
        started = time.perf_counter()
        conn.execute(statement, p).fetchall()
        out.append(time.perf_counter() - started)
    return out


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return (
        f"p50 {statistics.median(ms):.1f} ms, p99 {ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]:.1f} ms"
    )


def bench_size(
    conn: psycopg.Connection, words: list[str], n: int, n_queries: int, rng: random.Random
) -> None:
    docs = short_documents(words, n, rng)
    with_stats, without = ingest_both(conn, n, docs)
    conn.execute("VACUUM ANALYZE longembed.documents")
    conn.execute("VACUUM ANALYZE longembed.bm25_postings")
    conn.execute("VACUUM ANALYZE longembed.bm25_collection_deltas")
    (postings,) = conn.execute("SELECT count(*) FROM longembed.bm25_postings").fetchone()
    print(
        f"{n:,} docs: ingest {n / with_stats:,.0f} docs/s with the BM25 trigger, {n / without:,.0f} docs/s "
        f"without (x{with_stats / without:.2f} time); {postings:,} postings"
    )
    queries = []
    for _ in range(n_queries):
        doc = docs[rng.randrange(n)].text.split()
        queries.append(" ".join(rng.sample(doc, rng.randint(2, 4))))
    cid = conn.execute("SELECT id FROM longembed.collections WHERE name = %s", (f"bm25_{n}",)).fetchone()[0]
    rows = {
        "search_bm25": latencies(
            conn, "SELECT * FROM longembed.search_bm25(%s, %s, 10)", [(f"bm25_{n}", q) for q in queries]
        ),
        "ts_rank_cd, terms OR-ed": latencies(
            conn,
            """SELECT d.external_id FROM longembed.documents d,
                      to_tsquery('english', array_to_string(tsvector_to_array(to_tsvector('english', %s)),
                                 ' | ')) q
               WHERE d.collection_id = %s AND d.tsv @@ q ORDER BY ts_rank_cd(d.tsv, q) DESC, d.id LIMIT 10""",
            [(q, cid) for q in queries],
        ),
        "ts_rank_cd, websearch (AND)": latencies(
            conn,
            """SELECT d.external_id FROM longembed.documents d, websearch_to_tsquery('english', %s) q
               WHERE d.collection_id = %s AND d.tsv @@ q ORDER BY ts_rank_cd(d.tsv, q) DESC, d.id LIMIT 10""",
            [(q, cid) for q in queries],
        ),
    }
    for label, samples in rows.items():
        print(f"| {n:,} | {label} | {summary(samples)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("LONGEMBED_DSN"), required="LONGEMBED_DSN" not in os.environ
    )
    parser.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    name = f"longembed_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        (version,) = admin.execute("SELECT current_setting('server_version')").fetchone()
    try:
        with connect(make_conninfo(args.dsn, dbname=name)) as conn:
            migrate(conn)
            print(f"# {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
            print(f"# PostgreSQL {version}; k=10, {args.queries} queries of 2..4 words from the corpus")
            words = word_stream()
            rng = random.Random(0)
            for n in args.docs:
                bench_size(conn, words, n, args.queries, rng)
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
