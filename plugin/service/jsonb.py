"""jsonb containment (`metadata @> filter`) in Python, as PostgreSQL decides it, for the hnswlib fast
path's filtered searches from memory (ann.py).

PostgreSQL's rules (jsonb_util.c, JsonbDeepContains): an object contains an object when every key of the
pattern is present and its value contains the pattern's value; an array contains an array when every
element of the pattern is contained in some element (order and duplicates do not matter); a scalar only
equals a scalar of the same kind: numbers by numeric value (1 = 1.0 = 1e0), strings exactly, true, false
and null only themselves (true is not 1). The "array contains a bare scalar" case applies at the top
level only, and a filter is always an object, so it never arises here.

Numbers are compared as Decimal: the metadata's text (jsonb's output) is parsed with Decimal, and a
filter's Python float becomes the Decimal of the text psycopg sends PostgreSQL (its repr).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any


class Unsupported(ValueError):
    """A filter value PostgreSQL would reject or that JSON cannot hold (NaN, Infinity, another type):
    the database path answers (with its error)."""


def pattern(value: Any) -> Any:
    """A filter as Python objects (from JSON or a caller) -> the form `contains` compares."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        number = Decimal(repr(value))
        if not number.is_finite():
            raise Unsupported(f"{value!r} is not a JSON number")
        return number
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise Unsupported("object keys must be strings")
        return {key: pattern(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [pattern(item) for item in value]
    raise Unsupported(f"{type(value).__name__} is not JSON")


def parse(text: str) -> Any:
    """jsonb's text output -> the form `contains` compares."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def contains(value: Any, wanted: Any) -> bool:
    """value @> wanted, both in the forms above."""
    if isinstance(wanted, dict):
        return isinstance(value, dict) and all(
            key in value and contains(value[key], item) for key, item in wanted.items()
        )
    if isinstance(wanted, list):
        return isinstance(value, list) and all(any(contains(v, item) for v in value) for item in wanted)
    if isinstance(wanted, bool) or isinstance(value, bool):
        return type(value) is type(wanted) and value == wanted
    if wanted is None:
        return value is None
    if isinstance(wanted, Decimal):
        return isinstance(value, Decimal) and value == wanted
    return isinstance(value, str) and value == wanted
