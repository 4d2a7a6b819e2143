"""`longembed serve`: the model host (OpenAI-compatible HTTP API, batcher, in-process ingestion worker)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from longembed.plugin.cli import errors, options
from longembed.plugin.settings import settings

# glibc's malloc asks the kernel for transparent huge pages when GLIBC_TUNABLES says this (glibc >= 2.35).
# Every query reads the encoder's weights whole (ONNX Runtime's prepacked copies: 41 MiB for MiniLM), and
# in 4 KiB pages that is ~10,000 TLB misses: with huge pages a lone query in the host took 0.11-0.13 ms
# (6 %) less (bench/RESULTS.md). glibc reads GLIBC_TUNABLES at process start only, hence the re-execution.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_environment(environ: Mapping[str, str], libc: str, thp: str) -> dict[str, str] | None:
    """`environ` with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES, or None where that would change
    nothing or is not ours to change: GLIBC_TUNABLES already sets glibc.malloc.hugetlb (the user's
    choice, or this process was re-executed already), the C library is not glibc 2.35 or later
    (`libc`: os.confstr's CS_GNU_LIBC_VERSION, "glibc 2.36"), or transparent huge pages are off (`thp`:
    the kernel's THP_SETTING, "always [madvise] never")."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables or "[never]" in thp or "[" not in thp:
        return None
    name, _, version = libc.partition(" ")
    try:
        if name != "glibc" or tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    return {
        **environ,
        "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE,
    }


def prefer_huge_pages() -> None:
    """Re-execute this process (same pid, arguments and environment) with HUGE_PAGES_TUNABLE, where
    huge_pages_environment says so; for a process that is `longembed serve` itself, before it loads
    anything."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        thp = THP_SETTING.read_text()
    except (AttributeError, ValueError, OSError):  # no confstr (not POSIX), no such name, no sysfs
        return
    environment = huge_pages_environment(os.environ, libc, thp)
    if environment is None or not sys.executable:  # an embedded interpreter has no executable to run
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environment)
    except OSError as exc:  # then without huge pages: slower queries, nothing else changes
        print(f"longembed serve: not restarted with {HUGE_PAGES_TUNABLE}: {exc}", file=sys.stderr)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the model host: OpenAI-compatible /v1/embeddings with dynamic batching",
        description="Hold the model(s) in one process and serve them over HTTP (TCP and/or a Unix socket); "
        "with --dsn also run the ingestion worker in-process and report the queue in /metrics.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="TCP address (default 127.0.0.1; others need API keys)"
    )
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0: no TCP listener)")
    p.add_argument(
        "--socket", default=None, help="also listen on this Unix socket (created 0660, no key needed)"
    )
    p.add_argument(
        "--socket-user",
        default=None,
        help="as root: hand the socket to this user (the PostgreSQL server's OS user, so backends connect)",
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model folder or hub id to serve (repeatable; the first is the default; "
        "default: the bundled all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--api-key-file", default=None, help="file of API keys, one per line (or $LONGEMBED_API_KEYS)"
    )
    p.add_argument("--dsn", default=None, help="PostgreSQL (default: $LONGEMBED_DSN)")
    p.add_argument("--no-worker", action="store_true", help="do not run the ingestion worker in-process")
    p.add_argument(
        "--hnsw",
        action="append",
        default=None,
        metavar="COLLECTION",
        help="search this collection through an in-process hnswlib index kept in sync with PostgreSQL "
        "(repeatable; needs --dsn and `pip install longembed[fast]`)",
    )
    p.add_argument(
        "--hnsw-dir",
        default=None,
        help="where the hnswlib indexes are saved (default: hnsw/ under LONGEMBED_HOME; created 0700)",
    )
    options.batch_tokens(p)
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch threads for the model on CPU (default: cores - 1, at least 1; the rest serves HTTP)",
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="batching window when several requests wait"
    )
    p.add_argument("--max-queued-tokens", type=_positive, default=262_144, help="queue bound before 429")
    p.add_argument("--max-inputs", type=_positive, default=2048, help="inputs per request")
    p.add_argument("--max-input-chars", type=_positive, default=1_000_000, help="characters per input")
    p.add_argument("--max-body-bytes", type=_positive, default=16 * 1024 * 1024, help="request body size")
    p.set_defaults(run=run)


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def read_api_keys(path: str | None) -> tuple[str, ...]:
    keys: list[str] = []
    if path:
        text = Path(path).read_text(encoding="utf-8")
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    keys += settings().api_keys
    return tuple(keys)


def run(args: argparse.Namespace) -> int:
    # Idle OpenMP threads sleep instead of spinning (read when torch loads OpenMP, so before any import
    # of it): with --threads at the core count, spinning made the host 3-25x slower on a busy machine
    # (bench/RESULTS.md); a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from longembed.plugin.service.host import Host, HostConfig
    from longembed.plugin.service.server import BindRefused, bind_tcp, bind_unix, check_bind, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sockets = []
    try:
        keys = read_api_keys(args.api_key_file)
        if args.port < 0 or (args.port == 0 and not args.socket):
            raise BindRefused("nothing to listen on: give a --port above 0 or a --socket")
        check_bind(args.host, args.port, keys)
        config = HostConfig(
            models=tuple(args.model) if args.model else (None,),
            dsn=args.dsn or settings().dsn,
            worker=not args.no_worker,
            batch_tokens=args.batch_tokens,
            max_wait=args.max_wait_ms / 1000,
            max_queued_tokens=args.max_queued_tokens,
            max_inputs=args.max_inputs,
            max_input_chars=args.max_input_chars,
            max_body_bytes=args.max_body_bytes,
            api_keys=keys,
            hnsw=tuple(args.hnsw or ()),
            hnsw_dir=str(args.hnsw_dir or settings().home / "hnsw"),
        )
        if args.port:
            sockets.append(bind_tcp(args.host, args.port))
        if args.socket:
            sockets.append(bind_unix(args.socket, args.socket_user))
    except (BindRefused, OSError, ValueError) as exc:
        for sock in sockets:
            sock.close()
        errors.report(f"serve: {exc}")
        return errors.FAILURE if isinstance(exc, OSError) else errors.USAGE
    # One batcher thread computes; torch's threads spin at a barrier whenever one of them loses its
    # core, so leave a core to the event loop and the tokenisers (measured: 2 threads on 2 busy cores
    # answered 8 clients ~10x slower than 1; bench/RESULTS.md).
    import torch

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    where = [f"http://{args.host}:{args.port}"] if args.port else []
    where += [f"unix:{args.socket}"] if args.socket else []
    print(f"longembed serve: listening on {', '.join(where)}", file=sys.stderr, flush=True)
    serve(Host(config), sockets, args.socket)
    return 0
