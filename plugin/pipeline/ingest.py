"""The one input reader of `longembed embed` and `longembed ingest`: lines, JSONL, files and folders.

Rules shared by both commands:
- input is strict UTF-8; a JSONL line is one JSON object with a text field (`text` unless `--field`),
  an optional `id` (a string, or an integer that becomes its decimal string) and, for ingest, optional
  `metadata` (an object, at most MAX_METADATA_DEPTH levels deep);
- a bad line is skipped with `file:line` and the reason, and never costs its neighbours: invalid
  UTF-8, invalid JSON, JSON nested too deeply to parse, a non-object, a missing or non-string text, a
  bad id, NUL characters or lone surrogates (`"\\ud800"`, which PostgreSQL cannot store) anywhere in
  the id, text or metadata;
- blank lines are no texts: they are counted (embed reports them) and left out.

Ingest also takes whole files (one document each) and folders (walked in sorted order, hidden entries
skipped). A file document's id is its resolved absolute path, so `docs/a.txt`, `./docs/a.txt` and
`/home/me/docs/a.txt` name one document whatever the working directory; its metadata is
{"path": id, "suffix": ".txt"}. Stdin as a whole text is the document `stdin`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import psycopg

from longembed.plugin.store.collections import Collection
from longembed.plugin.store.documents import (
    MAX_DOCUMENT_CHARS,
    Document,
    delete_documents,
    validate_document,
)

TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".org", ".tex", ".html", ".htm", ".csv", ".tsv"}
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
FORMATS = ("auto", "text", "jsonl")
# Deep enough for any real metadata; deeper nesting is refused before PostgreSQL's stack limit is.
MAX_METADATA_DEPTH = 32
# UTF-8 needs at most 4 bytes per character: bigger files cannot fit MAX_DOCUMENT_CHARS.
_MAX_TEXT_BYTES = 4 * MAX_DOCUMENT_CHARS
_BINARY_PROBE = 8192


class InputError(ValueError):
    """A whole input cannot be read (missing, unreadable, binary); the message names it."""


@dataclass(frozen=True)
class Record:
    """One text of an input: its line (1-based; None for a whole file), text, id and metadata."""

    source: str  # "path:line", or the path / "stdin" for a whole file
    line: int | None
    text: str
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    source: str  # path, "path:line" for a line, "stdin" or "-:line"
    reason: str
    blank: bool = False  # a blank line: not a problem, just no text


# ----------------------------------------------------------------------------------------- lines


def read_bytes(source: str, stdin: BinaryIO | None = None) -> bytes:
    """All bytes of a file, or of stdin for "-"; InputError when it cannot be read."""
    if source == "-":
        if stdin is None:
            raise InputError("'-' given but no stdin to read")
        return stdin.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None


def iter_lines(
    name: str, data: bytes, *, jsonl: bool, field: str = "text", metadata: bool = False
) -> Iterator[Record | Skipped]:
    """One Record per text line (or JSONL object) of `data`, a Skipped for every other line.

    `metadata`: read a JSONL line's "metadata" (ingest); embed ignores it.
    """
    if not jsonl and b"\x00" in data[:_BINARY_PROBE]:
        raise InputError(f"{name}: looks like a binary file (NUL bytes); expected UTF-8 text")
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{name}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield Skipped(where, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})")
            continue
        if not line.strip():
            yield Skipped(where, "empty line", blank=True)
        elif jsonl:
            yield _jsonl_record(line, where, number, field, metadata)
        elif "\x00" in line:
            yield Skipped(where, "NUL character in text")
        else:
            yield Record(where, number, line)


def _jsonl_record(line: str, where: str, number: int, field: str, with_metadata: bool) -> Record | Skipped:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return Skipped(where, f"not valid JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return Skipped(where, "not valid JSON for us: nested too deeply")
    if not isinstance(obj, dict):
        return Skipped(where, f"a JSONL line must be a JSON object, got {type(obj).__name__}")
    text = obj.get(field)
    if not isinstance(text, str):
        got = "nothing" if text is None else type(text).__name__
        return Skipped(where, f"needs a {field!r} field holding a string, got {got}")
    ident = obj.get("id")
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = str(ident)
    elif ident is not None and not isinstance(ident, str):
        return Skipped(where, f'"id" must be a string or an integer, got {type(ident).__name__}')
    metadata = obj.get("metadata") if with_metadata else None
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        return Skipped(where, f"metadata must be a JSON object, got {type(metadata).__name__}")
    for what, value in (("id", ident), (field, text), ("metadata", metadata)):
        problem = _unstorable(value)
        if problem:
            return Skipped(where, f"{what}: {problem}")
    return Record(where, number, text, ident, metadata)


def _unstorable(value: Any) -> str | None:
    """Why PostgreSQL cannot store `value` (a JSON value), or None. Iterative: depth is checked here."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            return f"nested deeper than {MAX_METADATA_DEPTH} levels"
        if isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "NUL character"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"lone surrogate {item[exc.start]!r} (not valid Unicode)"
    return None


# ------------------------------------------------------------------------------- files for ingest


def iter_inputs(
    paths: list[str], *, fmt: str = "auto", stdin: BinaryIO | None = None, field: str = "text"
) -> Iterator[Document | Skipped]:
    """Documents and Skipped entries for `paths`, in order (folders walked in sorted order).

    `fmt`: "auto" (JSONL by suffix .jsonl/.ndjson, a whole text otherwise; stdin is a text), "text" or
    "jsonl". Blank JSONL lines are left out silently.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected auto, text or jsonl")
    for raw in paths:
        if raw == "-":
            data = read_bytes("-", stdin)
            if fmt == "jsonl":
                yield from _documents(iter_lines("-", data, jsonl=True, field=field, metadata=True))
            else:
                yield _text_document("stdin", data)
            continue
        path = Path(raw)
        if path.is_dir():
            root = path.resolve()
            for file in _walk(root):
                if file.suffix.lower() in JSONL_SUFFIXES or file.suffix.lower() in TEXT_SUFFIXES:
                    yield from _file(file, fmt, field)
                else:
                    yield Skipped(str(file), f"not a text or JSONL file type ({file.suffix or 'no suffix'})")
        elif path.is_file():
            yield from _file(path.resolve(), fmt, field)
        elif path.exists():
            yield Skipped(raw, "not a regular file or folder")
        else:
            yield Skipped(raw, "no such file or folder")


def _documents(records: Iterable[Record | Skipped]) -> Iterator[Document | Skipped]:
    for item in records:
        if isinstance(item, Skipped):
            if not item.blank:
                yield item
            continue
        if item.id is None:
            yield Skipped(item.source, 'needs "id" (a string or an integer)')
            continue
        doc = Document(item.id, item.text, item.metadata)
        try:
            validate_document(doc)
        except ValueError as exc:  # InvalidDocument
            yield Skipped(item.source, str(exc))
            continue
        yield doc


def _walk(folder: Path) -> Iterator[Path]:
    """Files under `folder`, sorted, skipping hidden entries (.git, .venv, editor files)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _file(path: Path, fmt: str, field: str) -> Iterator[Document | Skipped]:
    source = str(path)
    is_jsonl = fmt == "jsonl" or (fmt == "auto" and path.suffix.lower() in JSONL_SUFFIXES)
    try:
        if is_jsonl:
            data = path.read_bytes()
            yield from _documents(iter_lines(source, data, jsonl=True, field=field, metadata=True))
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


# ------------------------------------------------------------------------------------------- prune


def prune_missing_files(conn: psycopg.Connection, collection: Collection, folders: list[str]) -> list[str]:
    """Delete the documents of files under `folders` that no longer exist; returns their ids.

    Only file documents (id == metadata.path, as ingest writes them) under a folder that still exists
    are candidates: JSONL records and other folders' files are never touched.
    """
    gone: list[str] = []
    for folder in folders:
        path = Path(folder)
        if folder == "-" or not path.is_dir():
            continue
        prefix = str(path.resolve()) + os.sep
        rows = conn.execute(
            "SELECT external_id FROM longembed.documents WHERE collection_id = %s "
            "AND starts_with(external_id, %s) AND metadata->>'path' = external_id",
            (collection.id, prefix),
        ).fetchall()
        gone += [ident for (ident,) in rows if not os.path.lexists(ident)]
    if gone:
        delete_documents(conn, collection, gone)
    return gone
