-- longembed schema, version 1: collections, documents, the ingestion queue and vectorized tables.
-- Everything lives in schema longembed; the runner creates the schema and its own
-- longembed.schema_migrations table before this file runs.
--
-- Chunk vectors are NOT in a shared table: each collection gets its own table
-- longembed."chunks_<collection id>" with a typed vector(dim) column and its own HNSW index, created by
-- longembed.plugin.store.collections.create_collection. pgvector's HNSW index needs a fixed dimension; the alternative
-- (one untyped vector column with one partial expression index per collection) only uses the index when
-- every query repeats the exact cast and WHERE predicate, and otherwise falls silently to a sequential
-- scan. A table per collection also keeps each index and its planner statistics to one collection and
-- makes dropping a collection a DROP TABLE.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE longembed.collections (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Names are data, never SQL: the chunk table is named by id. The check gives a clear error early.
    name                text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    model_name          text NOT NULL,
    model_revision      text NOT NULL,
    -- pgvector HNSW indexes vector columns of up to 2000 dimensions.
    dim                 integer NOT NULL CHECK (dim BETWEEN 1 AND 2000),
    mode                text NOT NULL DEFAULT 'chunk' CHECK (mode IN ('full', 'chunk', 'late')),
    chunk_tokens        integer NOT NULL DEFAULT 256 CHECK (chunk_tokens > 0),
    overlap             integer NOT NULL DEFAULT 32 CHECK (overlap >= 0 AND overlap < chunk_tokens),
    -- NULL means "the model's own prefix"; '' means no prefix.
    query_prefix        text,
    document_prefix     text,
    distance            text NOT NULL DEFAULT 'cosine' CHECK (distance IN ('cosine', 'l2', 'ip')),
    hnsw_m              integer NOT NULL DEFAULT 16 CHECK (hnsw_m BETWEEN 2 AND 100),
    hnsw_ef_construction integer NOT NULL DEFAULT 64 CHECK (hnsw_ef_construction BETWEEN 4 AND 1000),
    text_search_config  regconfig NOT NULL DEFAULT 'english',
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE longembed.documents (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    collection_id   bigint NOT NULL REFERENCES longembed.collections (id) ON DELETE CASCADE,
    external_id     text NOT NULL CHECK (external_id <> ''),
    text            text NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    -- sha256 of the UTF-8 text: same hash + same model revision means the vectors are still right.
    content_hash    bytea NOT NULL,
    -- Lexical side of hybrid search, in the collection's text search configuration.
    tsv             tsvector,
    status          text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'embedded', 'failed')),
    error           text,
    attempts        integer NOT NULL DEFAULT 0,
    -- Revision of the model that produced the current chunks (NULL until embedded).
    model_revision  text,
    -- How many times chunks were written for this row: the tests' "embedded exactly once" counter.
    embed_count     integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    embedded_at     timestamptz,
    UNIQUE (collection_id, external_id)
);
CREATE INDEX documents_metadata_idx ON longembed.documents USING gin (metadata jsonb_path_ops);
CREATE INDEX documents_tsv_idx ON longembed.documents USING gin (tsv);
CREATE INDEX documents_status_idx ON longembed.documents (collection_id, status);

-- One row per document waiting for (re-)embedding. Workers lease rows instead of holding one long
-- transaction (see plugin/queue.py).
CREATE TABLE longembed.queue (
    document_id     bigint PRIMARY KEY REFERENCES longembed.documents (id) ON DELETE CASCADE,
    collection_id   bigint NOT NULL REFERENCES longembed.collections (id) ON DELETE CASCADE,
    enqueued_at     timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    leased_until    timestamptz,
    -- Random per claim; a worker writes results only for rows still carrying its token.
    lease_token     uuid,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text
);
CREATE INDEX queue_ready_idx ON longembed.queue (next_attempt_at, document_id);

-- User tables whose text column feeds a collection through triggers (plugin/vectorize.py).
CREATE TABLE longembed.vectorized_tables (
    table_oid       regclass PRIMARY KEY,
    id_column       name NOT NULL,
    text_column     name NOT NULL,
    collection_id   bigint NOT NULL REFERENCES longembed.collections (id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now()
);
