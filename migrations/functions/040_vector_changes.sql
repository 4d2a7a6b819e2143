-- The change log of vector tables (versions/0006_vector_changes.sql): the triggers that fill it, a
-- consumer's registration, and pruning. Everything takes the table's name (in schema longembed), so any
-- table with document_id and ordinal columns can be mirrored: today the chunk tables (`chunks_<id>`,
-- 030_collection_tables.sql calls track_vector_changes when it creates one).
--
-- SECURITY DEFINER: writers' inserts must log (the trigger runs as the log's owner), and a consumer's
-- registration locks the vector table in SHARE mode, which needs more than a writer's rights. search_path
-- is pinned; every object is schema-qualified.

-- One statement-level trigger per event with transition tables: a COPY of 10,000 chunks logs with one
-- INSERT ... SELECT, not 10,000 trigger calls. Nothing is logged while the table has no consumer.
CREATE OR REPLACE FUNCTION longembed.log_vector_changes()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM longembed.vector_consumers WHERE source = TG_TABLE_NAME) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO longembed.vector_changes (source, document_id, ordinal)
        SELECT TG_TABLE_NAME, n.document_id, n.ordinal FROM new_rows n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO longembed.vector_changes (source, document_id, ordinal)
        SELECT TG_TABLE_NAME, o.document_id, o.ordinal FROM old_rows o;
    ELSE  -- an UPDATE may change the key: log the old and the new one
        INSERT INTO longembed.vector_changes (source, document_id, ordinal)
        SELECT TG_TABLE_NAME, o.document_id, o.ordinal FROM old_rows o
        UNION
        SELECT TG_TABLE_NAME, n.document_id, n.ordinal FROM new_rows n;
    END IF;
    -- Only a wake-up for listening consumers: delivered at commit, lost when nobody listens (the log is
    -- what counts). One per statement, and PostgreSQL folds equal ones within a transaction.
    PERFORM pg_notify('longembed_vector_changes', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

-- Document-row changes that leave the chunks alone (metadata replaced, external id changed, a new text
-- waiting for the worker, which search_vector already shows through the old chunks' spans): the fast
-- path holds those rows too (plugin/service/ann.py). Logged as (chunks_<collection id>, document id,
-- ordinal -1) for the collection's table, old and new when a document moves, only while it has a
-- consumer. A row trigger whose column list and WHEN skip the updates that touch none of these (the
-- worker's status updates) without a call; inserts need nothing (a document without chunks is in no
-- result), deletes cascade to the chunks, whose own triggers log them.
CREATE OR REPLACE FUNCTION longembed.log_document_changes()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_source text;
BEGIN
    FOR v_source IN SELECT DISTINCT s FROM unnest(ARRAY['chunks_' || OLD.collection_id,
                                                        'chunks_' || NEW.collection_id]) AS s LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM longembed.vector_consumers WHERE source = v_source);
        INSERT INTO longembed.vector_changes (source, document_id, ordinal) VALUES (v_source, NEW.id, -1);
        PERFORM pg_notify('longembed_vector_changes', v_source);
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER vector_changes_documents
    AFTER UPDATE OF external_id, text, metadata, collection_id ON longembed.documents
    FOR EACH ROW
    WHEN (OLD.external_id IS DISTINCT FROM NEW.external_id OR OLD.text IS DISTINCT FROM NEW.text
          OR OLD.metadata IS DISTINCT FROM NEW.metadata OR OLD.collection_id IS DISTINCT FROM NEW.collection_id)
    EXECUTE FUNCTION longembed.log_document_changes();

-- Install the three triggers on longembed.<p_table>; idempotent (a rerun touches no table).
CREATE OR REPLACE FUNCTION longembed.track_vector_changes(p_table text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_op text;
BEGIN
    IF to_regclass(format('longembed.%I', p_table)) IS NULL THEN
        RAISE EXCEPTION 'longembed: no table longembed.% to track', quote_ident(p_table)
            USING ERRCODE = 'undefined_table';
    END IF;
    FOREACH v_op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_trigger
                              WHERE tgrelid = format('longembed.%I', p_table)::regclass
                                AND tgname = 'vector_changes_' || v_op);
        EXECUTE format(
            'CREATE TRIGGER %I AFTER %s ON longembed.%I REFERENCING %s FOR EACH STATEMENT '
            'EXECUTE FUNCTION longembed.log_vector_changes()',
            'vector_changes_' || v_op, upper(v_op), p_table,
            CASE v_op WHEN 'insert' THEN 'NEW TABLE AS new_rows'
                      WHEN 'delete' THEN 'OLD TABLE AS old_rows'
                      ELSE 'OLD TABLE AS old_rows NEW TABLE AS new_rows' END);
    END LOOP;
END;
$$;

-- Register (or renew) a consumer of p_table's log. The SHARE lock waits for every transaction that is
-- writing the table now and holds new writers until this transaction commits: a writer that logged
-- nothing because it ran before the registration is committed before the consumer's build snapshot,
-- so the build sees its rows. Commit, then take the build snapshot.
CREATE OR REPLACE FUNCTION longembed.register_vector_consumer(p_table text, p_consumer text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF to_regclass(format('longembed.%I', p_table)) IS NULL THEN
        RAISE EXCEPTION 'longembed: no table longembed.%', quote_ident(p_table) USING ERRCODE = 'undefined_table';
    END IF;
    EXECUTE format('LOCK TABLE longembed.%I IN SHARE MODE', p_table);
    INSERT INTO longembed.vector_consumers (source, consumer, safe_below)
    VALUES (p_table, p_consumer, pg_snapshot_xmin(pg_current_snapshot()))
    ON CONFLICT (source, consumer) DO UPDATE SET safe_below = excluded.safe_below, updated_at = now();
END;
$$;

-- A consumer saved its index with every change below p_xmin in it: record that, drop consumers silent
-- for 7 days, and delete the changes of p_table that every remaining consumer has. Returns false when
-- the consumer is not registered (dropped as silent): it must register and rebuild.
CREATE OR REPLACE FUNCTION longembed.advance_vector_consumer(p_table text, p_consumer text, p_xmin xid8)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_below xid8;
BEGIN
    UPDATE longembed.vector_consumers SET safe_below = greatest(safe_below, p_xmin), updated_at = now()
    WHERE source = p_table AND consumer = p_consumer;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM longembed.vector_consumers WHERE updated_at < now() - interval '7 days';
    SELECT min(safe_below) INTO v_below FROM longembed.vector_consumers WHERE source = p_table;
    DELETE FROM longembed.vector_changes WHERE source = p_table AND xid < v_below;
    INSERT INTO longembed.vector_pruned (source, below) VALUES (p_table, v_below)
    ON CONFLICT (source) DO UPDATE SET below = greatest(longembed.vector_pruned.below, excluded.below);
    RETURN true;
END;
$$;

-- A consumer's index is gone for good (or its collection): forget it, and the log it alone needed.
CREATE OR REPLACE FUNCTION longembed.drop_vector_consumer(p_table text, p_consumer text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM longembed.vector_consumers WHERE source = p_table AND consumer = p_consumer;
    IF NOT EXISTS (SELECT 1 FROM longembed.vector_consumers WHERE source = p_table) THEN
        DELETE FROM longembed.vector_changes WHERE source = p_table;
        DELETE FROM longembed.vector_pruned WHERE source = p_table;
    END IF;
END;
$$;

-- Chunk tables made before schema version 6 get their triggers here (reruns are harmless).
DO $do$
DECLARE
    v_id bigint;
BEGIN
    FOR v_id IN SELECT id FROM longembed.collections LOOP
        IF to_regclass(format('longembed.%I', 'chunks_' || v_id)) IS NOT NULL THEN
            PERFORM longembed.track_vector_changes('chunks_' || v_id);
        END IF;
    END LOOP;
END;
$do$;
