"""`longembed embed`: texts from a file or stdin to vectors as JSONL or .npy.

Input is plain text (one text per line) or JSONL (one object per line with a text field), read as
strict UTF-8. Empty lines are skipped by default (reported on stderr with their count) or refused
with `--empty error`. Output rows carry the 1-based input line number, so skipped lines never shift
which vector belongs to which text.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longembed.encoder.chunking import DEFAULT_CHUNK_TOKENS, MODES
from longembed.encoder.profiles import KINDS

PROGRESS_MIN_TEXTS = 1000


class InputError(ValueError):
    """Unreadable or malformed input; the message names the file and line."""


@dataclass(frozen=True)
class InputText:
    line: int  # 1-based line number in the input
    text: str
    id: str | None = None


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
    p.add_argument("--model", default=None, help="model folder or hub id (default: bundled all-MiniLM-L6-v2)")
    p.add_argument(
        "--kind", choices=KINDS, default="document", help="apply the model's query/document prefix"
    )
    p.add_argument("--instruction", default=None, help="free instruction prefix, overrides --kind's prefix")
    p.add_argument("--mode", choices=MODES, default="full", help="full (default), chunk or late")
    p.add_argument(
        "--chunk-tokens",
        type=_positive_int,
        default=None,
        help=f"tokens per chunk (default: {DEFAULT_CHUNK_TOKENS}, or what fits next to the prefix)",
    )
    p.add_argument("--overlap", type=_non_negative_int, default=32, help="overlapping tokens between chunks")
    p.add_argument(
        "--batch-tokens",
        type=_positive_int,
        default=None,
        help="token budget per batch (default: 4096 on CPU, 16384 on CUDA)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--empty", choices=("skip", "error"), default="skip", help="what to do with empty lines")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"progress bar on stderr (default: on for {PROGRESS_MIN_TEXTS}+ texts)",
    )
    p.set_defaults(run=run)


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def read_inputs(source: str, jsonl: bool, field: str, empty: str) -> tuple[list[InputText], int]:
    """Texts with their line numbers, and how many empty lines were skipped."""
    name = "<stdin>" if source == "-" else source
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if b"\x00" in raw[:8192]:
        raise InputError(f"{name}: looks like a binary file (NUL bytes); expected UTF-8 text")
    jsonl = jsonl or name.endswith(".jsonl")
    texts: list[InputText] = []
    skipped = 0
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{name}:{number}: invalid UTF-8 at byte {exc.start}") from exc
        if "\x00" in line:
            raise InputError(f"{name}:{number}: NUL character in text")
        if not line.strip():
            if empty == "error":
                raise InputError(f"{name}:{number}: empty line (use --empty skip to skip empty lines)")
            skipped += 1
            continue
        if jsonl:
            texts.append(_json_text(line, field, f"{name}:{number}", number))
        else:
            texts.append(InputText(number, line))
    return texts, skipped


def _json_text(line: str, field: str, where: str, number: int) -> InputText:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: invalid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
        raise InputError(f"{where}: no {field!r} field")
    text = obj[field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise InputError(f"{where}: NUL character in text")
    doc_id = obj.get("id")
    return InputText(number, text, None if doc_id is None else str(doc_id))


def run(args: argparse.Namespace) -> int:
    from longembed.encoder import ModelLoadError, load_model

    if args.mode != "full" and args.output.endswith(".npy"):
        return _fail("--mode chunk/late gives a variable number of vectors per text; write JSONL, not .npy")
    try:
        inputs, skipped = read_inputs(args.input, args.jsonl, args.field, args.empty)
    except InputError as exc:
        return _fail(str(exc))
    if skipped:
        print(f"skipped {skipped} empty line(s)", file=sys.stderr)
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype)
    except (ModelLoadError, ValueError) as exc:
        return _fail(str(exc))
    progress = args.progress if args.progress is not None else len(inputs) >= PROGRESS_MIN_TEXTS
    texts = [item.text for item in inputs]
    try:
        docs = model.embed_chunks(
            texts,
            mode=args.mode,
            chunk_tokens=args.chunk_tokens,
            overlap=args.overlap,
            kind=args.kind,
            instruction=args.instruction,
            batch_tokens=args.batch_tokens,
            progress=progress,
        )
    except ValueError as exc:
        return _fail(str(exc))
    if args.output.endswith(".npy"):
        matrix = (
            np.stack([doc[0].vector for doc in docs]) if docs else np.zeros((0, model.info.dim), np.float32)
        )
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
    return 0


def _row(item: InputText, doc: list, mode: str) -> dict:
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


def _fail(message: str) -> int:
    print(f"longembed embed: error: {message}", file=sys.stderr)
    return 2
