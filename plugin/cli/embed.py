"""`longembed embed`: texts from a file or stdin to vectors as JSONL or .npy.

Input is plain text (one text per line) or JSONL (one object per line with a text field), read by the
same reader as `ingest` (plugin/pipeline/ingest.py): strict UTF-8, bad lines skipped with their file
and line (exit status 1), the valid ones embedded. Blank lines are skipped and counted on stderr, or
refused with `--empty error`. Output rows carry the 1-based input line number, so skipped lines never
shift which vector belongs to which text.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from longembed.encoder.chunking import DEFAULT_CHUNK_TOKENS, MODES
from longembed.encoder.profiles import KINDS
from longembed.plugin.cli import errors, options
from longembed.plugin.pipeline.ingest import Record, Skipped, iter_lines, read_bytes


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed texts from a file or stdin",
        description="Embed texts (one per line, or JSONL) and write vectors as JSONL or .npy.",
    )
    p.add_argument("input", nargs="?", default="-", help="input file, or - for stdin (default)")
    p.add_argument("-o", "--output", default="-", help="output: FILE.jsonl, FILE.npy or - for stdout JSONL")
    p.add_argument("--jsonl", action="store_true", help="input is JSONL (implied by a .jsonl file name)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    options.model(p)
    p.add_argument(
        "--kind", choices=KINDS, default="document", help="apply the model's query/document prefix"
    )
    p.add_argument("--instruction", default=None, help="free instruction prefix, overrides --kind's prefix")
    p.add_argument("--mode", choices=MODES, default="full", help="full (default), chunk or late")
    p.add_argument(
        "--chunk-tokens",
        type=options.positive_int,
        default=None,
        help=f"tokens per chunk (default: {DEFAULT_CHUNK_TOKENS}, or what fits next to the prefix)",
    )
    p.add_argument(
        "--overlap", type=options.non_negative_int, default=32, help="overlapping tokens between chunks"
    )
    p.add_argument(
        "--dimensions",
        type=options.positive_int,
        default=None,
        help="a Matryoshka size of the model (e.g. 256 for nomic-embed-text-v1.5): shorter vectors",
    )
    options.batch_tokens(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--empty", choices=("skip", "error"), default="skip", help="what to do with blank lines")
    options.progress(p, "on when stderr is a terminal")
    p.set_defaults(run=run)


def read_inputs(source: str, jsonl: bool, field: str, empty: str) -> tuple[list[Record], list[Skipped], int]:
    """Texts with their line numbers, the lines skipped as bad, and how many blank lines were left out."""
    name = "<stdin>" if source == "-" else source
    data = read_bytes(source, sys.stdin.buffer)
    texts: list[Record] = []
    bad: list[Skipped] = []
    blank = 0
    for item in iter_lines(name, data, jsonl=jsonl or name.endswith(".jsonl"), field=field):
        if isinstance(item, Record):
            texts.append(item)
        elif not item.blank:
            bad.append(item)
        elif empty == "error":
            raise errors.UsageError(f"{item.source}: empty line (use --empty skip to skip empty lines)")
        else:
            blank += 1
    return texts, bad, blank


def run(args: argparse.Namespace) -> int:
    from longembed.encoder import load_model

    if args.mode != "full" and args.output.endswith(".npy"):
        raise errors.UsageError(
            "--mode chunk/late gives a variable number of vectors per text; write JSONL, not .npy"
        )
    inputs, bad, blank = read_inputs(args.input, args.jsonl, args.field, args.empty)
    for item in bad:
        print(f"skipped {item.source}: {item.reason}", file=sys.stderr)
    if blank:
        print(f"skipped {blank} empty line(s)", file=sys.stderr)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    docs = model.embed_chunks(
        [item.text for item in inputs],
        mode=args.mode,
        chunk_tokens=args.chunk_tokens,
        overlap=args.overlap,
        kind=args.kind,
        instruction=args.instruction,
        batch_tokens=args.batch_tokens,
        progress=progress,
        dimensions=args.dimensions,
    )
    if args.output.endswith(".npy"):
        dim = args.dimensions or model.info.dim
        matrix = np.stack([doc[0].vector for doc in docs]) if docs else np.zeros((0, dim), np.float32)
        np.save(args.output, matrix)
    else:
        out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
        try:
            for item, doc in zip(inputs, docs, strict=True):
                out.write(json.dumps(_row(item, doc, args.mode)) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
    truncated = sum(doc[0].truncated for doc in docs)
    if truncated:
        print(f"{truncated} text(s) truncated at {model.info.max_tokens} tokens", file=sys.stderr)
    return errors.FAILURE if bad else errors.OK


def _row(item: Record, doc: list, mode: str) -> dict:
    row: dict = {"line": item.line}
    if item.id is not None:
        row["id"] = item.id
    if mode == "full":
        row["truncated"] = doc[0].truncated
        row["embedding"] = doc[0].vector.tolist()
    else:
        row["chunks"] = [
            {"start": c.start, "end": c.end, "n_tokens": c.n_tokens, "embedding": c.vector.tolist()}
            for c in doc
        ]
    return row
