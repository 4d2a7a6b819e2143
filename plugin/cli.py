"""The `longembed` command: one argparse tree, each command group in its own module."""

from __future__ import annotations

import argparse
import sys

from plugin import cli_data, cli_embed, cli_quickstart, cli_server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longembed",
        description="Long-document embeddings inside PostgreSQL (pgvector).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_embed.add_commands(sub)
    cli_server.add_commands(sub)
    cli_data.add_commands(sub)
    cli_quickstart.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
