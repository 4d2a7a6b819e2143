"""The `longembed` command: one argparse tree, each command group in its own module.

Every command runs under one error policy and one set of exit codes (plugin/cli/errors.py); the
options several commands share are defined once (plugin/cli/options.py).
"""

from __future__ import annotations

import argparse

from longembed.plugin.cli import data, embed, errors, evaluate, quickstart, serve, server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longembed",
        description="Long-document embeddings inside PostgreSQL (pgvector).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    embed.add_commands(sub)
    server.add_commands(sub)
    data.add_commands(sub)
    evaluate.add_commands(sub)
    quickstart.add_commands(sub)
    serve.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "serve":  # this process is the model host: not a caller's
        serve.prefer_huge_pages()
    return errors.run_command(args)
