-- Search in SQL: one implementation for every caller. longembed.plugin.store.search (Python), `longembed search` (CLI)
-- and the SQL function longembed.search (text query, migrations/functions/020_embed.sql) all end here,
-- so they return the same documents with the same scores.
--
-- The statement is dynamic (the chunk table and the distance operator depend on the collection), so
-- EXECUTE plans it afresh with the real vector and LIMIT each time, and plan_cache_mode is pinned to
-- custom plans: no generic plan can replace the HNSW index scan with a sort of the whole table.
-- 090_privileges.sql pins their search_path to pg_catalog and pgvector's schema, so pgvector's operators
-- resolve for every caller; our own objects are schema-qualified.

-- Schema version 2 added `truncated` to the results. CREATE OR REPLACE cannot change a function's result
-- columns, so older definitions are dropped first (once: afterwards they have the column).
DO $do$
DECLARE
    v_signature text;
BEGIN
    FOREACH v_signature IN ARRAY ARRAY['longembed.search_vector(text,vector,integer,jsonb,integer)',
                                       'longembed.search_hybrid(text,text,vector,integer,jsonb,integer)'] LOOP
        IF to_regprocedure(v_signature) IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM pg_proc WHERE oid = to_regprocedure(v_signature)
                  AND 'truncated' = ANY(proargnames)) THEN
            EXECUTE 'DROP FUNCTION ' || v_signature;
        END IF;
    END LOOP;
END;
$do$;

-- Top-k documents by their best chunk. score: cosine similarity, inner product, or -L2 distance.
-- truncated: that chunk's text was cut at the model's window (full mode).
CREATE OR REPLACE FUNCTION longembed.search_vector(
    p_collection text, p_query vector, p_k integer DEFAULT 10, p_filter jsonb DEFAULT NULL,
    p_ef_search integer DEFAULT NULL)
RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer, char_start integer,
               char_end integer, snippet text, metadata jsonb, truncated boolean)
LANGUAGE plpgsql
-- FOR ... IN EXECUTE opens a cursor, whose plan follows plan_cache_mode: a session set to
-- force_generic_plan would get a plan blind to the vector and LIMIT (a sort of the whole table).
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    c           longembed.collections%ROWTYPE;
    v_op        text;
    v_sql       text;
    v_n         integer;  -- candidate chunks: set after k is checked (4 * k overflows for huge k)
    v_old_ef    text;
    v_old_iter  text;
    v_iterative boolean;
    v_count     integer;
    r           record;
    a_ext text[]; a_score float8[]; a_ord int[]; a_start int[]; a_end int[]; a_snip text[]; a_meta jsonb[];
    a_trunc boolean[];
BEGIN
    IF p_k IS NULL OR p_k < 1 OR p_k > 1000 THEN
        RAISE EXCEPTION 'longembed: k must be in 1..1000, got %', p_k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_n := greatest(4 * p_k, 40);
    IF p_ef_search IS NOT NULL AND (p_ef_search < 1 OR p_ef_search > 1000) THEN
        RAISE EXCEPTION 'longembed: ef_search must be in 1..1000, got %', p_ef_search
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_filter IS NOT NULL AND jsonb_typeof(p_filter) <> 'object' THEN
        RAISE EXCEPTION 'longembed: filter must be a JSON object, got %', jsonb_typeof(p_filter)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO c FROM longembed.collections WHERE name = p_collection;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection named %', quote_literal(p_collection)
            USING ERRCODE = 'undefined_object';
    END IF;
    IF p_query IS NULL OR vector_dims(p_query) <> c.dim THEN
        RAISE EXCEPTION 'longembed: the query vector has % dimensions, collection % needs %',
            vector_dims(p_query), quote_literal(p_collection), c.dim USING ERRCODE = 'data_exception';
    END IF;

    -- Transaction-local settings, put back before returning (a caller's own values survive).
    v_old_ef := current_setting('hnsw.ef_search', true);
    v_old_iter := current_setting('hnsw.iterative_scan', true);
    -- pgvector >= 0.8: keep walking the index while a filter or repeated documents drop candidates.
    v_iterative := v_old_iter IS NOT NULL;
    IF p_ef_search IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', p_ef_search::text, true);
    END IF;
    IF v_iterative THEN
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
    END IF;

    v_op := CASE c.distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' ELSE '<#>' END;
    v_sql := format(
        $q$WITH cand AS MATERIALIZED (
               SELECT c.document_id, c.ordinal, c.char_start, c.char_end, c.truncated,
                      c.embedding %1$s $1 AS distance
               FROM longembed.%2$I c %3$s
               ORDER BY c.embedding %1$s $1
               LIMIT $2),
           best AS (SELECT DISTINCT ON (document_id) * FROM cand ORDER BY document_id, distance)
           SELECT d.external_id, b.distance, b.ordinal, b.char_start, b.char_end,
                  substr(d.text, b.char_start + 1, least(b.char_end - b.char_start, 300)) AS snippet,
                  d.metadata, b.truncated, (SELECT count(*) FROM cand)::integer AS n_candidates
           FROM best b JOIN longembed.documents d ON d.id = b.document_id
           ORDER BY b.distance, d.external_id
           LIMIT $3$q$,
        v_op, 'chunks_' || c.id,
        CASE WHEN p_filter IS NULL THEN ''
             ELSE 'JOIN longembed.documents fd ON fd.id = c.document_id AND fd.metadata @> $4' END);

    -- Several chunks of one document can fill the candidate list: widen it until k documents come
    -- back or the index has nothing more (20000 = pgvector's default hnsw.max_scan_tuples).
    LOOP
        a_ext := '{}'; a_score := '{}'; a_ord := '{}'; a_start := '{}'; a_end := '{}'; a_snip := '{}';
        a_meta := '{}'; a_trunc := '{}';
        v_count := 0;
        FOR r IN EXECUTE v_sql USING p_query, v_n, p_k, p_filter LOOP
            a_ext := a_ext || r.external_id;
            a_score := a_score || CASE c.distance WHEN 'cosine' THEN 1 - r.distance ELSE -r.distance END;
            a_ord := a_ord || r.ordinal;
            a_start := a_start || r.char_start;
            a_end := a_end || r.char_end;
            a_snip := a_snip || r.snippet;
            a_meta := a_meta || r.metadata;
            a_trunc := a_trunc || r.truncated;
            v_count := r.n_candidates;
        END LOOP;
        EXIT WHEN cardinality(a_ext) >= p_k OR v_count < v_n OR v_n >= 20000;
        v_n := least(4 * v_n, 20000);
    END LOOP;

    IF p_ef_search IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', v_old_ef, true);
    END IF;
    IF v_iterative THEN
        PERFORM set_config('hnsw.iterative_scan', v_old_iter, true);
    END IF;
    RETURN QUERY SELECT * FROM unnest(a_ext, a_score, a_ord, a_start, a_end, a_snip, a_meta, a_trunc);
END;
$$;

-- Hybrid: the vector ranking and PostgreSQL full-text ranking (websearch syntax, the collection's text
-- search configuration) fused by reciprocal rank fusion, score = sum of 1 / (60 + rank). Documents found
-- only by the text side still report their best chunk by vector distance.
CREATE OR REPLACE FUNCTION longembed.search_hybrid(
    p_collection text, p_query_text text, p_query vector, p_k integer DEFAULT 10,
    p_filter jsonb DEFAULT NULL, p_ef_search integer DEFAULT NULL)
RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer, char_start integer,
               char_end integer, snippet text, metadata jsonb, truncated boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    c      longembed.collections%ROWTYPE;
    v_pool integer := greatest(p_k, 50);
BEGIN
    IF p_k IS NULL OR p_k < 1 OR p_k > 1000 THEN
        RAISE EXCEPTION 'longembed: k must be in 1..1000, got %', p_k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO c FROM longembed.collections WHERE name = p_collection;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection named %', quote_literal(p_collection)
            USING ERRCODE = 'undefined_object';
    END IF;
    RETURN QUERY EXECUTE format(
        $q$WITH v AS (
               SELECT * FROM longembed.search_vector($1, $3, $4, $5, $6)
                   WITH ORDINALITY AS v(external_id, score, chunk_ordinal, char_start, char_end, snippet,
                                        metadata, truncated, rnk)),
           l AS (
               SELECT d.external_id, row_number() OVER (ORDER BY ts_rank_cd(d.tsv, q) DESC, d.id) AS rnk
               FROM longembed.documents d, websearch_to_tsquery($7, $2) AS q
               WHERE d.collection_id = $8 AND d.tsv @@ q AND ($5 IS NULL OR d.metadata @> $5)
                 AND EXISTS (SELECT 1 FROM longembed.%1$I c WHERE c.document_id = d.id)
               ORDER BY ts_rank_cd(d.tsv, q) DESC, d.id
               LIMIT $4),
           f AS (
               SELECT u.external_id, sum(1.0 / (60 + u.rnk))::float8 AS rrf
               FROM (SELECT v.external_id, v.rnk FROM v UNION ALL SELECT l.external_id, l.rnk FROM l) u
               GROUP BY u.external_id)
           SELECT f.external_id, f.rrf, coalesce(v.chunk_ordinal, b.ordinal),
                  coalesce(v.char_start, b.char_start), coalesce(v.char_end, b.char_end),
                  coalesce(v.snippet, b.snippet), coalesce(v.metadata, b.metadata),
                  coalesce(v.truncated, b.truncated)
           FROM f LEFT JOIN v ON v.external_id = f.external_id
           LEFT JOIN LATERAL (
               SELECT ch.ordinal, ch.char_start, ch.char_end, d.metadata, ch.truncated,
                      substr(d.text, ch.char_start + 1, least(ch.char_end - ch.char_start, 300)) AS snippet
               FROM longembed.documents d JOIN longembed.%1$I ch ON ch.document_id = d.id
               WHERE v.external_id IS NULL AND d.collection_id = $8 AND d.external_id = f.external_id
               ORDER BY ch.embedding %2$s $3
               LIMIT 1) b ON true
           ORDER BY f.rrf DESC, v.score DESC NULLS LAST, f.external_id
           LIMIT $9$q$,
        'chunks_' || c.id, CASE c.distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' ELSE '<#>' END)
    USING p_collection, p_query_text, p_query, v_pool, p_filter, p_ef_search, c.text_search_config, c.id, p_k;
END;
$$;
