"""Evaluation data: documents, queries and relevance judgements, from a BEIR folder or one JSONL file.

BEIR folder: `corpus.jsonl` (`_id`, `text`, optional `title`), `queries.jsonl` (`_id`, `text`),
`qrels/<split>.tsv` (header `query-id	corpus-id	score`, then one judgement a line) and, when present,
`manifest.json` (bench/devsets.py writes one; it is reported with the results).

One JSONL file, a record a line, in any order:
    {"type": "doc", "id": "d1", "text": "...", "title": "optional"}
    {"type": "query", "id": "q1", "text": "..."}
    {"type": "qrel", "query": "q1", "doc": "d1", "score": 1}      (score: optional, default 1)

Lines go through ingest's reader (`iter_lines`: strict UTF-8, blank lines left out) and a bad line is
skipped with its `file:line` and reason, as `longembed ingest` reports it. A document's text is its title
and text joined by a blank line. Repeated ids keep the first record (the rest are skipped, with their
line). Judgements naming an unknown document or query are dropped and counted; queries with no relevant
document (score > 0) in the corpus are not evaluated and are counted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longembed.plugin.pipeline.ingest import InputError, Skipped, _unstorable, iter_lines, read_bytes
from longembed.plugin.store.documents import Document, InvalidDocument, validate_document

QRELS_HEADER = ("query-id", "corpus-id", "score")


@dataclass
class Dataset:
    documents: list[Document]
    queries: dict[str, str]  # id -> text, only those with at least one relevant document in the corpus
    qrels: dict[str, dict[str, int]]  # query id -> {document id: grade}
    source: str
    format: str  # "beir" or "jsonl"
    manifest: dict[str, Any] | None = None
    skipped: list[Skipped] = field(default_factory=list)  # bad or repeated lines, with file:line
    dropped: Counter[str] = field(default_factory=Counter)  # judgements / queries left out, by reason


def load(path: str | Path, split: str = "test") -> Dataset:
    """Read a BEIR folder or a JSONL file; InputError (a ValueError: exit 2) when it cannot be used."""
    path = Path(path)
    if path.is_dir():
        data = _load_beir(path, split)
    elif path.is_file():
        data = _load_jsonl(path)
    else:
        raise InputError(f"{path}: no such file or folder (expected a BEIR folder or a JSONL file)")
    return _settle(data)


@dataclass
class _Raw:
    source: str
    format: str
    documents: dict[str, Document] = field(default_factory=dict)
    queries: dict[str, str] = field(default_factory=dict)
    qrels: list[tuple[str, str, int]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    manifest: dict[str, Any] | None = None


def _load_beir(folder: Path, split: str) -> _Raw:
    raw = _Raw(str(folder), "beir")
    corpus, queries, qrels = (
        folder / "corpus.jsonl",
        folder / "queries.jsonl",
        folder / "qrels" / f"{split}.tsv",
    )
    missing = [str(p.relative_to(folder)) for p in (corpus, queries, qrels) if not p.is_file()]
    if missing:
        raise InputError(f"{folder}: not a BEIR folder, missing {', '.join(missing)}")
    for where, obj in _objects(corpus, raw.skipped):
        _add_document(raw, where, obj, "_id")
    for where, obj in _objects(queries, raw.skipped):
        _add_query(raw, where, obj, "_id")
    _read_qrels(qrels, raw)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            raw.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raw.skipped.append(Skipped(str(manifest), f"not valid JSON, ignored ({exc})"))
    return raw


def _load_jsonl(file: Path) -> _Raw:
    raw = _Raw(str(file), "jsonl")
    for where, obj in _objects(file, raw.skipped):
        kind = obj.get("type")
        if kind == "doc":
            _add_document(raw, where, obj, "id")
        elif kind == "query":
            _add_query(raw, where, obj, "id")
        elif kind == "qrel":
            query, doc, score = obj.get("query"), obj.get("doc"), obj.get("score", 1)
            if not isinstance(query, str | int) or not isinstance(doc, str | int) or isinstance(query, bool):
                raw.skipped.append(Skipped(where, 'a qrel needs "query" and "doc" ids (strings or integers)'))
            elif isinstance(score, bool) or not isinstance(score, int):
                raw.skipped.append(Skipped(where, f'"score" must be an integer, got {score!r}'))
            else:
                raw.qrels.append((str(query), str(doc), score))
        else:
            raw.skipped.append(Skipped(where, f'"type" must be "doc", "query" or "qrel", got {kind!r}'))
    return raw


def _objects(file: Path, skipped: list[Skipped]):
    """(file:line, JSON object) for each good line; bad ones go to `skipped`."""
    for item in iter_lines(str(file), read_bytes(str(file)), jsonl=False):
        if isinstance(item, Skipped):
            if not item.blank:
                skipped.append(item)
            continue
        try:
            obj = json.loads(item.text)
        except json.JSONDecodeError as exc:
            skipped.append(Skipped(item.source, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except RecursionError:
            skipped.append(Skipped(item.source, "not valid JSON for us: nested too deeply"))
            continue
        if not isinstance(obj, dict):
            skipped.append(
                Skipped(item.source, f"a JSONL line must be a JSON object, got {type(obj).__name__}")
            )
            continue
        yield item.source, obj


def _ident(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value.strip() else None


def _add_document(raw: _Raw, where: str, obj: dict, id_key: str) -> None:
    ident, text, title = _ident(obj, id_key), obj.get("text"), obj.get("title") or ""
    if ident is None:
        raw.skipped.append(Skipped(where, f'needs "{id_key}" (a non-empty string or an integer)'))
    elif not isinstance(text, str) or not isinstance(title, str):
        raw.skipped.append(Skipped(where, '"text" (and "title") must be strings'))
    elif ident in raw.documents:
        raw.skipped.append(Skipped(where, f"document {ident!r} repeated; the first one is kept"))
    else:
        joined = f"{title.strip()}\n\n{text}" if title.strip() else text
        doc = Document(ident, joined, {})
        problem = _unstorable(ident)  # validate_document checks the text, not an id's surrogates
        try:
            if problem:
                raise InvalidDocument(f"document id {ident[:40]!r}: {problem}")
            validate_document(doc)
        except InvalidDocument as exc:
            raw.skipped.append(Skipped(where, str(exc)))
            return
        raw.documents[ident] = doc


def _add_query(raw: _Raw, where: str, obj: dict, id_key: str) -> None:
    ident, text = _ident(obj, id_key), obj.get("text")
    if ident is None:
        raw.skipped.append(Skipped(where, f'needs "{id_key}" (a non-empty string or an integer)'))
    elif not isinstance(text, str) or not text.strip() or _unstorable([ident, text]):
        raw.skipped.append(
            Skipped(where, 'needs a "text" holding a non-empty string (no NUL, valid Unicode)')
        )
    elif ident in raw.queries:
        raw.skipped.append(Skipped(where, f"query {ident!r} repeated; the first one is kept"))
    else:
        raw.queries[ident] = text


def _read_qrels(file: Path, raw: _Raw) -> None:
    for item in iter_lines(str(file), read_bytes(str(file)), jsonl=False):
        if isinstance(item, Skipped):
            if not item.blank:
                raw.skipped.append(item)
            continue
        cells = [c.strip() for c in item.text.split("\t")]
        if item.line == 1 and tuple(cells) == QRELS_HEADER:
            continue
        if len(cells) != 3 or not cells[0] or not cells[1]:
            raw.skipped.append(Skipped(item.source, "a judgement is query-id<TAB>corpus-id<TAB>score"))
            continue
        try:
            raw.qrels.append((cells[0], cells[1], int(cells[2])))
        except ValueError:
            raw.skipped.append(Skipped(item.source, f"score must be an integer, got {cells[2]!r}"))


def _settle(raw: _Raw) -> Dataset:
    """Keep the judgements that name known documents and queries; keep the queries that have one."""
    if not raw.documents:
        raise InputError(f"{raw.source}: no documents (the corpus is empty or every line was skipped)")
    dropped: Counter[str] = Counter()
    qrels: dict[str, dict[str, int]] = {}
    for query, doc, score in raw.qrels:
        if query not in raw.queries:
            dropped["judgements naming an unknown query"] += 1
        elif doc not in raw.documents:
            dropped["judgements naming an unknown document"] += 1
        elif doc in qrels.get(query, {}):
            dropped["judgements repeated (the first one is kept)"] += 1
        else:
            qrels.setdefault(query, {})[doc] = score
    queries = {}
    for ident, text in raw.queries.items():
        if any(grade > 0 for grade in qrels.get(ident, {}).values()):
            queries[ident] = text
        else:
            dropped["queries without a relevant document in the corpus"] += 1
    if not queries:
        raise InputError(f"{raw.source}: no query has a relevant document in the corpus: nothing to evaluate")
    return Dataset(
        documents=list(raw.documents.values()),
        queries=queries,
        qrels={q: qrels[q] for q in queries},
        source=raw.source,
        format=raw.format,
        manifest=raw.manifest,
        skipped=raw.skipped,
        dropped=dropped,
    )
