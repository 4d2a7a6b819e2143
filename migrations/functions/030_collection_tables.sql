-- The vector tables of a collection, created and dropped by the owner of schema longembed on behalf of
-- longembed_writer (plugin/store/collections.py calls these): the chunk table longembed."chunks_<id>"
-- (see 0001_init.sql) and the document vector table longembed."docvecs_<id>" (see 0005_*.sql).
--
-- SECURITY DEFINER, so that writers need no CREATE on schema longembed (which would let them put
-- functions and tables of their own there) and every chunk table has the same owner. The bodies take a
-- collection id and nothing else: the table's name is built from the id, the dimension, distance and
-- HNSW settings come from the collection's row, whose CHECK constraints bound them. search_path is
-- pinned; pgvector's type and operator classes are named with the schema pgvector is installed in.

CREATE OR REPLACE FUNCTION longembed.create_chunk_table(p_collection_id bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c        longembed.collections%ROWTYPE;
    v_vector name;
    v_table  text := 'chunks_' || p_collection_id;
    v_docs   text := 'docvecs_' || p_collection_id;
    v_role   text;
BEGIN
    SELECT * INTO c FROM longembed.collections WHERE id = p_collection_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection with id %', p_collection_id USING ERRCODE = 'undefined_object';
    END IF;
    SELECT n.nspname INTO v_vector
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector';
    EXECUTE format(
        'CREATE TABLE longembed.%I (
             document_id bigint NOT NULL REFERENCES longembed.documents (id) ON DELETE CASCADE,
             ordinal     integer NOT NULL,
             char_start  integer NOT NULL,
             char_end    integer NOT NULL,
             n_tokens    integer NOT NULL,
             truncated   boolean NOT NULL DEFAULT false,
             embedding   %I.vector(%s) NOT NULL,
             PRIMARY KEY (document_id, ordinal))',
        v_table, v_vector, c.dim);
    EXECUTE format(
        'CREATE INDEX %I ON longembed.%I USING hnsw (embedding %I.%I) WITH (m = %s, ef_construction = %s)',
        v_table || '_embedding_idx', v_table, v_vector,
        CASE c.distance WHEN 'cosine' THEN 'vector_cosine_ops' WHEN 'l2' THEN 'vector_l2_ops'
                        ELSE 'vector_ip_ops' END,
        c.hnsw_m, c.hnsw_ef_construction);
    PERFORM longembed.track_vector_changes(v_table);  -- 040_vector_changes.sql
    -- One document vector per document (as 0005_document_vectors_and_search_modes.sql).
    EXECUTE format(
        'CREATE TABLE longembed.%I (
             document_id bigint PRIMARY KEY REFERENCES longembed.documents (id) ON DELETE CASCADE,
             n_tokens    integer NOT NULL,
             truncated   boolean NOT NULL DEFAULT false,
             embedding   %I.vector(%s) NOT NULL)',
        v_docs, v_vector, c.dim);
    EXECUTE format(
        'CREATE INDEX %I ON longembed.%I USING hnsw (embedding %I.%I) WITH (m = %s, ef_construction = %s)',
        v_docs || '_embedding_idx', v_docs, v_vector,
        CASE c.distance WHEN 'cosine' THEN 'vector_cosine_ops' WHEN 'l2' THEN 'vector_l2_ops'
                        ELSE 'vector_ip_ops' END,
        c.hnsw_m, c.hnsw_ef_construction);
    -- As 090_privileges.sql grants on the tables that exist when it runs.
    FOREACH v_role IN ARRAY ARRAY['longembed_reader', 'longembed_writer'] LOOP
        IF to_regrole(v_role) IS NOT NULL THEN
            EXECUTE format('GRANT %s ON longembed.%I, longembed.%I TO %I',
                           CASE v_role WHEN 'longembed_reader' THEN 'SELECT'
                                       ELSE 'SELECT, INSERT, UPDATE, DELETE' END,
                           v_table, v_docs, v_role);
        END IF;
    END LOOP;
END;
$$;

-- Drop a collection: its vector tables, then its row (documents and queue items go by ON DELETE CASCADE).
-- The caller drops the triggers on its own vectorized tables first, with its own rights. Returns false
-- when there is no such collection.
CREATE OR REPLACE FUNCTION longembed.delete_collection(p_collection_id bigint)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Lock first so a concurrent upsert cannot add a document between the drop and the delete.
    PERFORM 1 FROM longembed.collections WHERE id = p_collection_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TABLE IF EXISTS longembed.%I, longembed.%I',
                   'chunks_' || p_collection_id, 'docvecs_' || p_collection_id);
    -- The hnswlib change log of the dropped chunk table (040_vector_changes.sql): nobody can follow it now.
    DELETE FROM longembed.vector_consumers WHERE source = 'chunks_' || p_collection_id;
    DELETE FROM longembed.vector_changes WHERE source = 'chunks_' || p_collection_id;
    DELETE FROM longembed.vector_pruned WHERE source = 'chunks_' || p_collection_id;
    DELETE FROM longembed.collections WHERE id = p_collection_id;
    RETURN true;
END;
$$;
