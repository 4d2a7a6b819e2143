"""`longembed quickstart`: the whole product in one command, on the embedded server.

It runs the same steps a user would type: build PL/Python (for SQL `embed()`), `longembed up`,
`migrate`, `ingest` a real corpus into a collection, `search` it, and prints the SQL to try in psql.
The default corpus is the Python Language Reference that ships with every Python (`pydoc_data`, 79
sections, ~465 kB of real prose), so it needs no network; name files or folders to ingest your own.
Running it again reuses the server and skips unchanged documents.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from longembed.plugin.cli import errors, options

DEFAULT_QUERIES = (
    "how do I catch an exception and clean up afterwards",
    "define a function that takes a variable number of arguments",
    "iterate over a sequence with an index",
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="start the embedded server, ingest a real corpus, answer queries (the README's first command)",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files or folders to ingest (default: the Python Language Reference from pydoc_data)",
    )
    p.add_argument(
        "--collection", "-c", metavar="NAME", default="quickstart", help="collection (default: quickstart)"
    )
    p.add_argument("--query", action="append", help="query to answer (repeatable; default: three examples)")
    p.add_argument("--no-plpython", action="store_true", help="skip building PL/Python (no SQL embed())")
    options.progress(p, "on when stderr is a terminal")
    p.set_defaults(run=run)


def python_reference_corpus(folder: Path) -> Path:
    """Write the Python Language Reference sections as one text file each; returns the folder."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, text in sorted(topics.items()):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        path = folder / f"{safe}.txt"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return folder


def run(args: argparse.Namespace) -> int:
    from longembed.plugin.cli import main
    from longembed.plugin.embedded.server import EmbeddedServer

    def step(title: str, argv: list[str]) -> int:
        print(f"\n$ longembed {shlex.join(argv)}    # {title}", flush=True)  # copy-pasteable
        return main(argv)

    sql_embed = False
    if not args.no_plpython:
        sql_embed = step("PL/Python for SQL embed(), built once", ["setup-plpython"]) == 0
        if not sql_embed:
            print("note: continuing without PL/Python: SQL embed() and search() will be unavailable")
    for title, argv in (("start the embedded PostgreSQL", ["up"]), ("install the schema", ["migrate"])):
        if step(title, argv) != 0:
            return errors.FAILURE
    paths = args.paths or [str(python_reference_corpus(EmbeddedServer().home / "quickstart-corpus"))]
    progress = [] if args.progress is None else ["--progress" if args.progress else "--no-progress"]
    if step("ingest and embed", ["ingest", *paths, "-c", args.collection, "--create", *progress]) != 0:
        return errors.FAILURE
    for query in args.query or DEFAULT_QUERIES:
        if step("search", ["search", "-c", args.collection, query, "-k", "3"]) != 0:
            return errors.FAILURE
    print("\nTry it in SQL (`longembed psql`):")
    if sql_embed:
        print(
            "  SELECT external_id, round(score::numeric, 3) AS score,\n"
            "         left(regexp_replace(snippet, '\\s+', ' ', 'g'), 60) AS snippet\n"
            f"    FROM longembed.search('{args.collection}', 'what happens when a loop ends with break', 5);"
        )
        print("  SELECT embed('reset a password') <=> embed('change my password') AS cosine_distance;")
    else:
        print("  (build PL/Python with `longembed setup-plpython` for SQL embed() and search())")
    print("Stop the server with `longembed down`.")
    sys.stdout.flush()
    return errors.OK
