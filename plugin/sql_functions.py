"""Bodies of the PL/Python SQL functions (migrations/functions/020_embed.sql).

The SQL bodies are two lines: import this module, call one function with `plpy`. Everything else lives
here, as plain Python. The module lives once per backend process, so the model (longembed.plugin.models) is
loaded by a backend's first call (~2 s) and reused by every later call of that backend. Recent results
are kept too: a STABLE function is evaluated once per row where the planner cannot hoist it (a WHERE
clause on a sequential scan), and the cache turns those repeats into a dictionary lookup.

Model: the setting `longembed.model` (`SET longembed.model = 'path/or/hub-id'`), else the bundled one;
roles without superuser rights may only name models that a collection already uses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np

KINDS = ("query", "document")
MODEL_SETTING = "longembed.model"
_CACHE_ENTRIES = 256
_CACHE_MAX_CHARS = 10_000  # longer texts are not kept: the cache must stay small
_INVALID_PARAMETER = "22023"
_UNDEFINED_OBJECT = "42704"
_DATA_EXCEPTION = "22000"
_INSUFFICIENT_PRIVILEGE = "42501"

_results: OrderedDict[tuple[str, str, str], str] = OrderedDict()
texts_embedded = 0  # texts this backend sent to the model (diagnostics: the cache at work)


def vector_literal(vector: np.ndarray) -> str:
    """pgvector's text form. repr() of a float32 widened to a float64 is the shortest text that parses
    back (strtof) to the same float32, so the stored vector equals the computed one bit for bit."""
    return "[" + ",".join(repr(x) for x in vector.astype(np.float32).tolist()) + "]"


def _model_name(plpy: Any) -> str | None:
    """The model `longembed.model` names (None: the bundled one).

    Any session may SET the setting, and the backend reads model files as the server's operating-system
    user, so a role without superuser rights may only name a model some collection already uses.
    """
    rows = plpy.execute(
        f"""SELECT pg_catalog.current_setting('{MODEL_SETTING}', true) AS name,
                   (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) AS superuser"""
    )
    name = rows[0]["name"] or None  # unset (NULL) or RESET ('') -> the bundled default
    if name is not None and not rows[0]["superuser"]:
        plan = plpy.prepare("SELECT 1 FROM longembed.collections WHERE model_name = $1 LIMIT 1", ["text"])
        if not plpy.execute(plan, [name]).nrows():
            plpy.error(
                f"longembed: only a superuser may load model {name!r}, which no collection uses",
                hint=f"RESET {MODEL_SETTING} for the bundled model, or ask an administrator",
                sqlstate=_INSUFFICIENT_PRIVILEGE,
            )
    return name


def _load(plpy: Any, name: str | None) -> Any:
    from longembed.encoder import ModelLoadError
    from longembed.plugin.models import get_model

    try:
        return get_model(name)
    except ModelLoadError as exc:
        plpy.error(
            f"longembed: cannot load model {name or '(bundled default)'}: {exc}",
            hint=f"check the setting {MODEL_SETTING} (RESET it for the bundled model)",
            sqlstate=_UNDEFINED_OBJECT,
        )


def _check_kind(plpy: Any, kind: str) -> None:
    if kind not in KINDS:
        plpy.error(
            f"longembed: kind must be 'query' or 'document', got {kind!r}",
            hint="queries get the model's query prefix, documents its document prefix",
            sqlstate=_INVALID_PARAMETER,
        )


def embed_texts(plpy: Any, texts: Sequence[str | None], kind: str) -> list[str | None]:
    """Vectors (pgvector text form) for `texts`, NULL for NULL elements; one model call for the misses."""
    _check_kind(plpy, kind)
    name = _model_name(plpy)
    key_name = name or ""
    out: list[str | None] = [None] * len(texts)
    missing: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        if text is None:
            continue
        cached = _results.get((key_name, kind, text))
        if cached is not None:
            _results.move_to_end((key_name, kind, text))
            out[i] = cached
        else:
            missing.setdefault(text, []).append(i)
    if missing:
        global texts_embedded
        model = _load(plpy, name)
        unique = list(missing)
        texts_embedded += len(unique)
        for text, vector in zip(unique, model.embed(unique, kind=kind), strict=True):
            literal = vector_literal(vector)
            for i in missing[text]:
                out[i] = literal
            if len(text) <= _CACHE_MAX_CHARS:
                _results[(key_name, kind, text)] = literal
                if len(_results) > _CACHE_ENTRIES:
                    _results.popitem(last=False)
    return out


def embed_text(plpy: Any, text: str, kind: str) -> str:
    return embed_texts(plpy, [text], kind)[0]


def embed_query(plpy: Any, collection: str, text: str) -> str:
    """The query vector of `text` for a collection: its model, its query prefix, its dimension."""
    from longembed.plugin.store.collections import Collection
    from longembed.plugin.store.search import embed_query as python_embed_query

    plan = plpy.prepare("SELECT * FROM longembed.collections WHERE name = $1", ["text"])
    rows = plpy.execute(plan, [collection])
    if not rows.nrows():
        plpy.error(
            f"longembed: no collection named {collection!r}",
            hint="SELECT name FROM longembed.collections",
            sqlstate=_UNDEFINED_OBJECT,
        )
    row = rows[0]
    target = Collection(**{f.name: row[f.name] for f in fields(Collection)})
    try:
        vector = python_embed_query(target, text, _load(plpy, target.model_name))
    except ValueError as exc:  # empty query, dimension mismatch
        plpy.error(f"longembed: {exc}", sqlstate=_DATA_EXCEPTION)
    return vector_literal(vector)
