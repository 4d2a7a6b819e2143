-- longembed schema, version 5: a document vector beside the chunk vectors, and search modes.
--
-- Each collection gets a second vector table, longembed."docvecs_<collection id>": one row per document,
-- its document vector (the model's first window of the text: the head for a 256-token model, the whole
-- text up to 8,192 tokens for an ALiBi model; or, with document_vector = 'mean', the token-weighted
-- mean of its chunk vectors), with its own HNSW index. Same reasons as the chunk tables (0001_init.sql).
-- The worker writes both tables in one transaction (plugin/pipeline/queue.py).
--
-- search_mode: what a search of the collection does when the call does not say (015_search.sql):
-- 'dense' (document vector), 'chunks' (best chunk), 'lexical' (BM25), 'hybrid' (fusion: options in
-- `fusion`), 'auto' (the fusion chosen for this collection, kept in `auto_fusion` by
-- plugin/store/calibrate.py). New collections default to 'auto'. Collections made before this version
-- keep searching as they did ('chunks'), and their documents are queued again so a worker writes their
-- document vectors; `longembed collection set NAME --search-mode auto` switches one over after that.
ALTER TABLE longembed.collections
    ADD COLUMN search_mode text NOT NULL DEFAULT 'chunks'
        CHECK (search_mode IN ('dense', 'chunks', 'lexical', 'hybrid', 'auto')),
    ADD COLUMN document_vector text NOT NULL DEFAULT 'head' CHECK (document_vector IN ('head', 'mean')),
    -- {"weights": {"dense": w, "chunks": w, "lexical": w}, "fusion": "rrf"|"minmax"|"zscore", "rrf_k": 60}
    ADD COLUMN fusion jsonb CHECK (fusion IS NULL OR jsonb_typeof(fusion) = 'object'),
    -- The same shape, with how it was chosen ("basis", "documents" it was chosen on, "scores").
    ADD COLUMN auto_fusion jsonb CHECK (auto_fusion IS NULL OR jsonb_typeof(auto_fusion) = 'object');
ALTER TABLE longembed.collections ALTER COLUMN search_mode SET DEFAULT 'auto';

DO $$
DECLARE
    c        record;
    v_vector name;
BEGIN
    SELECT n.nspname INTO v_vector
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector';
    FOR c IN SELECT id, dim, distance, hnsw_m, hnsw_ef_construction FROM longembed.collections LOOP
        -- As longembed.create_document_vector_table (030_collection_tables.sql), which does not exist yet
        -- when version files run.
        EXECUTE format(
            'CREATE TABLE longembed.%I (
                 document_id bigint PRIMARY KEY REFERENCES longembed.documents (id) ON DELETE CASCADE,
                 n_tokens    integer NOT NULL,
                 truncated   boolean NOT NULL DEFAULT false,
                 embedding   %I.vector(%s) NOT NULL)',
            'docvecs_' || c.id, v_vector, c.dim);
        EXECUTE format(
            'CREATE INDEX %I ON longembed.%I USING hnsw (embedding %I.%I) WITH (m = %s, ef_construction = %s)',
            'docvecs_' || c.id || '_embedding_idx', 'docvecs_' || c.id, v_vector,
            CASE c.distance WHEN 'cosine' THEN 'vector_cosine_ops' WHEN 'l2' THEN 'vector_l2_ops'
                            ELSE 'vector_ip_ops' END,
            c.hnsw_m, c.hnsw_ef_construction);
    END LOOP;
END;
$$;

-- Every embedded document needs its document vector: queue it again (its chunks stay searchable
-- meanwhile; the worker replaces both).
UPDATE longembed.documents SET status = 'queued', error = NULL WHERE status = 'embedded';
INSERT INTO longembed.queue (document_id, collection_id)
SELECT id, collection_id FROM longembed.documents WHERE status = 'queued'
ON CONFLICT (document_id) DO NOTHING;
