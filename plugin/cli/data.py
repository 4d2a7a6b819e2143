"""Data commands: migrate, collection create|list|calibrate|drop, ingest, search, worker."""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, replace

import psycopg
from psycopg import sql

from longembed.encoder.chunking import DEFAULT_CHUNK_TOKENS
from longembed.plugin import db
from longembed.plugin.cli import errors, options
from longembed.plugin.embedded.server import resolve_dsn
from longembed.plugin.store.collections import SEARCH_MODES

INGEST_BATCH = 256  # documents per add_documents call (one transaction)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands; each sets `run=callable(args) -> int`."""
    p = sub.add_parser("migrate", help="create or upgrade schema longembed in the database")
    options.dsn(p)
    p.set_defaults(run=_cmd_migrate)

    p = sub.add_parser("collection", help="create, list or drop collections")
    csub = p.add_subparsers(dest="collection_command", required=True, metavar="ACTION")
    c = csub.add_parser("create", help="create a collection (model, chunking, index parameters)")
    options.collection(c, deprecated_positional=True)
    _collection_options(c)
    options.dsn(c)
    c.set_defaults(run=_cmd_collection_create)
    c = csub.add_parser("list", help="list collections with document counts")
    c.add_argument("--json", action="store_true", help="print JSON")
    options.dsn(c)
    c.set_defaults(run=_cmd_collection_list)
    c = csub.add_parser(
        "calibrate", help="choose the fusion of search mode auto again, from the collection's own documents"
    )
    options.collection(c)
    c.add_argument("--json", action="store_true", help="print JSON")
    options.dsn(c)
    c.set_defaults(run=_cmd_collection_calibrate)
    c = csub.add_parser("drop", help="drop a collection with its documents and vectors")
    options.collection(c, deprecated_positional=True)
    c.add_argument("--if-exists", action="store_true", help="no error when it does not exist")
    options.dsn(c)
    c.set_defaults(run=_cmd_collection_drop)

    p = sub.add_parser("ingest", help="add files, folders, JSONL or stdin to a collection and embed them")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, folders, or - for stdin")
    options.collection(p)
    p.add_argument(
        "--format",
        choices=("auto", "text", "jsonl"),
        default="auto",
        help="auto: .jsonl/.ndjson are JSONL, other files and stdin one text each",
    )
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--create", action="store_true", help="create the collection when it does not exist")
    p.add_argument(
        "--prune",
        action="store_true",
        help="remove the documents of files deleted from the folders given (JSONL records stay)",
    )
    p.add_argument("--no-wait", action="store_true", help="only queue the documents; a worker embeds them")
    options.progress(p, "on when stderr is a terminal")
    _collection_options(p)
    _worker_options(p)
    options.dsn(p)
    p.set_defaults(run=_cmd_ingest)

    p = sub.add_parser("search", help="top-k documents of a collection for a query")
    options.collection(p, deprecated_positional=True)
    p.add_argument("query")
    p.add_argument("-k", type=options.positive_int, default=10, help="number of documents (default 10)")
    p.add_argument("--filter", help='metadata the documents must contain, as JSON: \'{"lang": "en"}\'')
    p.add_argument(
        "--mode",
        choices=SEARCH_MODES,
        help="dense (document vector), chunks (best chunk), lexical (BM25), hybrid (fusion) or auto "
        "(the fusion chosen for the collection); default: the collection's search mode",
    )
    p.add_argument("--hybrid", action="store_true", help="deprecated: --mode hybrid")
    p.add_argument(
        "--weights", help='hybrid: weight per signal, as JSON: \'{"dense": 1, "chunks": 1, "lexical": 0.5}\''
    )
    p.add_argument("--fusion", choices=("rrf", "minmax", "zscore"), help="hybrid: how to fuse (default rrf)")
    p.add_argument(
        "--rrf-k", type=options.positive_int, help="hybrid: the k of rrf, 1/(k + rank) (default 60)"
    )
    p.add_argument(
        "--ef-search", type=options.positive_int, help="HNSW ef_search for this query (recall vs speed)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    options.dsn(p)
    p.set_defaults(run=_cmd_search)

    p = sub.add_parser("worker", help="embed queued documents (runs until SIGTERM, or --once)")
    p.add_argument(
        "--collection", "-c", metavar="NAME", action="append", help="only these collections (repeatable)"
    )
    p.add_argument(
        "-n", "--processes", type=options.positive_int, default=1, help="worker processes (default 1)"
    )
    p.add_argument("--once", action="store_true", help="exit when nothing is ready instead of polling")
    options.model(
        p,
        "only the collections made with this model (default: every collection, each with its own model)",
    )
    p.add_argument(
        "--max-models",
        type=options.positive_int,
        default=2,
        help="without --model: models held in memory at once, least recently used unloaded (default 2)",
    )
    _worker_options(p)
    options.dsn(p)
    p.set_defaults(run=_cmd_worker)


def _collection_options(p: argparse.ArgumentParser) -> None:
    # Absent unless given (SUPPRESS): create_collection's defaults apply, and `ingest` can tell a
    # setting asked for an existing collection from one left out.
    g = p.add_argument_group("collection settings (when it is created)")
    options.model(g)
    unset = argparse.SUPPRESS
    g.add_argument("--mode", choices=("full", "chunk", "late"), default=unset, help="default: chunk")
    g.add_argument(
        "--chunk-tokens",
        type=int,
        default=unset,
        help=f"tokens per chunk (default: {DEFAULT_CHUNK_TOKENS}, or what fits next to the document prefix)",
    )
    g.add_argument("--overlap", type=int, default=unset, help="tokens shared by neighbouring chunks (32)")
    g.add_argument("--distance", choices=("cosine", "l2", "ip"), default=unset, help="default: cosine")
    g.add_argument("--hnsw-m", type=int, default=unset, help="default: 16")
    g.add_argument("--hnsw-ef-construction", type=int, default=unset, help="default: 64")
    g.add_argument("--query-prefix", default=unset, help="text put before queries (default: the model's)")
    g.add_argument(
        "--document-prefix", default=unset, help="text put before documents (default: the model's)"
    )
    g.add_argument(
        "--text-search-config", default=unset, help="PostgreSQL text search configuration (english)"
    )
    g.add_argument(
        "--dimensions",
        type=options.positive_int,
        default=unset,
        help="vector size: the model's (default) or one of its Matryoshka sizes, e.g. 256",
    )
    g.add_argument("--bm25-k1", type=float, default=unset, help="BM25 term frequency saturation, 0..10 (1.2)")
    g.add_argument("--bm25-b", type=float, default=unset, help="BM25 length normalisation, 0..1 (0.75)")
    g.add_argument(
        "--search-mode", choices=SEARCH_MODES, default=unset, help="what a search does by default (auto)"
    )
    g.add_argument(
        "--document-vector",
        choices=("head", "mean"),
        default=unset,
        help="head: the model's first window of the text (default); mean: the mean of the chunk vectors",
    )


COLLECTION_SETTINGS = (
    "mode",
    "chunk_tokens",
    "overlap",
    "distance",
    "hnsw_m",
    "hnsw_ef_construction",
    "query_prefix",
    "document_prefix",
    "text_search_config",
    "dimensions",
    "bm25_k1",
    "bm25_b",
    "search_mode",
    "document_vector",
)
# A setting whose Collection field has another name.
SETTING_FIELDS = {"dimensions": "dim"}


def _given_settings(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in COLLECTION_SETTINGS if hasattr(args, name)}


def _worker_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("worker settings")
    options.batch_tokens(g)
    g.add_argument("--lease-seconds", type=float, default=600.0, help="how long a claimed batch is ours")
    g.add_argument("--max-attempts", type=int, default=5, help="tries before a document is parked as failed")


def _connect(args: argparse.Namespace, *, schema: bool = True, admin: bool = False) -> psycopg.Connection:
    conn = db.connect(resolve_dsn(args, admin=admin))
    if schema:
        try:
            db.require_vector(conn)
        except BaseException:
            conn.close()
            raise
    return conn


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

    return create_collection(conn, name, get_model(args.model), **_given_settings(args))


def _cmd_collection_create(args: argparse.Namespace) -> int:
    from longembed.plugin.store.collections import validate_name

    name = validate_name(options.resolve_collection(args))  # before loading a model
    with _connect(args) as conn:
        collection = _create_from_args(conn, name, args)
    print(
        f"created collection {collection.name}: {collection.model_name} ({collection.dim}-d), "
        f"mode {collection.mode}, {collection.chunk_tokens} tokens per chunk, {collection.distance}"
    )
    return 0


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
        print("no collections (create one with `longembed collection create -c NAME` or `ingest --create`)")
        return 0
    print(
        f"{'name':<20} {'model':<40} {'dim':>5} {'mode':<6} {'docs':>8} {'queued':>7} {'failed':>7} "
        f"{'chunks':>8}  search"
    )
    for c, s in rows:
        print(
            f"{c.name:<20} {c.model_name[:40]:<40} {c.dim:>5} {c.mode:<6} {s['documents']:>8} "
            f"{s['queued']:>7} {s['failed']:>7} {s['chunks']:>8}  {_search_summary(c)}"
        )
    return 0


def _search_summary(c) -> str:
    """The search mode, and for auto what it chose: `auto: rrf dense=1 chunks=1 lexical=1`."""
    if c.search_mode != "auto":
        return c.search_mode
    chosen = c.auto_fusion or {"weights": {"dense": 1}, "fusion": "raw"}
    weights = " ".join(f"{k}={v:g}" for k, v in chosen["weights"].items() if v)
    return f"auto: {chosen['fusion']} {weights}"


def _cmd_collection_calibrate(args: argparse.Namespace) -> int:
    from longembed.plugin.models import get_model
    from longembed.plugin.pipeline.worker import embedders
    from longembed.plugin.store.calibrate import calibrate
    from longembed.plugin.store.collections import get_collection

    name = options.resolve_collection(args)
    with _connect(args) as conn:
        collection = get_collection(conn, name)
        chosen = calibrate(conn, collection, *embedders(get_model(collection.model_source), collection))
    if args.json:
        print(json.dumps(chosen, indent=2))
    else:
        print(f"collection {name}: {_search_summary(replace(collection, auto_fusion=chosen))}")
        for config, score in chosen.get("scores", {}).items():
            print(f"  {config:<32} MRR@10 {score:.4f}")
    return 0


def _cmd_collection_drop(args: argparse.Namespace) -> int:
    from longembed.plugin.store.collections import drop_collection, validate_name

    name = validate_name(options.resolve_collection(args))  # before connecting
    with _connect(args) as conn:
        dropped = drop_collection(conn, name, missing_ok=args.if_exists)
    print(f"dropped collection {name}" if dropped else f"no collection named {name}")
    return 0


def _worker_settings(args: argparse.Namespace) -> dict:
    """The worker flags, checked before any work; the batch budget is settled once the model is loaded."""
    from longembed.plugin.pipeline.worker import WorkerConfig

    settings = {"lease_seconds": args.lease_seconds, "max_attempts": args.max_attempts}
    WorkerConfig(**settings)  # raises ValueError on bad values
    return settings | {"batch_tokens": args.batch_tokens}


def _worker_config(settings: dict, model):
    from longembed.encoder.model import DEFAULT_BATCH_TOKENS
    from longembed.plugin.pipeline.worker import WorkerConfig

    budget = settings["batch_tokens"] or DEFAULT_BATCH_TOKENS.get(model.device.type, 16384)
    return WorkerConfig(**(settings | {"batch_tokens": budget}))


def _cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from longembed.plugin.migrate import applied_versions, migrate
    from longembed.plugin.models import get_model
    from longembed.plugin.pipeline.ingest import Skipped, iter_inputs, prune_missing_files
    from longembed.plugin.pipeline.worker import incompatibility
    from longembed.plugin.store.collections import get_collection, validate_name

    validate_name(args.collection)
    settings = _worker_settings(args)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    with _connect(args, schema=False) as conn:
        started = conn.execute("SELECT now()").fetchone()[0]  # documents this run touches: updated since
        if args.create and not applied_versions(conn):
            with _connect(args, schema=False, admin=True) as admin:
                migrate(admin)
        db.require_vector(conn)
        collection = get_collection(conn, args.collection, missing_ok=args.create)
        if collection is None:
            collection = _create_from_args(conn, args.collection, args)
            print(f"created collection {collection.name} ({collection.model_name}, {collection.dim}-d)")
        else:
            _check_settings(collection, args)
        if args.model is not None and args.model not in (collection.model_source, collection.model_name):
            # --model names the collection's model; another one would embed into the wrong space.
            mismatch = incompatibility(collection, get_model(args.model).info)
            if mismatch:
                raise errors.UsageError(f"--model {args.model}: {mismatch}; leave out --model to use it")

        outcomes: Counter = Counter()
        problems: list[Skipped] = []
        ignored: list[Skipped] = []
        batch: list = []
        with tqdm(desc="queue", unit="doc", disable=not progress, file=sys.stderr) as bar:
            inputs = iter_inputs(args.paths, fmt=args.format, stdin=sys.stdin.buffer, field=args.field)
            for item in inputs:
                if isinstance(item, Skipped):
                    (ignored if item.reason.startswith("not a text or JSONL") else problems).append(item)
                    continue
                batch.append(item)
                if len(batch) >= INGEST_BATCH:
                    outcomes += _add(conn, collection, batch, problems)
                    bar.update(len(batch))
                    batch = []
            if batch:
                outcomes += _add(conn, collection, batch, problems)
                bar.update(len(batch))
        print(
            f"{sum(outcomes.values())} documents: {outcomes['inserted']} new, {outcomes['updated']} changed, "
            f"{outcomes['requeued']} re-queued, {outcomes['unchanged']} unchanged"
        )
        if args.prune:
            pruned = prune_missing_files(conn, collection, args.paths)
            print(f"pruned {len(pruned)} documents of deleted files")
        for item in problems:
            print(f"skipped {item.source}: {item.reason}", file=sys.stderr)
        if ignored:
            print(f"ignored {len(ignored)} files of other types (e.g. {ignored[0].source})", file=sys.stderr)
        failed = 0
        if not args.no_wait:
            host = _embedded_host(args)
            by_host = _embed_by_host(conn, collection, host, started, progress) if host else None
            if by_host is None:
                failed = _embed_inline(conn, collection, settings, progress=progress)
            else:
                failed = by_host
    if problems or failed:
        return errors.FAILURE
    if not outcomes and not args.prune:
        print("nothing to ingest", file=sys.stderr)
        return errors.FAILURE
    return errors.OK


def _check_settings(collection, args: argparse.Namespace) -> None:
    """Settings given for an existing collection must be its own: they apply only when it is created."""
    given = _given_settings(args).items()
    has = {name: getattr(collection, SETTING_FIELDS.get(name, name)) for name, _ in given}
    differ = [
        f"--{name.replace('_', '-')} {value} (it has {has[name]})"
        for name, value in given
        if has[name] != value
    ]
    if differ:
        raise errors.UsageError(
            f"collection {collection.name} exists; {', '.join(differ)}: settings apply only when a "
            "collection is created (drop it, or ingest into a new one)"
        )


def _add(conn: psycopg.Connection, collection, batch: list, problems: list) -> Counter:
    """Add one batch (one transaction); should the database refuse one document, add the rest alone."""
    from longembed.plugin.pipeline.ingest import Skipped
    from longembed.plugin.store.documents import add_documents

    try:
        return add_documents(conn, collection, batch).counts
    except (ValueError, psycopg.DataError):
        pass  # nothing of the batch was written: add each document alone below
    counts: Counter = Counter()
    for doc in batch:
        try:
            counts += add_documents(conn, collection, [doc]).counts
        except (ValueError, psycopg.DataError) as exc:
            problems.append(Skipped(f"document {doc.external_id!r}", str(exc).strip()))
    return counts


HOST_STALL_S = 120.0  # no document done and none leased for this long: embed the rest here


def _embedded_host(args: argparse.Namespace):
    """The model host beside the embedded server when this command writes to that server and the host
    is ready; None otherwise (another database, or no host): the CLI then embeds in its own process."""
    from longembed.plugin.cli.server import host_of
    from longembed.plugin.embedded.server import EmbeddedServer
    from longembed.plugin.settings import settings

    if getattr(args, "dsn", None) or settings().dsn:
        return None
    server = EmbeddedServer()
    if server.running_pid() is None:
        return None
    host = host_of(server)
    answer = host.get("/ready")
    return host if answer is not None and answer[0] == 200 else None


def _pending(conn: psycopg.Connection, collection) -> tuple[int, int]:
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE leased_until > now()) FROM longembed.queue "
        "WHERE collection_id = %s",
        (collection.id,),
    ).fetchone()
    return row[0], row[1]


def _embed_by_host(conn: psycopg.Connection, collection, host, started, progress: bool) -> int | None:
    """Let the model host's in-process worker embed the queue (one model in memory, its batches shared
    with SQL and HTTP callers) and follow it; returns failed documents, or None where the host cannot
    serve this collection's model or stalls (the caller then embeds here)."""
    from tqdm import tqdm

    if not _pending(conn, collection)[0]:
        return 0  # nothing queued: nothing to wait for (as when embedding here)
    # Asking for the model makes the host load it (a model a collection uses) and start its worker.
    body = {"input": ["ready?"], "model": collection.model_source}
    try:
        status, _ = host.post("/v1/embeddings", body)
    except OSError:
        return None
    if status != 200:
        return None
    remaining, _ = _pending(conn, collection)
    last_change = time.monotonic()
    with tqdm(total=remaining, desc="embed", unit="doc", disable=not progress, file=sys.stderr) as bar:
        while remaining:
            time.sleep(0.25)
            now, leased = _pending(conn, collection)
            if now < remaining or leased:
                last_change = time.monotonic()
            elif time.monotonic() - last_change > HOST_STALL_S:
                print("the model host made no progress; embedding the rest here", file=sys.stderr)
                return None
            bar.update(max(0, remaining - now))
            remaining = now
    _await_auto_choice(conn, collection)
    truncated = conn.execute(
        sql.SQL(
            "SELECT count(DISTINCT c.document_id) FROM {} c "
            "JOIN longembed.documents d ON d.id = c.document_id WHERE c.truncated AND d.embedded_at >= %s"
        ).format(collection.chunk_table),
        (started,),
    ).fetchone()[0]
    failed = conn.execute(
        "SELECT count(*) FROM longembed.documents WHERE collection_id = %s AND status = 'failed' "
        "AND updated_at >= %s",
        (collection.id, started),
    ).fetchone()[0]
    line = f"embedded into {collection.name} by the model host"
    if truncated:
        line += f"; {truncated} documents truncated at {_host_max_tokens(host, collection)} tokens"
    if failed:
        print(f"{line}; {failed} documents failed (see `longembed collection list`)", file=sys.stderr)
    else:
        print(line)
    return failed


def _await_auto_choice(conn: psycopg.Connection, collection) -> None:
    """The host's worker makes search mode auto's choice once the queue is drained, a moment after the
    last document: wait for it, so that a search right after `ingest` already ranks as auto chose."""
    from longembed.plugin.store.calibrate import due
    from longembed.plugin.store.collections import get_collection

    if collection.search_mode != "auto":
        return
    deadline = time.monotonic() + HOST_STALL_S
    while due(conn, get_collection(conn, collection.name)):
        if time.monotonic() > deadline:
            print(
                "the model host has not made search mode auto's choice yet; searches use dense until it "
                f"does (or run `longembed collection calibrate -c {collection.name}`)",
                file=sys.stderr,
            )
            return
        time.sleep(0.25)


def _host_max_tokens(host, collection) -> int | str:
    status, answer = host.get("/v1/models") or (0, None)
    if status == 200 and isinstance(answer, dict):
        for entry in answer.get("data", []):
            info = entry.get("longembed") or {}
            if collection.model_source in (entry.get("id"), *info.get("aliases", [])):
                return info.get("max_tokens", "the model's window")
    return "the model's window"


def _embed_inline(conn: psycopg.Connection, collection, settings: dict, *, progress: bool) -> int:
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
    worker = Worker(conn, model, _worker_config(settings, model), [collection.name])
    parked = truncated = 0
    with tqdm(total=remaining, desc="embed", unit="doc", disable=not progress, file=sys.stderr) as bar:
        while remaining:
            stats = worker.run_once()
            parked += stats.parked
            truncated += stats.truncated
            if stats.batches == 0:
                time.sleep(0.5)  # items backing off before a retry, or leased by another worker
            now = pending()
            bar.update(max(0, remaining - now))
            remaining = now
    worker.recalibrate()  # search mode auto's choice, before ingest returns
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


def _calibrate_if_due(conn: psycopg.Connection, name: str) -> None:
    """Make search mode auto's choice for collection `name` now if it is due (a host's worker would make
    it soon after; a command that searches next wants it made)."""
    from longembed.plugin.models import get_model
    from longembed.plugin.pipeline.worker import embedders
    from longembed.plugin.store.calibrate import calibrate, due
    from longembed.plugin.store.collections import get_collection

    collection = get_collection(conn, name)
    if due(conn, collection):
        calibrate(conn, collection, *embedders(get_model(collection.model_source), collection))


def _cmd_search(args: argparse.Namespace) -> int:
    from longembed.plugin.store.search import search

    filter_ = None
    if args.filter is not None:
        try:
            filter_ = json.loads(args.filter)
        except json.JSONDecodeError as exc:
            raise errors.UsageError(f"--filter is not valid JSON: {exc}") from None
    weights = None
    if args.weights is not None:
        try:
            weights = json.loads(args.weights)
        except json.JSONDecodeError as exc:
            raise errors.UsageError(f"--weights is not valid JSON: {exc}") from None
    name = options.resolve_collection(args)
    with _connect(args) as conn:
        results = search(
            conn,
            name,
            args.query,
            args.k,
            filter=filter_,
            ef_search=args.ef_search,
            mode=args.mode,
            weights=weights,
            fusion=args.fusion,
            rrf_k=args.rrf_k,
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


def _cmd_worker(args: argparse.Namespace) -> int:
    settings = _worker_settings(args)
    dsn = resolve_dsn(args)
    if args.processes == 1:
        return _worker_process(dsn, args.model, settings, args.collection, args.once, args.max_models)
    ctx = multiprocessing.get_context("spawn")  # no fork after torch/psycopg are loaded
    procs = [
        ctx.Process(
            target=_worker_process,
            args=(dsn, args.model, settings, args.collection, args.once, args.max_models),
        )
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


def _worker_process(
    dsn: str, model_name: str | None, settings: dict, names: list[str] | None, once: bool, max_models: int
) -> int:
    """One worker: SIGTERM/SIGINT finish the batch in progress, then exit 0.

    A lost connection (server restart, backend terminated) is re-opened with backoff; the batch it held
    comes back to the queue when its lease runs out.
    """
    from longembed.plugin.models import forget_model, get_model
    from longembed.plugin.pipeline import queue
    from longembed.plugin.pipeline.worker import EveryModel, Worker, WorkerStats

    logging.basicConfig(level=logging.INFO, format=f"worker {os.getpid()}: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    model = get_model(model_name) if model_name is not None else None
    every = None
    if model is None:  # every collection, each with its own model, loaded when it has work
        every = EveryModel(
            None, get_model, lambda m: _worker_config(settings, m), names, max_models, unload=forget_model
        )
    total = WorkerStats()
    delay, connected = 1.0, False
    while not stop.is_set():
        try:
            with (
                db.connect(dsn, application_name="longembed worker") as conn,
                queue.Wakeup(dsn) as wakeup,  # idle, woken when documents are queued
            ):
                db.require_vector(conn)
                if every is not None:
                    every.conn = conn  # models stay loaded across reconnects
                    worker = every
                    logging.info("started (every collection's model, at most %d at once)", max_models)
                else:
                    config = _worker_config(settings, model)
                    worker = Worker(conn, model, config, names)
                    logging.info("started (%s, batch %d tokens)", model.info.name, config.batch_tokens)
                delay, connected = 1.0, True
                if once:
                    worker.drain(stop, total)
                    break
                worker.run(stop, total, wakeup)
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
