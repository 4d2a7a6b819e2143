"""Collections: a named set of documents embedded by one model with one chunking setup.

Each collection owns a chunk table `longembed."chunks_<id>"` with a `vector(dim)` column and an HNSW
index (why one table per collection: migrations/versions/0001_init.sql). Table names come from the
numeric id through psycopg.sql.Identifier, never from the user's collection name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, overload

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from longembed.encoder.chunking import check_mode, default_chunk_tokens
from longembed.encoder.profiles import check_dimensions

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_HNSW_DIM = 2000

# distance -> (pgvector operator, HNSW operator class)
DISTANCES: dict[str, tuple[str, str]] = {
    "cosine": ("<=>", "vector_cosine_ops"),
    "l2": ("<->", "vector_l2_ops"),
    "ip": ("<#>", "vector_ip_ops"),
}


class ModelDescription(Protocol):
    """What a collection needs to know of a model (encoder.ModelInfo has these fields)."""

    name: str
    source: str  # hub id or absolute folder: loads the model again from anywhere (models.get_model)
    revision: str
    dim: int
    max_tokens: int
    pooling: str
    prefixes: dict[str, str]


class CountingModel(Protocol):
    """A loaded model (encoder.EmbeddingModel): its description and its tokenizer's counts."""

    info: ModelDescription

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


class CollectionNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no collection named {name!r} (see `longembed collection list`)")
        self.name = name


@dataclass(frozen=True)
class Collection:
    id: int
    name: str
    model_name: str  # display name
    model_source: str  # what plugin.models.get_model loads the model from
    model_revision: str
    dim: int
    mode: str
    chunk_tokens: int
    overlap: int
    query_prefix: str | None
    document_prefix: str | None
    distance: str
    hnsw_m: int
    hnsw_ef_construction: int
    text_search_config: str
    created_at: datetime
    bm25_k1: float  # Okapi BM25's term frequency saturation (search_bm25, migrations/functions/012_bm25.sql)
    bm25_b: float  # and its length normalisation

    @property
    def chunk_table(self) -> sql.Composable:
        return sql.Identifier("longembed", f"chunks_{self.id}")

    @property
    def operator(self) -> sql.SQL:
        return sql.SQL(DISTANCES[self.distance][0])


_COLUMNS = sql.SQL(", ").join(
    sql.Identifier(name) for name in Collection.__dataclass_fields__ if name != "text_search_config"
) + sql.SQL(", text_search_config::text")


def check_bm25_parameters(k1: float | None, b: float | None) -> None:
    """The ranges the collections table's CHECKs and longembed.search_bm25 accept (None: not given)."""
    if k1 is not None and not (isinstance(k1, int | float) and 0 <= k1 <= 10):
        raise ValueError(f"BM25 k1 must be a number in 0..10, got {k1!r}")
    if b is not None and not (isinstance(b, int | float) and 0 <= b <= 1):
        raise ValueError(f"BM25 b must be a number in 0..1, got {b!r}")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid collection name {name!r}: use 1-63 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def create_collection(
    conn: psycopg.Connection,
    name: str,
    model: CountingModel | ModelDescription,
    *,
    mode: str = "chunk",
    chunk_tokens: int | None = None,
    overlap: int = 32,
    query_prefix: str | None = None,
    document_prefix: str | None = None,
    distance: str = "cosine",
    hnsw_m: int = 16,
    hnsw_ef_construction: int = 64,
    text_search_config: str = "english",
    dimensions: int | None = None,
    bm25_k1: float = 1.2,
    bm25_b: float = 0.75,
) -> Collection:
    """Create a collection for `model` with its chunk table and HNSW index.

    `model`: the loaded model, or only its ModelInfo where the document prefix is empty (a prefix's
    tokens can only be counted with the model's tokenizer). `chunk_tokens` defaults as in the encoder
    (encoder.chunking.default_chunk_tokens): what fits the model's window next to [CLS], [SEP] and the
    document prefix, at most DEFAULT_CHUNK_TOKENS. Prefixes default (None) to the model's own.
    `dimensions`: the vectors' size, the model's own by default, or one of its Matryoshka sizes
    (`matryoshka_dims`): its vectors, documents' and queries', are then cut to that size.
    `bm25_k1` (0..10) and `bm25_b` (0..1): the collection's Okapi BM25 parameters (store.bm25).
    """
    validate_name(name)
    info: ModelDescription = getattr(model, "info", model)
    check_mode(mode, info.pooling, info.name)
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}: expected one of {', '.join(DISTANCES)}")
    # ModelInfo's matryoshka_dims: the shorter sizes it was trained to give (none for most models).
    check_dimensions(dimensions, info.dim, getattr(info, "matryoshka_dims", ()), info.name)
    dim = info.dim if dimensions is None else dimensions
    if not 1 <= dim <= MAX_HNSW_DIM:
        raise ValueError(f"dimension {dim} is outside 1..{MAX_HNSW_DIM}, what pgvector HNSW indexes")
    prefix = info.prefixes["document"] if document_prefix is None else document_prefix
    prefix_tokens = 0
    if prefix:
        if not hasattr(model, "count_tokens"):
            raise TypeError(f"document prefix {prefix!r}: pass the model, not its info, to count its tokens")
        prefix_tokens = model.count_tokens([prefix])[0]
    room = info.max_tokens - 2 - prefix_tokens
    if room < 1:
        raise ValueError(
            f"the document prefix takes {prefix_tokens} tokens: nothing fits in {info.max_tokens}"
        )
    chunk_tokens = default_chunk_tokens(room) if chunk_tokens is None else int(chunk_tokens)
    if not 0 < chunk_tokens <= room:
        raise ValueError(
            f"chunk_tokens must be in 1..{room} for {info.name} ({info.max_tokens} minus [CLS], [SEP] "
            f"and {prefix_tokens} document prefix tokens), got {chunk_tokens}"
        )
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap must be in 0..{chunk_tokens - 1}, got {overlap}")
    if not (2 <= hnsw_m <= 100 and 4 <= hnsw_ef_construction <= 1000):
        raise ValueError("hnsw_m must be in 2..100 and hnsw_ef_construction in 4..1000")
    check_bm25_parameters(bm25_k1, bm25_b)
    with conn.transaction():
        if get_collection(conn, name, missing_ok=True) is not None:
            raise ValueError(f"collection {name!r} already exists")
        try:
            row = conn.execute(
                """INSERT INTO longembed.collections (name, model_name, model_source, model_revision, dim,
                       mode, chunk_tokens, overlap, query_prefix, document_prefix, distance, hnsw_m,
                       hnsw_ef_construction, text_search_config, bm25_k1, bm25_b)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::regconfig, %s, %s)
                   RETURNING id""",
                (
                    name,
                    info.name,
                    info.source,
                    info.revision,
                    dim,
                    mode,
                    chunk_tokens,
                    overlap,
                    query_prefix,
                    document_prefix,
                    distance,
                    hnsw_m,
                    hnsw_ef_construction,
                    text_search_config,
                    bm25_k1,
                    bm25_b,
                ),
            ).fetchone()
        except psycopg.errors.UndefinedObject as exc:
            raise ValueError(f"unknown text search configuration {text_search_config!r}") from exc
        except psycopg.errors.UniqueViolation as exc:  # created concurrently since the check above
            raise ValueError(f"collection {name!r} already exists") from exc
        assert row is not None
        # The owner of schema longembed makes the table (SECURITY DEFINER, 030_collection_tables.sql):
        # writers need no CREATE on the schema.
        conn.execute("SELECT longembed.create_chunk_table(%s)", (row[0],))
    return get_collection(conn, name)


@overload
def get_collection(
    conn: psycopg.Connection, name: str, *, missing_ok: Literal[False] = False
) -> Collection: ...
@overload
def get_collection(conn: psycopg.Connection, name: str, *, missing_ok: bool) -> Collection | None: ...
def get_collection(conn: psycopg.Connection, name: str, *, missing_ok: bool = False) -> Collection | None:
    """The collection called `name`; CollectionNotFound unless `missing_ok` (then None)."""
    if not isinstance(name, str):
        raise TypeError(f"collection name must be a str, got {type(name).__name__}")
    if not NAME_PATTERN.match(name):  # cannot exist (the table's CHECK); also keeps NUL away from the server
        if missing_ok:
            return None
        raise CollectionNotFound(name)
    with conn.cursor(row_factory=class_row(Collection)) as cur:
        found = cur.execute(
            sql.SQL("SELECT {} FROM longembed.collections WHERE name = %s").format(_COLUMNS), (name,)
        ).fetchone()
    if found is None and not missing_ok:
        raise CollectionNotFound(name)
    return found


def list_collections(conn: psycopg.Connection) -> list[Collection]:
    with conn.cursor(row_factory=class_row(Collection)) as cur:
        return cur.execute(
            sql.SQL("SELECT {} FROM longembed.collections ORDER BY name").format(_COLUMNS)
        ).fetchall()


def collection_stats(conn: psycopg.Connection, collection: Collection) -> dict[str, int]:
    """Document counts by status, queue length and number of chunks."""
    counts = dict(
        conn.execute(
            "SELECT status, count(*) FROM longembed.documents WHERE collection_id = %s GROUP BY status",
            (collection.id,),
        ).fetchall()
    )
    (chunks,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(collection.chunk_table)).fetchone()
    return {
        "documents": sum(counts.values()),
        "embedded": counts.get("embedded", 0),
        "queued": counts.get("queued", 0),
        "failed": counts.get("failed", 0),
        "chunks": chunks,
    }


def drop_collection(conn: psycopg.Connection, name: str, *, missing_ok: bool = False) -> bool:
    """Drop a collection, its documents, chunks and queue items, and the triggers feeding it.

    Returns False when it did not exist and `missing_ok`.
    """
    with conn.transaction():
        collection = get_collection(conn, name, missing_ok=missing_ok)
        if collection is None:
            return False
        # Lock first so a concurrent upsert cannot add a document between the checks and the drop.
        conn.execute("SELECT 1 FROM longembed.collections WHERE id = %s FOR UPDATE", (collection.id,))
        for (table_oid,) in conn.execute(
            "SELECT t.table_oid::oid::bigint FROM longembed.vectorized_tables t "
            "JOIN pg_class c ON c.oid = t.table_oid WHERE t.collection_id = %s",
            (collection.id,),
        ).fetchall():
            _drop_triggers(conn, table_oid, collection.id)
        # The chunk table belongs to the schema's owner: it drops the table and the row for us.
        conn.execute("SELECT longembed.delete_collection(%s)", (collection.id,))
    return True


def _drop_triggers(conn: psycopg.Connection, table_oid: int, collection_id: int) -> None:
    schema, table = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = %s::oid",
        (table_oid,),
    ).fetchone()
    # The names longembed.vectorize_table() gives the row and TRUNCATE triggers (010_documents.sql).
    for name in (f"longembed_vectorize_{collection_id}", f"longembed_vectorize_{collection_id}_truncate"):
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(name), sql.Identifier(schema, table)
            )
        )
