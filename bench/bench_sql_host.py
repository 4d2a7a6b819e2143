"""SQL embed() and search() through the model host: first calls, backend memory, concurrency, latency.

Run against the embedded server with its host (`longembed up --http-port 0`, then this script with no
arguments), or any server whose `longembed.host` names a running host (`--dsn`). A scratch database is
created and dropped. Measured, each beside its peer in the same run:
- the first `embed()` on 20 fresh connections (the host holds the model; a backend that loaded its own
  took 0.9-2.8 s here) against a warm connection's `embed()` of a new text;
- a backend's resident memory after its first `embed()` against a backend that only ran `SELECT 1`;
- warm `embed()` of a short query (new texts: no cache hit) against encoding the same text in this
  process (`model.embed`), i.e. what the socket, JSON and PL/Python add;
- `longembed.search(collection, text, 10)` at --vectors synthetic vectors (clustered, HNSW m 16): one
  connection in a loop against 12 connections at once: total queries/s, p50 and p99.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from bench_ingest_search import load_vectors, synthetic_vectors
from psycopg import sql
from psycopg.conninfo import make_conninfo

from longembed.plugin.db import connect, register_vector_if_installed
from longembed.plugin.embedded.server import resolve_dsn
from longembed.plugin.migrate import migrate
from longembed.plugin.models import get_model


def ms(samples: list[float]) -> str:
    values = sorted(s * 1000 for s in samples)
    p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
    return f"p50 {statistics.median(values):.2f} ms, p99 {p99:.2f} ms"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def first_calls(dsn: str, n: int) -> None:
    firsts, idle_rss, used_rss = [], [], []
    for i in range(n):
        with psycopg.connect(dsn, autocommit=True) as idle:
            idle.execute("SELECT 1")
            idle_rss.append(rss_kib(idle.execute("SELECT pg_backend_pid()").fetchone()[0]))
        with psycopg.connect(dsn, autocommit=True) as fresh:
            pid = fresh.execute("SELECT pg_backend_pid()").fetchone()[0]
            t0 = time.perf_counter()
            fresh.execute("SELECT embed(%s)", (f"first question {i} {uuid.uuid4().hex}",)).fetchone()
            firsts.append(time.perf_counter() - t0)
            used_rss.append(rss_kib(pid))
    with psycopg.connect(dsn, autocommit=True) as warm:
        warm.execute("SELECT embed('warm up')").fetchone()
        warms = []
        for i in range(n):
            t0 = time.perf_counter()
            warm.execute("SELECT embed(%s)", (f"warm question {i} {uuid.uuid4().hex}",)).fetchone()
            warms.append(time.perf_counter() - t0)
    print(f"| first embed() on a fresh connection ({n}) | {ms(firsts)} |")
    print(f"| embed() of a new text on a warm connection ({n}) | {ms(warms)} |")
    grown = statistics.median(used_rss) - statistics.median(idle_rss)
    print(
        f"| backend resident memory, median | {statistics.median(used_rss) / 1024:.1f} MiB after embed(), "
        f"{statistics.median(idle_rss) / 1024:.1f} MiB after SELECT 1: +{grown / 1024:.1f} MiB |"
    )


def warm_latency(conn: psycopg.Connection, model, n: int) -> None:
    texts = [f"how do I reset my password, attempt {i}" for i in range(n)]
    model.embed(texts[:3], kind="query")
    sql_times, local_times = [], []
    for text in texts:
        t0 = time.perf_counter()
        conn.execute("SELECT embed(%s)", (text + " sql",)).fetchone()
        sql_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.embed([text + " local"], kind="query")
        local_times.append(time.perf_counter() - t0)
    ratio = statistics.median(sql_times) / statistics.median(local_times)
    print(f"| SQL embed(), short query, via the host ({n}) | {ms(sql_times)} |")
    print(f"| peer: model.embed() in this process ({n}) | {ms(local_times)} (SQL/peer {ratio:.2f}x) |")


def searches(dsn: str, collection: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    times: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        local = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT * FROM longembed.search(%s, 'warm up', 10)", (collection,)).fetchall()
            i = 0
            while time.monotonic() < stop:
                text = f"client {k} asks about feature {i} of the system"
                t0 = time.perf_counter()
                conn.execute("SELECT * FROM longembed.search(%s, %s, 10)", (collection, text)).fetchall()
                local.append(time.perf_counter() - t0)
                i += 1
        with lock:
            times.extend(local)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(times) / (time.perf_counter() - t0), times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=None, help="default: $LONGEMBED_DSN, else the embedded server")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=20, help="fresh connections / warm calls")
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    args = parser.parse_args()
    server_dsn = resolve_dsn(args, admin=True)  # it creates and drops a scratch database
    name = f"longembed_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        version = admin.execute("SELECT current_setting('server_version')").fetchone()[0]
    dsn = make_conninfo(server_dsn, dbname=name)
    try:
        model = get_model()
        with connect(dsn) as conn:
            migrate(conn)
            register_vector_if_installed(conn)  # the extension came with migrate
            print(f"# {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
            print(f"# PostgreSQL {version}, {model.info.name} ({model.info.device}, {model.info.dtype})")
            print("| measurement | result |\n|---|---|")
            first_calls(dsn, args.calls)
            warm_latency(conn, model, args.calls * 5)
            vectors, _ = synthetic_vectors("clustered", args.vectors, model.info.dim, seed=0)
            collection, _ = load_vectors(conn, model, "clustered", vectors)
        one_qps, one = searches(dsn, collection.name, 1, args.seconds)
        many_qps, many = searches(dsn, collection.name, 12, args.seconds)
        print(f"| search(), 1 connection, {args.vectors:,} vectors | {one_qps:.1f} queries/s, {ms(one)} |")
        print(
            f"| search(), 12 connections at once | {many_qps:.1f} queries/s in total "
            f"({many_qps / one_qps:.2f}x one connection), {ms(many)} |"
        )
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
