"""The options several commands share, defined once so that each means one thing everywhere."""

from __future__ import annotations

import argparse
import sys

from longembed.plugin.cli.errors import UsageError

MODEL_HELP = "model folder or hub id (default: the bundled all-MiniLM-L6-v2)"


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def dsn(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dsn", help="PostgreSQL connection string (default: $LONGEMBED_DSN, else the embedded server)"
    )


def collection(
    p: argparse.ArgumentParser, *, required: bool = True, deprecated_positional: bool = False
) -> None:
    """`--collection/-c NAME`; `deprecated_positional` keeps the old `COMMAND NAME` form working."""
    p.add_argument(
        "--collection",
        "-c",
        metavar="NAME",
        required=required and not deprecated_positional,
        help="the collection",
    )
    if deprecated_positional:
        p.add_argument("old_collection", nargs="?", metavar="NAME", help=argparse.SUPPRESS)


def resolve_collection(args: argparse.Namespace) -> str:
    """The collection of a command with a deprecated positional NAME: `-c` wins, the positional warns."""
    old = getattr(args, "old_collection", None)
    if args.collection and old:
        raise UsageError(f"collection given twice ({old!r} and -c {args.collection!r}): use -c only")
    if old:
        print(
            f"longembed: warning: a positional collection name is deprecated; use -c {old}", file=sys.stderr
        )
        return old
    if not args.collection:
        raise UsageError("name the collection with --collection/-c NAME")
    return args.collection


def model(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    p.add_argument("--model", metavar="MODEL", help=help)


def batch_tokens(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--batch-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="tokens per encoder batch (one forward pass; for a worker also one write transaction); "
        "default 4096 on CPU, 16384 on CUDA",
    )


def progress(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"progress bars on stderr (default: {default_help})",
    )
