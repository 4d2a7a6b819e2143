-- Document upsert and the trigger behind vectorize_table(): one code path for the Python API
-- (plugin/documents.py) and for rows written to a user's vectorized table.

-- Insert or update one document. Returns 'inserted', 'updated' (text changed: re-queued),
-- 'requeued' (same text, but the vectors are missing, failed or from another model revision) or
-- 'unchanged' (same text and vectors from the collection's model revision: nothing to embed; the
-- metadata is still replaced).
CREATE OR REPLACE FUNCTION longembed.upsert_document(
    p_collection_id bigint, p_external_id text, p_text text, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_hash     bytea := sha256(convert_to(p_text, 'UTF8'));
    v_cfg      regconfig;
    v_revision text;
    v_doc      longembed.documents%ROWTYPE;
    v_tsv      tsvector;
    v_result   text;
BEGIN
    SELECT text_search_config, model_revision INTO v_cfg, v_revision
    FROM longembed.collections WHERE id = p_collection_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection with id %', p_collection_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;

    SELECT * INTO v_doc FROM longembed.documents
    WHERE collection_id = p_collection_id AND external_id = p_external_id
    FOR UPDATE;

    IF FOUND AND v_doc.content_hash = v_hash THEN
        UPDATE longembed.documents SET metadata = coalesce(p_metadata, '{}'::jsonb),
            updated_at = CASE WHEN metadata IS DISTINCT FROM coalesce(p_metadata, '{}'::jsonb)
                              THEN now() ELSE updated_at END
        WHERE id = v_doc.id;
        IF v_doc.status = 'embedded' AND v_doc.model_revision IS NOT DISTINCT FROM v_revision THEN
            RETURN 'unchanged';
        END IF;
        IF v_doc.status = 'queued' THEN
            RETURN 'unchanged';  -- already waiting for a worker with this very text
        END IF;
        v_result := 'requeued';
    ELSE
        BEGIN
            v_tsv := to_tsvector(v_cfg, p_text);
        EXCEPTION WHEN program_limit_exceeded THEN
            -- tsvector holds at most 1 MB; very long texts are indexed lexically by their start.
            v_tsv := to_tsvector(v_cfg, left(p_text, 100000));
        END;
        IF v_doc.id IS NULL THEN
            INSERT INTO longembed.documents (collection_id, external_id, text, metadata, content_hash, tsv)
            VALUES (p_collection_id, p_external_id, p_text, coalesce(p_metadata, '{}'::jsonb), v_hash, v_tsv)
            RETURNING * INTO v_doc;
            v_result := 'inserted';
        ELSE
            UPDATE longembed.documents SET text = p_text, metadata = coalesce(p_metadata, '{}'::jsonb),
                content_hash = v_hash, tsv = v_tsv, updated_at = now()
            WHERE id = v_doc.id;
            v_result := 'updated';
        END IF;
    END IF;

    UPDATE longembed.documents SET status = 'queued', error = NULL WHERE id = v_doc.id;
    -- A new claim token (NULL) makes a worker still embedding the old text drop its result.
    INSERT INTO longembed.queue (document_id, collection_id) VALUES (v_doc.id, p_collection_id)
    ON CONFLICT (document_id) DO UPDATE SET
        enqueued_at = now(), next_attempt_at = now(), leased_until = NULL, lease_token = NULL,
        attempts = 0, last_error = NULL;
    -- Idle workers LISTEN (plugin/pipeline/queue.py Wakeup): told at commit, once per collection.
    PERFORM pg_notify('longembed_queue', p_collection_id::text);
    RETURN v_result;
END;
$$;

-- Trigger function for vectorized user tables. TG_ARGV: collection id, id column, text column.
-- Never blocks the user's write: NULL or blank text removes the document instead of failing.
CREATE OR REPLACE FUNCTION longembed.vectorize_trigger()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_collection bigint := TG_ARGV[0]::bigint;
    v_old_id     text;
    v_new_id     text;
    v_text       text;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        v_old_id := to_jsonb(OLD) ->> TG_ARGV[1];
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        v_new_id := to_jsonb(NEW) ->> TG_ARGV[1];
        v_text := to_jsonb(NEW) ->> TG_ARGV[2];
    END IF;
    IF v_old_id IS NOT NULL AND v_old_id IS DISTINCT FROM v_new_id THEN
        DELETE FROM longembed.documents WHERE collection_id = v_collection AND external_id = v_old_id;
    END IF;
    IF v_new_id IS NOT NULL THEN
        IF v_text IS NULL OR btrim(v_text) = '' THEN
            DELETE FROM longembed.documents WHERE collection_id = v_collection AND external_id = v_new_id;
        ELSE
            PERFORM longembed.upsert_document(v_collection, v_new_id, v_text, '{}'::jsonb);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- TRUNCATE of a vectorized table empties its collection. TG_ARGV: collection id.
CREATE OR REPLACE FUNCTION longembed.vectorize_truncate()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM longembed.documents WHERE collection_id = TG_ARGV[0]::bigint;
    RETURN NULL;
END;
$$;

-- Keep a collection in sync with a column of the user's table: one document per row (external id = the
-- row's id column as text), row triggers for INSERT/UPDATE/DELETE and a TRUNCATE trigger. Existing rows
-- are queued when p_backfill. Returns how many rows were queued. Identifiers go through regclass and
-- format(%I/%L), never through string concatenation.
CREATE OR REPLACE FUNCTION longembed.vectorize_table(
    p_table regclass, p_id_column name, p_text_column name, p_collection text,
    p_backfill boolean DEFAULT true)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_collection bigint;
    v_kind       "char";
    v_schema     name;
    v_column     name;
    v_queued     integer := 0;
BEGIN
    SELECT id INTO v_collection FROM longembed.collections WHERE name = p_collection;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection named %', quote_literal(p_collection)
            USING ERRCODE = 'undefined_object';
    END IF;
    SELECT c.relkind, n.nspname INTO v_kind, v_schema
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;
    IF v_kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'longembed: % is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;
    IF v_schema = 'longembed' THEN
        RAISE EXCEPTION 'longembed: tables of schema longembed cannot be vectorized'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_column IN ARRAY ARRAY[p_id_column, p_text_column] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = v_column
                       AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'longembed: table % has no column %', p_table, quote_ident(v_column)
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;

    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'longembed_vectorize_' || v_collection, p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'longembed_vectorize_' || v_collection || '_truncate',
                   p_table);
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW '
                   'EXECUTE FUNCTION longembed.vectorize_trigger(%L, %L, %L)',
                   'longembed_vectorize_' || v_collection, p_table, v_collection, p_id_column, p_text_column);
    EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT '
                   'EXECUTE FUNCTION longembed.vectorize_truncate(%L)',
                   'longembed_vectorize_' || v_collection || '_truncate', p_table, v_collection);
    INSERT INTO longembed.vectorized_tables (table_oid, id_column, text_column, collection_id)
    VALUES (p_table, p_id_column, p_text_column, v_collection)
    ON CONFLICT (table_oid) DO UPDATE SET id_column = excluded.id_column,
        text_column = excluded.text_column, collection_id = excluded.collection_id;

    IF p_backfill THEN
        -- The same text conversion as the trigger (to_jsonb ->>), so both give identical ids.
        EXECUTE format(
            $q$SELECT count(*) FILTER (WHERE outcome <> 'unchanged')::integer
               FROM (SELECT longembed.upsert_document($1, r.id, r.body, '{}'::jsonb) AS outcome
                     FROM (SELECT to_jsonb(t) ->> $2 AS id, to_jsonb(t) ->> $3 AS body FROM %s t) r
                     WHERE r.id IS NOT NULL AND btrim(coalesce(r.body, '')) <> '') x$q$, p_table)
        INTO v_queued USING v_collection, p_id_column::text, p_text_column::text;
    END IF;
    RETURN v_queued;
END;
$$;

-- Stop following a table; the documents already in the collection stay.
CREATE OR REPLACE FUNCTION longembed.unvectorize_table(p_table regclass, p_collection text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_collection bigint;
BEGIN
    SELECT id INTO v_collection FROM longembed.collections WHERE name = p_collection;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection named %', quote_literal(p_collection)
            USING ERRCODE = 'undefined_object';
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'longembed_vectorize_' || v_collection, p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'longembed_vectorize_' || v_collection || '_truncate',
                   p_table);
    DELETE FROM longembed.vectorized_tables WHERE table_oid = p_table AND collection_id = v_collection;
END;
$$;
