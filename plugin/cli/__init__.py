"""The `longembed` command: one argparse tree, each command group in its own module."""

from __future__ import annotations

import argparse
import sys

from longembed.plugin.cli import data, embed, quickstart, serve, server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longembed",
        description="Long-document embeddings inside PostgreSQL (pgvector).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    embed.add_commands(sub)
    server.add_commands(sub)
    data.add_commands(sub)
    quickstart.add_commands(sub)
    serve.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
