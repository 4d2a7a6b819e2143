-- longembed schema, version 6: a change log of vector tables, for indexes kept outside PostgreSQL (the
-- model host's hnswlib fast path, plugin/service/fastpath.py). PostgreSQL stays the source of truth: a
-- consumer builds its index from a table under one snapshot, then applies the rows whose keys the log
-- names, as they are at a later snapshot (migrations/functions/040_vector_changes.sql).
--
-- Why a transaction id beside the sequence: sequence values are handed out when a row is written, not
-- when its transaction commits, so seq 11 can become visible after seq 12 and a reader that kept only
-- "the highest seq seen" would skip it for ever. A consumer therefore keeps the snapshot it last read
-- under (pg_current_snapshot()) and next reads the changes whose transaction that snapshot did not
-- see (xid >= its xmin AND NOT pg_visible_in_snapshot): every committed change is read exactly once.
-- seq orders changes and measures lag; it is not the mark.

CREATE TABLE longembed.vector_changes (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The vector table in schema longembed (`chunks_<collection id>`) and the key of the changed row.
    source      text NOT NULL,
    document_id bigint NOT NULL,
    ordinal     integer NOT NULL,
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    changed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX vector_changes_source_xid_idx ON longembed.vector_changes (source, xid);

-- Who reads the log of a table. Changes are logged only while a table has a consumer (a database without
-- the fast path writes no log), and pruned below the oldest consumer's xmin. A consumer that has not
-- advanced for 7 days is dropped (its host is gone); if it comes back it finds itself missing and rebuilds.
CREATE TABLE longembed.vector_consumers (
    source      text NOT NULL,
    consumer    text NOT NULL,
    -- Every change with xid below this is in the consumer's saved index: prunable for it.
    safe_below  xid8 NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, consumer)
);

-- The log of `source` holds every change with xid >= below; a consumer whose mark is older rebuilds.
CREATE TABLE longembed.vector_pruned (
    source      text PRIMARY KEY,
    below       xid8 NOT NULL
);
