-- longembed schema, version 4: Okapi BM25 over each collection's documents (longembed.search_bm25,
-- migrations/functions/012_bm25.sql, which also keeps these tables current by a trigger on documents).
--
-- What the score needs, and where it lives:
-- - tf(term, document) and the document's length (lexeme occurrences): bm25_postings, one row per
--   (collection, term, document), written and deleted with the document's text. The length is repeated
--   on every posting of the document so that scoring reads the postings of the query terms and nothing
--   else (no join per matching document).
-- - df(term): counted at query time from those same postings, which scoring reads anyway. There is no
--   per-term counter row, so concurrent writers never wait on each other for a common term and cannot
--   deadlock over terms: each document owns its postings' keys.
-- - N and the total length of a collection: bm25_collection_deltas, insert-only rows (+1/-1 document,
--   +/- its length) summed at query time; a per-collection counter updated in place would serialise every
--   writer of the collection on one row. Writers fold the rows into one now and then (012_bm25.sql).

ALTER TABLE longembed.collections
    ADD COLUMN bm25_k1 double precision NOT NULL DEFAULT 1.2 CHECK (bm25_k1 BETWEEN 0 AND 10),
    ADD COLUMN bm25_b double precision NOT NULL DEFAULT 0.75 CHECK (bm25_b BETWEEN 0 AND 1);

CREATE TABLE longembed.bm25_postings (
    collection_id   bigint NOT NULL,
    term            text NOT NULL,
    document_id     bigint NOT NULL,
    tf              integer NOT NULL CHECK (tf > 0),
    doc_length      integer NOT NULL CHECK (doc_length >= tf),
    -- INCLUDE: scoring reads the postings of a term from the index alone, in index order.
    PRIMARY KEY (collection_id, term, document_id) INCLUDE (tf, doc_length)
);
-- Deleting a document's postings (text change, delete) finds them by document.
CREATE INDEX bm25_postings_document_idx ON longembed.bm25_postings (document_id);

CREATE TABLE longembed.bm25_collection_deltas (
    collection_id   bigint NOT NULL REFERENCES longembed.collections (id) ON DELETE CASCADE,
    n_documents     bigint NOT NULL,
    total_length    bigint NOT NULL
);
CREATE INDEX bm25_collection_deltas_collection_idx ON longembed.bm25_collection_deltas (collection_id);

-- Collections whose documents predate the statistics. The term extraction lives in 012_bm25.sql (function
-- files run after the version files), which rebuilds these and empties the table on the same migrate.
CREATE TABLE longembed.bm25_rebuild_pending (
    collection_id   bigint PRIMARY KEY REFERENCES longembed.collections (id) ON DELETE CASCADE
);
INSERT INTO longembed.bm25_rebuild_pending (collection_id) SELECT id FROM longembed.collections;
