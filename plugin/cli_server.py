"""Commands of this group are registered here (filled in by the PostgreSQL layer)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands; each sets `run=callable(args) -> int`."""
