"""Data commands: migrate, collection create|list|drop, ingest, search, worker."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

import psycopg

from longembed.encoder.chunking import DEFAULT_CHUNK_TOKENS
from longembed.plugin import db
from longembed.plugin.embedded.server import resolve_dsn
from longembed.plugin.store.collections import CollectionNotFound

EXIT_ERROR = 1  # inputs skipped or documents failed
EXIT_USAGE = 2  # bad arguments, unknown collection, no database


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands; each sets `run=callable(args) -> int`."""
    p = sub.add_parser("migrate", help="create or upgrade schema longembed in the database")
    _dsn_option(p)
    p.set_defaults(run=_cmd_migrate)

    p = sub.add_parser("collection", help="create, list or drop collections")
    csub = p.add_subparsers(dest="collection_command", required=True, metavar="ACTION")
    c = csub.add_parser("create", help="create a collection (model, chunking, index parameters)")
    c.add_argument("name")
    _collection_options(c)
    _dsn_option(c)
    c.set_defaults(run=_cmd_collection_create)
    c = csub.add_parser("list", help="list collections with document counts")
    c.add_argument("--json", action="store_true", help="print JSON")
    _dsn_option(c)
    c.set_defaults(run=_cmd_collection_list)
    c = csub.add_parser("drop", help="drop a collection with its documents and vectors")
    c.add_argument("name")
    c.add_argument("--if-exists", action="store_true", help="no error when it does not exist")
    _dsn_option(c)
    c.set_defaults(run=_cmd_collection_drop)

    p = sub.add_parser("ingest", help="add files, folders, JSONL or stdin to a collection and embed them")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, folders, or - for stdin")
    p.add_argument("--collection", "-c", required=True)
    p.add_argument(
        "--format",
        choices=("auto", "text", "jsonl"),
        default="auto",
        help="auto: .jsonl/.ndjson are JSONL, other files and stdin text",
    )
    p.add_argument("--create", action="store_true", help="create the collection when it does not exist")
    p.add_argument("--no-wait", action="store_true", help="only queue the documents; a worker embeds them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _collection_options(p)
    _worker_options(p)
    _dsn_option(p)
    p.set_defaults(run=_cmd_ingest)

    p = sub.add_parser("search", help="top-k documents of a collection for a query")
    p.add_argument("collection")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10, help="number of documents (default 10)")
    p.add_argument("--filter", help='metadata the documents must contain, as JSON: \'{"lang": "en"}\'')
    p.add_argument("--hybrid", action="store_true", help="fuse with full-text ranking (RRF)")
    p.add_argument("--ef-search", type=int, help="HNSW ef_search for this query (recall vs speed)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _dsn_option(p)
    p.set_defaults(run=_cmd_search)

    p = sub.add_parser("worker", help="embed queued documents (runs until SIGTERM, or --once)")
    p.add_argument("--collection", "-c", action="append", help="only these collections (repeatable)")
    p.add_argument("-n", "--processes", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--once", action="store_true", help="exit when nothing is ready instead of polling")
    p.add_argument("--model", help="model to load (default: the bundled one)")
    _worker_options(p)
    _dsn_option(p)
    p.set_defaults(run=_cmd_worker)


def _dsn_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dsn", help="PostgreSQL connection string (default: $LONGEMBED_DSN, else the embedded server)"
    )


def _collection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("collection settings (create)")
    g.add_argument("--model", dest="model", help="model name or folder (default: the bundled MiniLM)")
    g.add_argument("--mode", choices=("full", "chunk", "late"), default="chunk")
    g.add_argument(
        "--chunk-tokens",
        type=int,
        help=f"tokens per chunk (default: {DEFAULT_CHUNK_TOKENS}, or what fits next to the document prefix)",
    )
    g.add_argument("--overlap", type=int, default=32, help="tokens shared by neighbouring chunks")
    g.add_argument("--distance", choices=("cosine", "l2", "ip"), default="cosine")
    g.add_argument("--hnsw-m", type=int, default=16)
    g.add_argument("--hnsw-ef-construction", type=int, default=64)
    g.add_argument("--query-prefix", help="text put before queries (default: the model's)")
    g.add_argument("--document-prefix", help="text put before documents (default: the model's)")
    g.add_argument("--text-search-config", default="english", help="PostgreSQL text search configuration")


def _worker_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("worker settings")
    g.add_argument("--batch-tokens", type=int, default=16384, help="tokens per batch and write transaction")
    g.add_argument("--lease-seconds", type=float, default=600.0, help="how long a claimed batch is ours")
    g.add_argument("--max-attempts", type=int, default=5, help="tries before a document is parked as failed")


def _errors_to_exit_codes(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected failures print one line on stderr (no traceback) and exit with EXIT_USAGE."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (CollectionNotFound, ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except psycopg.OperationalError as exc:
            print(f"error: cannot reach the database: {str(exc).strip()}", file=sys.stderr)
            return EXIT_USAGE

    return run


def _connect(args: argparse.Namespace, *, schema: bool = True, admin: bool = False) -> psycopg.Connection:
    conn = db.connect(resolve_dsn(args, admin=admin))
    if schema:
        try:
            db.require_vector(conn)
        except BaseException:
            conn.close()
            raise
    return conn


@_errors_to_exit_codes
def _cmd_migrate(args: argparse.Namespace) -> int:
    from longembed.plugin.migrate import migrate

    with _connect(args, schema=False, admin=True) as conn:
        report = migrate(conn)
    for name in report.applied:
        print(f"applied {name}")
    if not report.applied:
        print(f"schema longembed is up to date ({len(report.already_applied)} migrations applied before)")
    print(f"functions: {', '.join(report.functions) or 'none'}")
    for line in report.skipped:
        print(f"notice: skipped {line}", file=sys.stderr)
    for line in report.notices:
        print(f"notice: {line}", file=sys.stderr)
    return 0


def _create_from_args(conn: psycopg.Connection, name: str, args: argparse.Namespace):
    from longembed.plugin.models import get_model
    from longembed.plugin.store.collections import create_collection

    return create_collection(
        conn,
        name,
        get_model(args.model),
        mode=args.mode,
        chunk_tokens=args.chunk_tokens,
        overlap=args.overlap,
        query_prefix=args.query_prefix,
        document_prefix=args.document_prefix,
        distance=args.distance,
        hnsw_m=args.hnsw_m,
        hnsw_ef_construction=args.hnsw_ef_construction,
        text_search_config=args.text_search_config,
    )


@_errors_to_exit_codes
def _cmd_collection_create(args: argparse.Namespace) -> int:
    from longembed.plugin.store.collections import validate_name

    validate_name(args.name)  # before loading a model
    with _connect(args) as conn:
        collection = _create_from_args(conn, args.name, args)
    print(
        f"created collection {collection.name}: {collection.model_name} ({collection.dim}-d), "
        f"mode {collection.mode}, {collection.chunk_tokens} tokens per chunk, {collection.distance}"
    )
    return 0


@_errors_to_exit_codes
def _cmd_collection_list(args: argparse.Namespace) -> int:
    from longembed.plugin.store.collections import collection_stats, list_collections

    with _connect(args) as conn:
        rows = [(c, collection_stats(conn, c)) for c in list_collections(conn)]
    if args.json:
        out = [
            {
                **{k: v for k, v in asdict(c).items() if k != "created_at"},
                "created_at": c.created_at.isoformat(),
                **stats,
            }
            for c, stats in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    if not rows:
        print("no collections (create one with `longembed collection create NAME` or `ingest --create`)")
        return 0
    print(
        f"{'name':<20} {'model':<40} {'dim':>5} {'mode':<6} {'docs':>8} {'queued':>7} {'failed':>7} "
        f"{'chunks':>8}"
    )
    for c, s in rows:
        print(
            f"{c.name:<20} {c.model_name[:40]:<40} {c.dim:>5} {c.mode:<6} {s['documents']:>8} "
            f"{s['queued']:>7} {s['failed']:>7} {s['chunks']:>8}"
        )
    return 0


@_errors_to_exit_codes
def _cmd_collection_drop(args: argparse.Namespace) -> int:
    from longembed.plugin.store.collections import drop_collection

    with _connect(args) as conn:
        dropped = drop_collection(conn, args.name, missing_ok=args.if_exists)
    print(f"dropped collection {args.name}" if dropped else f"no collection named {args.name}")
    return 0


def _worker_config(args: argparse.Namespace):
    from longembed.plugin.pipeline.worker import WorkerConfig

    return WorkerConfig(
        batch_tokens=args.batch_tokens, lease_seconds=args.lease_seconds, max_attempts=args.max_attempts
    )


@_errors_to_exit_codes
def _cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from longembed.plugin.migrate import applied_versions, migrate
    from longembed.plugin.pipeline.ingest import Skipped, iter_inputs
    from longembed.plugin.store.collections import get_collection, validate_name
    from longembed.plugin.store.documents import add_documents

    validate_name(args.collection)
    config = _worker_config(args)  # validates the worker flags before any work
    with _connect(args, schema=False) as conn:
        if args.create and not applied_versions(conn):
            with _connect(args, schema=False, admin=True) as admin:
                migrate(admin)
        db.require_vector(conn)
        collection = get_collection(conn, args.collection, missing_ok=args.create)
        if collection is None:
            collection = _create_from_args(conn, args.collection, args)
            print(f"created collection {collection.name} ({collection.model_name}, {collection.dim}-d)")

        outcomes: Counter = Counter()
        problems: list = []
        ignored: list = []
        batch: list = []
        with tqdm(desc="queue", unit="doc", disable=args.no_progress, file=sys.stderr) as bar:
            for item in iter_inputs(args.paths, fmt=args.format, stdin=sys.stdin.buffer):
                if isinstance(item, Skipped):
                    (ignored if item.reason.startswith("not a text or JSONL") else problems).append(item)
                    continue
                batch.append(item)
                if len(batch) >= 256:
                    outcomes += add_documents(conn, collection, batch).counts
                    bar.update(len(batch))
                    batch = []
            if batch:
                outcomes += add_documents(conn, collection, batch).counts
                bar.update(len(batch))
        print(
            f"{sum(outcomes.values())} documents: {outcomes['inserted']} new, {outcomes['updated']} changed, "
            f"{outcomes['requeued']} re-queued, {outcomes['unchanged']} unchanged"
        )
        for item in problems:
            print(f"skipped {item.source}: {item.reason}", file=sys.stderr)
        if ignored:
            print(f"ignored {len(ignored)} files of other types (e.g. {ignored[0].source})", file=sys.stderr)
        failed = 0
        if not args.no_wait:
            failed = _embed_inline(conn, collection, config, quiet=args.no_progress)
    if problems or failed:
        return EXIT_ERROR
    if not outcomes:
        print("nothing to ingest", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _embed_inline(conn: psycopg.Connection, collection, config, *, quiet: bool) -> int:
    """Run a worker in this process until the collection's queue is empty; returns failed documents."""
    from tqdm import tqdm

    from longembed.plugin.models import get_model
    from longembed.plugin.pipeline.worker import Worker

    def pending() -> int:
        row = conn.execute("SELECT count(*) FROM longembed.queue WHERE collection_id = %s", (collection.id,))
        return row.fetchone()[0]

    remaining = pending()
    if not remaining:
        return 0
    model = get_model(collection.model_source)
    worker = Worker(conn, model, config, [collection.name])
    parked = truncated = 0
    with tqdm(total=remaining, desc="embed", unit="doc", disable=quiet, file=sys.stderr) as bar:
        while remaining:
            stats = worker.run_once()
            parked += stats.parked
            truncated += stats.truncated
            if stats.batches == 0:
                time.sleep(0.5)  # items backing off before a retry, or leased by another worker
            now = pending()
            bar.update(max(0, remaining - now))
            remaining = now
    embedded_line = f"embedded into {collection.name}"
    if truncated:
        embedded_line += f"; {truncated} documents truncated at {model.info.max_tokens} tokens"
    if parked:
        print(
            f"{embedded_line}; {parked} documents failed (see `longembed collection list`)", file=sys.stderr
        )
    else:
        print(embedded_line)
    return parked


@_errors_to_exit_codes
def _cmd_search(args: argparse.Namespace) -> int:
    from longembed.plugin.store.search import search

    filter_ = None
    if args.filter is not None:
        try:
            filter_ = json.loads(args.filter)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--filter is not valid JSON: {exc}") from None
    with _connect(args) as conn:
        results = search(
            conn,
            args.collection,
            args.query,
            args.k,
            filter=filter_,
            ef_search=args.ef_search,
            hybrid=args.hybrid,
        )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2, ensure_ascii=False))
        return 0
    if not results:
        print("no results")
    for rank, r in enumerate(results, start=1):
        snippet = " ".join(r.snippet.split())[:100]
        cut = ", truncated" if r.truncated else ""
        print(
            f"{rank:>3}. {r.score:.4f}  {r.external_id}  "
            f"[chunk {r.chunk_ordinal}, chars {r.char_start}-{r.char_end}{cut}]"
        )
        print(f"     {snippet}")
    return 0


@_errors_to_exit_codes
def _cmd_worker(args: argparse.Namespace) -> int:
    if args.processes < 1:
        raise ValueError("--processes must be at least 1")
    config = _worker_config(args)
    dsn = resolve_dsn(args)
    if args.processes == 1:
        return _worker_process(dsn, args.model, config, args.collection, args.once)
    ctx = multiprocessing.get_context("spawn")  # no fork after torch/psycopg are loaded
    procs = [
        ctx.Process(target=_worker_process, args=(dsn, args.model, config, args.collection, args.once))
        for _ in range(args.processes)
    ]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    return max((proc.exitcode or 0) for proc in procs)


def _worker_process(dsn: str, model_name: str | None, config, names: list[str] | None, once: bool) -> int:
    """One worker: SIGTERM/SIGINT finish the batch in progress, then exit 0.

    A lost connection (server restart, backend terminated) is re-opened with backoff; the batch it held
    comes back to the queue when its lease runs out.
    """
    from longembed.plugin.models import get_model
    from longembed.plugin.pipeline.worker import Worker, WorkerStats

    logging.basicConfig(level=logging.INFO, format=f"worker {os.getpid()}: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    model = get_model(model_name)
    total = WorkerStats()
    delay, connected = 1.0, False
    while not stop.is_set():
        try:
            with db.connect(dsn, application_name="longembed worker") as conn:
                db.require_vector(conn)
                worker = Worker(conn, model, config, names)
                logging.info("started (%s, batch %d tokens)", model.info.name, config.batch_tokens)
                delay, connected = 1.0, True
                if once:
                    worker.drain(stop, total)
                    break
                worker.run(stop, total)
        except psycopg.OperationalError as exc:
            if not connected:  # wrong DSN or password, server down at start: say so, do not spin
                raise
            logging.warning("database connection lost (%s); reconnecting in %.0f s", str(exc).strip(), delay)
            stop.wait(delay)
            delay = min(2 * delay, 30.0)
    logging.info(
        "stopped: %d embedded, %d retrying, %d parked, %d dropped in %d batches",
        total.embedded,
        total.retrying,
        total.parked,
        total.dropped,
        total.batches,
    )
    return 0
