"""SQLAlchemy 2 (Core and ORM) for longembed's SQL functions: `embed()`, `embed_query()`, `search()`.

    from longembed.plugin.sqlalchemy import Vector, embed, search

    select(Note).order_by(Note.embedding.cosine_distance(embed("reset password"))).limit(5)
    hits = search("notes", "reset password", 5, filter={"lang": "en"})
    select(hits.c.external_id, hits.c.score)

Every function is the schema-qualified `longembed.*` one (a `public.embed` may be a user's own), and every
value travels as a bound parameter, so a text is only ever a text. Arguments the SQL layer checks (k, kind,
the filter's shape, blank texts) are left to it: its errors (SQLSTATE 22000/22023, "k must be in
1..1000", ...) reach the caller as they are. Optional arguments of search() are passed by name
(`filter => ...`) and only when given, so a parameter added later to longembed.search needs no change here.

`Vector` is pgvector-python's column type (same DDL, same `cosine_distance` / `l2_distance` /
`max_inner_product` comparators) loading values as float32 numpy arrays. Needs the `sqlalchemy` extra
(`pip install longembed[sqlalchemy]`) and the psycopg (3) driver, which longembed already depends on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
import sqlalchemy as sa
from pgvector.sqlalchemy import VECTOR
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import Function
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlalchemy.sql.visitors import InternalTraversal

if TYPE_CHECKING:
    from sqlalchemy.sql.visitors import _TraverseInternalsType

__all__ = [
    "SEARCH_COLUMNS",
    "Vector",
    "create_engine",
    "embed",
    "embed_query",
    "on_external_id",
    "search",
    "vectorize_table",
]

# The result columns of longembed.search() (migrations/functions/020_embed.sql), with their types.
SEARCH_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[Any]], ...] = (
    ("external_id", sa.Text()),
    ("score", sa.Double()),
    ("chunk_ordinal", sa.Integer()),
    ("char_start", sa.Integer()),
    ("char_end", sa.Integer()),
    ("snippet", sa.Text()),
    ("metadata", JSONB()),
    ("truncated", sa.Boolean()),
)


class Vector(VECTOR):
    """pgvector's `vector(dim)` column type whose values load as float32 numpy arrays (pgvector-python
    gives lists of floats, or its own Vector where the connection registered the type)."""

    cache_ok = True

    def result_processor(self, dialect: sa.Dialect, coltype: Any) -> Any:
        def process(value: Any) -> np.ndarray | None:
            return None if value is None else as_array(value)

        return process


def as_array(value: Any) -> np.ndarray:
    """A vector as PostgreSQL or a driver hands it over (text '[1,2]', pgvector's Vector, a list, an
    ndarray) as a float32 numpy array."""
    if isinstance(value, str):
        # pgvector prints the shortest text that parses back to the same float32.
        return np.array(value.strip("[]").split(","), dtype=np.float32)
    if hasattr(value, "to_numpy"):
        return np.asarray(value.to_numpy(), dtype=np.float32)
    return np.asarray(value, dtype=np.float32)


class _NamedArgument(ColumnElement[Any]):
    """`name => value`: PostgreSQL's named notation for a function argument."""

    __visit_name__ = "longembed_named_argument"
    inherit_cache = True
    # What SQLAlchemy's cache key and bind-parameter walk visit (declared by its base without ClassVar).
    _traverse_internals: _TraverseInternalsType = [  # noqa: RUF012
        ("name", InternalTraversal.dp_string),
        ("value", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, name: str, value: ColumnElement[Any]) -> None:
        self.name = name
        self.value = value
        self.type = value.type


@compiles(_NamedArgument)
def _compile_named_argument(element: _NamedArgument, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{compiler.preparer.quote(element.name)} => {compiler.process(element.value, **kw)}"


def _value(value: Any, type_: sa.types.TypeEngine[Any]) -> ColumnElement[Any]:
    """A SQL expression as it is (a column, an ORM attribute, another function); anything else a bound
    parameter of `type_`."""
    if hasattr(value, "__clause_element__"):
        value = value.__clause_element__()
    if isinstance(value, sa.ColumnElement):
        return value
    return sa.literal(value, type_)


def embed(
    text: str | ColumnElement[str], kind: str = "query", *, dim: int | None = None
) -> Function[np.ndarray]:
    """`longembed.embed(text, kind)`: the vector of `text` from the model host (the model's query
    prefix for kind 'query', its document prefix for 'document'). Its type is `Vector(dim)`: compare it
    with `Note.embedding.cosine_distance(embed(...))`, or select it for a numpy array. `text` may be a
    column (`embed(Note.body, "document")` embeds each row's text)."""
    return Function(
        "embed",
        _value(text, sa.Text()),
        _value(kind, sa.Text()),
        type_=Vector(dim),
        packagenames=("longembed",),
    )


def embed_query(
    collection: str | ColumnElement[str], query: str | ColumnElement[str], *, dim: int | None = None
) -> Function[np.ndarray]:
    """`longembed.embed_query(collection, query)`: the query vector a collection's search uses (its
    model, query prefix, dimension and revision)."""
    return Function(
        "embed_query",
        _value(collection, sa.Text()),
        _value(query, sa.Text()),
        type_=Vector(dim),
        packagenames=("longembed",),
    )


def search(
    collection: str | ColumnElement[str],
    query: str | ColumnElement[str],
    k: int | ColumnElement[int] = 10,
    *,
    filter: Mapping[str, Any] | ColumnElement[Any] | None = None,
    hybrid: bool | ColumnElement[bool] | None = None,
    ef_search: int | ColumnElement[int] | None = None,
    mode: str | ColumnElement[str] | None = None,
    weights: Mapping[str, float] | ColumnElement[Any] | None = None,
    fusion: str | ColumnElement[str] | None = None,
    rrf_k: int | ColumnElement[int] | None = None,
    name: str = "hits",
) -> TableValuedAlias:
    """`longembed.search(collection, query, k, ...)` as a table-valued function named `name`: the top-k
    documents, with typed columns `hits.c.external_id` (str), `score` (float), `chunk_ordinal`,
    `char_start`, `char_end` (int), `snippet` (str), `metadata` (dict), `truncated` (bool), best first
    when ordered by score descending (a FROM clause has no order of its own).

    `filter`: a JSON object the documents' metadata must contain; `hybrid`, `ef_search`, `mode`,
    `weights`, `fusion`, `rrf_k`: as the SQL function takes them (README: SQL, search modes). Each is
    sent by name (`mode => ...`), only when given, so a server whose longembed.search() lacks one
    refuses only the calls that use it.
    """
    args: list[ColumnElement[Any]] = [
        _value(collection, sa.Text()),
        _value(query, sa.Text()),
        _value(k, sa.Integer()),
    ]
    optional: tuple[tuple[str, Any, sa.types.TypeEngine[Any]], ...] = (
        ("filter", filter, JSONB()),
        ("hybrid", hybrid, sa.Boolean()),
        ("ef_search", ef_search, sa.Integer()),
        ("mode", mode, sa.Text()),
        ("weights", weights, JSONB()),
        ("fusion", fusion, sa.Text()),
        ("rrf_k", rrf_k, sa.Integer()),
    )
    args += [_NamedArgument(key, _value(value, type_)) for key, value, type_ in optional if value is not None]
    function: Function[Any] = Function("search", *args, packagenames=("longembed",))
    return function.table_valued(*(sa.column(key, type_) for key, type_ in SEARCH_COLUMNS), name=name)


def on_external_id(hits: TableValuedAlias, column: sa.ColumnElement[Any]) -> ColumnElement[bool]:
    """The join condition of search() rows to the rows of a table vectorized by longembed: the
    external id is the row's id as text, cast back to the column's type so the join uses its index."""
    return column == sa.cast(hits.c.external_id, column.type)


def vectorize_table(
    connection: sa.Connection,
    table: sa.Table | type,
    id_column: str,
    text_column: str,
    collection: str,
    *,
    backfill: bool = True,
) -> int:
    """`longembed.vectorize_table()` for a SQLAlchemy table or ORM class: keep `collection` in sync with
    one column of it (one document per row, external id = the row's id; triggers queue every change for
    the model host's worker). Returns how many rows were queued; ValueError for a missing table or
    column, CollectionNotFound (a LookupError) for a missing collection. Runs in the connection's
    transaction."""
    from longembed.plugin.store.vectorize import vectorize_table as store_vectorize_table

    table = table if isinstance(table, sa.Table) else sa.inspect(table).local_table
    qualified = connection.dialect.identifier_preparer.format_table(table)
    driver = connection.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError("vectorize_table needs SQLAlchemy's psycopg dialect (postgresql+psycopg://)")
    return store_vectorize_table(driver, qualified, id_column, text_column, collection, backfill=backfill)


def create_engine(dsn: str, **kwargs: Any) -> sa.Engine:
    """A SQLAlchemy engine (psycopg 3 dialect) for a libpq DSN as `longembed dsn` prints it, a URI or
    `key=value` words; `kwargs` go to sqlalchemy.create_engine (pool size, echo, ...).

    `prepare_threshold=None`, as longembed's own connections: no server-side prepared statement whose
    generic plan could sort a whole table instead of walking its HNSW index.
    """

    def connect() -> psycopg.Connection:
        return psycopg.connect(dsn, prepare_threshold=None)

    return sa.create_engine("postgresql+psycopg://", creator=connect, **kwargs)
