"""`longembed eval`: retrieval quality of a collection setup on a dataset with relevance judgements.

It makes a scratch collection (settings as `ingest --create` takes them), ingests the corpus the way
`longembed ingest` does (embedded by the running model host, else in this process), runs every query in
every search mode, prints nDCG@k, Recall@k, MRR@k and latency per mode, and drops the collection unless
`--keep`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import uuid
from collections import Counter
from dataclasses import asdict

import psycopg

from longembed.plugin import db
from longembed.plugin.cli import data, errors, options
from longembed.plugin.store.collections import drop_collection, get_collection


def add_commands(sub: argparse._SubParsersAction) -> None:
    from longembed.plugin.eval.runner import MODES, VIA

    p = sub.add_parser("eval", help="nDCG, recall, MRR and latency of every search mode on a dataset")
    p.add_argument(
        "path", metavar="PATH", help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or a JSONL file"
    )
    p.add_argument("--split", default="test", help="the BEIR qrels file qrels/SPLIT.tsv (default: test)")
    p.add_argument(
        "--search-modes",
        default=",".join(MODES),
        metavar="M[,M...]",
        help=f"search modes to run, comma-separated (default: all, {','.join(MODES)})",
    )
    p.add_argument("-k", type=options.positive_int, default=10, help="cutoff of the metrics (default 10)")
    p.add_argument(
        "--via",
        choices=VIA,
        default="python",
        help="python: search() in this process; sql: SQL longembed.search(), embedded by the model host",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch collection (its name is printed)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    options.progress(p, "on when stderr is a terminal")
    data._collection_options(p)
    data._worker_options(p)
    options.dsn(p)
    p.set_defaults(run=_cmd_eval)


def _modes(value: str) -> list[str]:
    from longembed.plugin.eval.runner import MODES

    modes = list(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise errors.UsageError(f"--search-modes {value!r}: choose from {', '.join(MODES)}")
    return modes


def _cmd_eval(args: argparse.Namespace) -> int:
    from longembed.plugin.eval import dataset as datasets
    from longembed.plugin.eval import runner
    from longembed.plugin.store.search import MAX_K

    modes = _modes(args.search_modes)
    if args.k > MAX_K:
        raise errors.UsageError(f"-k {args.k}: at most {MAX_K}")
    settings = data._worker_settings(args)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    dataset = datasets.load(args.path, args.split)
    for item in dataset.skipped:
        print(f"skipped {item.source}: {item.reason}", file=sys.stderr)
    for reason, count in sorted(dataset.dropped.items()):
        print(f"warning: {count} {reason} left out", file=sys.stderr)

    name = f"eval_{uuid.uuid4().hex[:12]}"
    with data._connect(args, schema=False) as conn:
        started = conn.execute("SELECT now()").fetchone()[0]
        _migrate_if_needed(conn, args)
        db.require_vector(conn)
        if args.via == "sql" and not runner.sql_search_available(conn):
            raise errors.CommandFailed(
                "--via sql needs SQL longembed.search() (PL/Python): run `longembed setup-plpython`, "
                "`longembed migrate` and `longembed up`"
            )
        collection = data._create_from_args(conn, name, args)
        try:
            problems, failed = _ingest(conn, collection, dataset, settings, started, args, progress)
            data._calibrate_if_due(conn, name)
            collection = get_collection(conn, name)  # with what auto chose, for the report
            fresh = (lambda: data._connect(args)) if args.via == "sql" else None
            results = runner.evaluate(
                conn,
                collection,
                dataset,
                modes,
                k=args.k,
                via=args.via,
                progress=progress,
                fresh_connection=fresh,
            )
        finally:
            _drop_unless_kept(conn, name, args.keep)
    summary = _summary(dataset, collection, args, modes, results, problems, failed)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        counts = summary["counts"]
        print(
            f"{dataset.source}: {counts['documents']} documents, {counts['queries']} queries; "
            f"{collection.model_name}, mode {collection.mode}, {collection.chunk_tokens} tokens per chunk; "
            f"via {args.via}"
        )
        print(runner.table(results, args.k))
        if "auto" in modes and collection.auto_fusion:
            chosen = {k: collection.auto_fusion.get(k) for k in ("weights", "fusion", "basis")}
            print(f"auto chose: {json.dumps(chosen)}")
    return errors.FAILURE if dataset.skipped or problems or failed else errors.OK


def _migrate_if_needed(conn: psycopg.Connection, args: argparse.Namespace) -> None:
    from longembed.plugin.migrate import applied_versions, migrate

    if not applied_versions(conn):
        with data._connect(args, schema=False, admin=True) as admin:
            migrate(admin)


def _ingest(conn, collection, dataset, settings: dict, started, args, progress: bool) -> tuple[list, int]:
    """Queue the corpus as `longembed ingest` does and wait until it is embedded; returns the documents
    the database refused and the number that failed to embed."""
    from tqdm import tqdm

    problems: list = []
    outcomes: Counter = Counter()
    with tqdm(
        total=len(dataset.documents), desc="queue", unit="doc", disable=not progress, file=sys.stderr
    ) as bar:
        for start in range(0, len(dataset.documents), data.INGEST_BATCH):
            batch = dataset.documents[start : start + data.INGEST_BATCH]
            outcomes += data._add(conn, collection, batch, problems)
            bar.update(len(batch))
    for item in problems:
        print(f"skipped {item.source}: {item.reason}", file=sys.stderr)
    # ingest's own lines ("embedded into ...") go to stderr here: stdout is the results (maybe JSON)
    with contextlib.redirect_stdout(sys.stderr):
        host = data._embedded_host(args)
        failed = data._embed_by_host(conn, collection, host, started, progress) if host else None
        if failed is None:
            failed = data._embed_inline(conn, collection, settings, progress=progress)
    return problems, failed


def _drop_unless_kept(conn: psycopg.Connection, name: str, keep: bool) -> None:
    if keep:
        print(f"kept collection {name}", file=sys.stderr)
        return
    try:
        drop_collection(conn, name, missing_ok=True)
    except psycopg.Error as exc:
        print(
            f"longembed: warning: could not drop the scratch collection {name} ({str(exc).strip()}); "
            f"drop it with `longembed collection drop -c {name}`",
            file=sys.stderr,
        )


def _summary(dataset, collection, args, modes, results, problems, failed) -> dict:
    manifest = dataset.manifest
    if isinstance(manifest, dict) and isinstance(manifest.get("source"), dict):
        # the per-file hashes of the sources are in the folder's manifest.json; the rest says what it is
        manifest = {**manifest, "source": {k: v for k, v in manifest["source"].items() if k != "files_read"}}
    settings = {k: v for k, v in asdict(collection).items() if k not in ("id", "created_at")}
    return {
        "dataset": {
            "path": dataset.source,
            "format": dataset.format,
            "split": args.split,
            "manifest": manifest,
        },
        "counts": {
            "documents": len(dataset.documents),
            "queries": len(dataset.queries),
            "qrels": sum(len(j) for j in dataset.qrels.values()),
            "skipped_lines": len(dataset.skipped),
            "left_out": dict(sorted(dataset.dropped.items())),
            "documents_refused": len(problems),
            "documents_failed": failed,
        },
        "model": collection.model_name,
        "collection": {**settings, "kept": args.keep},
        "via": args.via,
        "k": args.k,
        "modes": {mode: results[mode] for mode in modes},
    }
