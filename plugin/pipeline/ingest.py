"""Turn paths (files, folders, JSONL, stdin) into Documents, with a reason for every input left out.

Text files become one document each (external id = the path as given, metadata {"path", "suffix"});
JSONL files hold one JSON object per line with "id", "text" and optional "metadata". Inputs that cannot
be documents are reported, never silently dropped: binary files (NUL bytes), invalid UTF-8, empty files,
files over the size limit, malformed JSONL lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from longembed.plugin.store.documents import MAX_DOCUMENT_CHARS, Document, InvalidDocument, validate_document

TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".org", ".tex", ".html", ".htm", ".csv", ".tsv"}
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
# UTF-8 needs at most 4 bytes per character: bigger files cannot fit MAX_DOCUMENT_CHARS.
_MAX_TEXT_BYTES = 4 * MAX_DOCUMENT_CHARS


@dataclass(frozen=True)
class Skipped:
    source: str  # path, "path:line" for JSONL, "stdin" or "-:line"
    reason: str


def iter_inputs(
    paths: list[str], *, fmt: str = "auto", stdin: BinaryIO | None = None
) -> Iterator[Document | Skipped]:
    """Documents and Skipped entries for `paths`, in order (folders walked in sorted order).

    `fmt`: "auto" (JSONL by suffix .jsonl/.ndjson, text otherwise; stdin is text), "text" or "jsonl".
    """
    if fmt not in ("auto", "text", "jsonl"):
        raise ValueError(f"unknown format {fmt!r}: expected auto, text or jsonl")
    for raw in paths:
        if raw == "-":
            if stdin is None:
                raise ValueError("'-' given but no stdin to read")
            data = stdin.read()
            if fmt == "jsonl":
                yield from _jsonl_lines("-", data.splitlines())
            else:
                yield _text_document("stdin", data)
            continue
        path = Path(raw)
        if path.is_dir():
            for file in _walk(path):
                if file.suffix.lower() in JSONL_SUFFIXES or file.suffix.lower() in TEXT_SUFFIXES:
                    yield from _file(file, fmt)
                else:
                    yield Skipped(str(file), f"not a text or JSONL file type ({file.suffix or 'no suffix'})")
        elif path.is_file():
            yield from _file(path, fmt)
        elif path.exists():
            yield Skipped(raw, "not a regular file or folder")
        else:
            yield Skipped(raw, "no such file or folder")


def _walk(folder: Path) -> Iterator[Path]:
    """Files under `folder`, sorted, skipping hidden entries (.git, .venv, editor files)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _file(path: Path, fmt: str) -> Iterator[Document | Skipped]:
    source = str(path)
    is_jsonl = fmt == "jsonl" or (fmt == "auto" and path.suffix.lower() in JSONL_SUFFIXES)
    try:
        if is_jsonl:
            with path.open("rb") as handle:
                yield from _jsonl_lines(source, handle)
            return
        size = path.stat().st_size
        if size > _MAX_TEXT_BYTES:
            yield Skipped(
                source,
                f"too large ({size:,} bytes; a document holds at most {MAX_DOCUMENT_CHARS:,} characters)",
            )
            return
        data = path.read_bytes()
    except OSError as exc:
        yield Skipped(source, f"cannot read: {exc.strerror or exc}")
        return
    doc = _text_document(source, data)
    if isinstance(doc, Document):
        doc = Document(doc.external_id, doc.text, {"path": source, "suffix": path.suffix.lower()})
    yield doc


def _decode(data: bytes) -> str:
    """The text of `data`, or raise ValueError with the reason it is not a text."""
    if not data:
        raise ValueError("empty file")
    if b"\x00" in data:
        raise ValueError("binary file (contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise ValueError("empty (whitespace only)")
    return text


def _text_document(source: str, data: bytes) -> Document | Skipped:
    try:
        doc = Document(source, _decode(data), {})
        validate_document(doc)
    except ValueError as exc:  # InvalidDocument too
        return Skipped(source, str(exc))
    return doc


def _jsonl_lines(source: str, lines: Iterable[bytes]) -> Iterator[Document | Skipped]:
    for lineno, raw in enumerate(lines, start=1):
        where = f"{source}:{lineno}"
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            yield Skipped(where, f"not valid JSON: {exc}")
            continue
        if not isinstance(record, dict):
            yield Skipped(where, "a JSONL line must be a JSON object with id and text")
            continue
        ident, text, metadata = record.get("id"), record.get("text"), record.get("metadata", {})
        if isinstance(ident, int) and not isinstance(ident, bool):
            ident = str(ident)
        if not isinstance(ident, str) or not isinstance(text, str):
            yield Skipped(where, 'needs "id" (string or integer) and "text" (string)')
            continue
        if metadata is None:
            metadata = {}
        doc = Document(ident, text, metadata)
        try:
            validate_document(doc)
        except InvalidDocument as exc:
            yield Skipped(where, str(exc))
            continue
        yield doc
