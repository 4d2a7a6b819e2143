-- longembed schema, version 2.
--
-- model_source: what loads a collection's model again from any working directory and any process (the
-- worker, search, the SQL functions): the hub id, or the absolute path of a local model folder.
-- model_name stays the display name (for a folder, its basename). Collections made before this
-- version recorded only the name; it is their best source (hub ids and the bundled default resolve).
ALTER TABLE longembed.collections ADD COLUMN model_source text;
UPDATE longembed.collections SET model_source = model_name;
ALTER TABLE longembed.collections ALTER COLUMN model_source SET NOT NULL;
ALTER TABLE longembed.collections ADD CONSTRAINT collections_model_source_check CHECK (model_source <> '');

-- chunk_tokens: one default, in code (encoder.chunking.default_chunk_tokens: what fits the model's window
-- next to its document prefix); the schema's own 256 disagreed with it and is dropped.
ALTER TABLE longembed.collections ALTER COLUMN chunk_tokens DROP DEFAULT;

-- truncated: the chunk's text did not fit the model's window and was cut (full mode), so its vector
-- stands for the start of the document only. Search results and `ingest` report it.
DO $$
DECLARE
    v_id bigint;
BEGIN
    FOR v_id IN SELECT id FROM longembed.collections LOOP
        EXECUTE format('ALTER TABLE longembed.%I ADD COLUMN truncated boolean NOT NULL DEFAULT false',
                       'chunks_' || v_id);
    END LOOP;
END;
$$;
