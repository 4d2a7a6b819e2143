-- Okapi BM25 per collection: the term statistics (tables of migrations/versions/0004_bm25.sql), the
-- trigger on longembed.documents that keeps them current, and longembed.search_bm25.
--
-- Terms are the lexemes PostgreSQL's parser and dictionaries make of the text in the collection's
-- text_search_config; a document's length is its number of lexeme occurrences (stop words do not count).

-- The lexemes of p_text with their number of occurrences. to_tsvector is fast but a tsvector keeps at
-- most 255 positions per lexeme and clamps positions at 16383 (and holds at most 1 MB), so its counts
-- are only read where none of those limits can have been reached; otherwise every token goes through
-- ts_debug, which applies the same parser and dictionaries without positions (about 10x slower: long
-- documents only). ts_debug does not apply phrase dictionaries (thesaurus) as to_tsvector does: with
-- such a configuration the counts of long documents follow the word-by-word dictionaries.
CREATE OR REPLACE FUNCTION longembed.bm25_terms(p_config regconfig, p_text text)
RETURNS TABLE (term text, tf integer)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tsv tsvector;
BEGIN
    -- Below 100 kB of text the tsvector stays under its 1 MB limit: no subtransaction needed to catch it.
    IF octet_length(p_text) < 100000 THEN
        v_tsv := to_tsvector(p_config, p_text);
        IF NOT EXISTS (SELECT 1 FROM unnest(v_tsv) u
                       WHERE cardinality(u.positions) >= 255 OR u.positions[cardinality(u.positions)] >= 16383)
        THEN
            RETURN QUERY SELECT u.lexeme, cardinality(u.positions) FROM unnest(v_tsv) u;
            RETURN;
        END IF;
    END IF;
    -- to_tsvector skips tokens of 2048 bytes or more (with a notice); so does this.
    RETURN QUERY
        SELECT l.lexeme, count(*)::integer
        FROM ts_debug(p_config, p_text) t, unnest(t.lexemes) AS l(lexeme)
        WHERE octet_length(t.token) < 2048 AND l.lexeme <> ''
        GROUP BY l.lexeme;
END;
$$;

-- Add a document (+1, +length) or remove one (-1, -length) to a collection's N and total length: one new
-- row, so concurrent writers never wait for each other here. Now and then (p_fold: the trigger asks for
-- it once in 64 documents, by id) a writer folds the collection's rows into one, so that reading them
-- stays cheap: one folder at a time per collection (a try-lock: nobody waits), and only under READ
-- COMMITTED, where the DELETE sees rows another folder replaced as gone instead of failing with a
-- serialization error. Rows of transactions still running are invisible to the DELETE and stay.
-- A collection being dropped (its row already gone: documents are deleted by its ON DELETE CASCADE) takes
-- no rows.
CREATE OR REPLACE FUNCTION longembed.bm25_add_delta(
    p_collection_id bigint, p_documents bigint, p_length bigint, p_fold boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO longembed.bm25_collection_deltas (collection_id, n_documents, total_length)
    SELECT p_collection_id, p_documents, p_length
    WHERE EXISTS (SELECT 1 FROM longembed.collections WHERE id = p_collection_id);
    IF p_fold AND current_setting('transaction_isolation') = 'read committed'
       AND pg_try_advisory_xact_lock(hashtextextended('longembed.bm25_deltas.' || p_collection_id, 0)) THEN
        WITH gone AS (
            DELETE FROM longembed.bm25_collection_deltas WHERE collection_id = p_collection_id
            RETURNING n_documents, total_length)
        INSERT INTO longembed.bm25_collection_deltas (collection_id, n_documents, total_length)
        SELECT p_collection_id, sum(n_documents), sum(total_length) FROM gone HAVING count(*) > 0;
    END IF;
END;
$$;

-- Row trigger on longembed.documents: INSERT adds the document's postings, DELETE removes them, an UPDATE
-- of the text (or of the collection) does both. Each document owns its postings' keys (collection, term,
-- document), so writers of different documents never wait for each other; writers of one document are
-- already serialised by its row lock (upsert_document's SELECT ... FOR UPDATE).
CREATE OR REPLACE FUNCTION longembed.bm25_documents_trigger()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_length bigint;
    v_config regconfig;
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.text = NEW.text AND OLD.collection_id = NEW.collection_id THEN
        RETURN NULL;  -- SET text = text: the same postings
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        WITH gone AS (DELETE FROM longembed.bm25_postings WHERE document_id = OLD.id RETURNING tf)
        SELECT coalesce(sum(tf), 0) INTO v_length FROM gone;
        PERFORM longembed.bm25_add_delta(OLD.collection_id, -1, -v_length, OLD.id % 64 = 0);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT text_search_config INTO v_config FROM longembed.collections WHERE id = NEW.collection_id;
        WITH terms AS MATERIALIZED (SELECT t.term, t.tf FROM longembed.bm25_terms(v_config, NEW.text) t),
             added AS (
                 INSERT INTO longembed.bm25_postings (collection_id, term, document_id, tf, doc_length)
                 SELECT NEW.collection_id, terms.term, NEW.id, terms.tf, (SELECT sum(tf) FROM terms)
                 FROM terms
                 RETURNING tf)
        SELECT coalesce(sum(tf), 0) INTO v_length FROM added;
        PERFORM longembed.bm25_add_delta(NEW.collection_id, 1, v_length, NEW.id % 64 = 0);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER bm25_statistics
    AFTER INSERT OR DELETE OR UPDATE OF text, collection_id ON longembed.documents
    FOR EACH ROW EXECUTE FUNCTION longembed.bm25_documents_trigger();

-- Recompute a collection's statistics from its documents (after 0004_bm25.sql; or to repair them, should
-- something have written documents with triggers disabled, or a collection's text_search_config have
-- been changed by hand). Blocks writers of all collections meanwhile.
CREATE OR REPLACE FUNCTION longembed.bm25_rebuild(p_collection_id bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_config regconfig;
BEGIN
    LOCK TABLE longembed.documents IN SHARE MODE;
    SELECT text_search_config INTO v_config FROM longembed.collections WHERE id = p_collection_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection with id %', p_collection_id USING ERRCODE = 'undefined_object';
    END IF;
    DELETE FROM longembed.bm25_postings WHERE collection_id = p_collection_id;
    DELETE FROM longembed.bm25_collection_deltas WHERE collection_id = p_collection_id;
    INSERT INTO longembed.bm25_postings (collection_id, term, document_id, tf, doc_length)
    SELECT p_collection_id, t.term, d.id, t.tf, sum(t.tf) OVER (PARTITION BY d.id)
    FROM longembed.documents d, longembed.bm25_terms(v_config, d.text) t
    WHERE d.collection_id = p_collection_id;
    INSERT INTO longembed.bm25_collection_deltas (collection_id, n_documents, total_length)
    SELECT p_collection_id,
           (SELECT count(*) FROM longembed.documents WHERE collection_id = p_collection_id),
           (SELECT coalesce(sum(tf), 0) FROM longembed.bm25_postings WHERE collection_id = p_collection_id);
END;
$$;

DO $do$
DECLARE
    v_id bigint;
BEGIN
    FOR v_id IN SELECT collection_id FROM longembed.bm25_rebuild_pending ORDER BY collection_id LOOP
        PERFORM longembed.bm25_rebuild(v_id);
        DELETE FROM longembed.bm25_rebuild_pending WHERE collection_id = v_id;
    END LOOP;
END;
$do$;

-- Top-k documents by Okapi BM25:
--   score(D, Q) = sum over distinct terms t of Q present in D of
--                 idf(t) * tf(t, D) * (k1 + 1) / (tf(t, D) + k1 * (1 - b + b * |D| / avgdl))
--   idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))   (Lucene's form: never negative)
-- N = documents in the collection, df(t) = those containing t, |D| = lexeme occurrences of D, avgdl =
-- the collection's mean |D|. Query terms are the distinct lexemes of p_query in the collection's
-- configuration: a term repeated in the query counts once. A query without any lexeme (empty, only stop
-- words or punctuation) returns no rows. Query text is never parsed as tsquery syntax, so operators and
-- quotes in it are plain characters. N, df and avgdl cover the whole collection, p_filter (jsonb @> on
-- metadata) only selects among the scored documents. p_k1 / p_b override the collection's bm25_k1 / bm25_b.
CREATE OR REPLACE FUNCTION longembed.search_bm25(
    p_collection text, p_query text, p_k integer DEFAULT 10, p_filter jsonb DEFAULT NULL,
    p_k1 double precision DEFAULT NULL, p_b double precision DEFAULT NULL)
RETURNS TABLE (document_id bigint, external_id text, score double precision)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    c       longembed.collections%ROWTYPE;
    v_k1    double precision;
    v_b     double precision;
    v_terms text[];
    v_n     double precision;  -- N, and the total length (avgdl = v_total / v_n)
    v_total double precision;
    v_scores text;
BEGIN
    IF p_k IS NULL OR p_k < 1 OR p_k > 1000 THEN
        RAISE EXCEPTION 'longembed: k must be in 1..1000, got %', p_k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_k1 IS NOT NULL AND NOT (p_k1 BETWEEN 0 AND 10) THEN
        RAISE EXCEPTION 'longembed: k1 must be in 0..10, got %', p_k1 USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_b IS NOT NULL AND NOT (p_b BETWEEN 0 AND 1) THEN
        RAISE EXCEPTION 'longembed: b must be in 0..1, got %', p_b USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_filter IS NOT NULL AND jsonb_typeof(p_filter) <> 'object' THEN
        RAISE EXCEPTION 'longembed: filter must be a JSON object, got %', jsonb_typeof(p_filter)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_query IS NULL THEN
        RAISE EXCEPTION 'longembed: the query text is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO c FROM longembed.collections WHERE name = p_collection;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection named %', quote_literal(p_collection)
            USING ERRCODE = 'undefined_object';
    END IF;
    v_k1 := coalesce(p_k1, c.bm25_k1);
    v_b := coalesce(p_b, c.bm25_b);

    -- Distinct lexemes only, so to_tsvector's position limits do not matter; its 1 MB limit does, and
    -- a long query goes through ts_debug (as bm25_terms does; readers may not call that function).
    IF octet_length(p_query) < 100000 THEN
        v_terms := tsvector_to_array(to_tsvector(c.text_search_config, p_query));
    ELSE
        SELECT array_agg(DISTINCT l.lexeme) INTO v_terms
        FROM ts_debug(c.text_search_config, p_query) t, unnest(t.lexemes) AS l(lexeme)
        WHERE octet_length(t.token) < 2048 AND l.lexeme <> '';
    END IF;
    IF cardinality(v_terms) = 0 THEN
        v_terms := NULL;
    END IF;
    IF v_terms IS NULL THEN
        RETURN;
    END IF;
    SELECT coalesce(sum(s.n_documents), 0), coalesce(sum(s.total_length), 0) INTO v_n, v_total
    FROM longembed.bm25_collection_deltas s WHERE s.collection_id = c.id;
    IF v_total = 0 THEN
        RETURN;  -- no document has a lexeme: nothing can match
    END IF;

    -- Every posting of the query terms is scored (no early termination: exact, and fast enough for
    -- short queries on 100k documents, bench/bench_bm25.py); df is counted from those same postings,
    -- which the primary key's index returns in term order with tf and the length (an index-only scan).
    v_scores := $q$
        SELECT p.document_id,
               sum(ln(1 + ($3 - p.df + 0.5) / (p.df + 0.5))
                   * p.tf * ($5 + 1) / (p.tf + $5 * (1 - $6 + $6 * p.doc_length * $3 / $4))) AS score
        FROM (SELECT p.document_id, p.tf, p.doc_length,
                     count(*) OVER (PARTITION BY p.term)::double precision AS df
              FROM longembed.bm25_postings p
              WHERE p.collection_id = $1 AND p.term = ANY ($2)) p
        GROUP BY p.document_id$q$;
    -- EXECUTE plans with the real values; without a filter only the best k (and those tied with the
    -- k-th) meet the documents table, one index probe each.
    RETURN QUERY EXECUTE CASE WHEN p_filter IS NULL THEN
        format($q$WITH s AS (%s ORDER BY score DESC FETCH FIRST ($7) ROWS WITH TIES)
                  SELECT d.id, d.external_id, s.score
                  FROM s JOIN longembed.documents d ON d.id = s.document_id
                  ORDER BY s.score DESC, d.external_id LIMIT $7$q$, v_scores)
    ELSE
        format($q$SELECT d.id, d.external_id, s.score
                  FROM (%s) s JOIN longembed.documents d ON d.id = s.document_id
                  WHERE d.metadata @> $8
                  ORDER BY s.score DESC, d.external_id LIMIT $7$q$, v_scores)
    END
    USING c.id, v_terms, v_n, v_total, v_k1, v_b, p_k, p_filter;
END;
$$;
