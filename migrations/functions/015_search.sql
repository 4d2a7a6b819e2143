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
           best AS (SELECT DISTINCT ON (document_id) * FROM cand ORDER BY document_id, distance),
           -- the k best first, then their snippets: each cut reads the whole (maybe long) text
           top AS (SELECT d.external_id, d.text, d.metadata, b.*
                   FROM best b JOIN longembed.documents d ON d.id = b.document_id
                   ORDER BY b.distance, d.external_id
                   LIMIT $3)
           SELECT t.external_id, t.distance, t.ordinal, t.char_start, t.char_end,
                  substr(t.text, t.char_start + 1, least(t.char_end - t.char_start, 300)) AS snippet,
                  t.metadata, t.truncated, (SELECT count(*) FROM cand)::integer AS n_candidates
           FROM top t
           ORDER BY t.distance, t.external_id$q$,
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

-- Search modes (a collection's search_mode is the default, a call may name another):
--   dense    documents by their document vector (docvecs_<id>: the head, or all of a long-context
--            model's window, or the mean of the chunks)
--   chunks   documents by their best chunk: longembed.search_vector, unchanged
--   lexical  documents by Okapi BM25 over their text (longembed.search_lexical_pool: search_bm25)
--   hybrid   any weighted combination of the three signals: reciprocal rank fusion,
--            score = sum_s w_s / (rrf_k + rank_s) (rrf_k 60 by default), or weighted fusion of normalised
--            scores, score = sum_s w_s * norm_s, each signal normalised over its own candidate pool by
--            min-max ('minmax': (x - min) / (max - min), 1 where all are equal) or z-score ('zscore':
--            (x - mean) / stddev, 0 where all are equal); a document absent from a signal's pool gets that
--            signal's lowest normalised value in the pool (0 for min-max). Defaults: the collection's
--            `fusion` column, else all three signals with weight 1 and rrf with rrf_k 60.
--   auto     hybrid with the options chosen for this collection (collections.auto_fusion, written by
--            plugin/store/calibrate.py from the collection's own documents); dense until then.
-- Each signal contributes its top max(k, 100) documents (after the filter). Ties: external_id.
-- Every row reports the document's best chunk for the query vector (its span and snippet); with no
-- query vector (lexical), its first chunk.

-- The documents nearest to p_query by their document vector: (document_id, score), best first.
CREATE OR REPLACE FUNCTION longembed.search_dense_pool(
    p_collection_id bigint, p_query vector, p_n integer, p_filter jsonb DEFAULT NULL,
    p_ef_search integer DEFAULT NULL)
RETURNS TABLE (document_id bigint, score double precision)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    c          longembed.collections%ROWTYPE;
    v_old_ef   text := current_setting('hnsw.ef_search', true);
    v_old_iter text := current_setting('hnsw.iterative_scan', true);
BEGIN
    SELECT * INTO c FROM longembed.collections WHERE id = p_collection_id;
    -- One row per document: an ef_search of at least n gives n rows without a filter; the iterative
    -- scan (pgvector >= 0.8) keeps walking while the filter drops rows. relaxed_order: sorted below.
    PERFORM set_config('hnsw.ef_search', greatest(coalesce(p_ef_search, v_old_ef::integer, 40),
                                                  least(p_n, 1000))::text, true);
    IF v_old_iter IS NOT NULL THEN
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
    END IF;
    RETURN QUERY EXECUTE format(
        $q$SELECT x.document_id, CASE $3 WHEN 'cosine' THEN 1 - x.distance ELSE -x.distance END
           FROM (SELECT v.document_id, v.embedding %1$s $1 AS distance
                 FROM longembed.%2$I v %3$s
                 ORDER BY v.embedding %1$s $1 LIMIT $2) x
           ORDER BY x.distance, x.document_id$q$,
        CASE c.distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' ELSE '<#>' END, 'docvecs_' || c.id,
        CASE WHEN p_filter IS NULL THEN ''
             ELSE 'JOIN longembed.documents fd ON fd.id = v.document_id AND fd.metadata @> $4' END)
    USING p_query, p_n, c.distance, p_filter;
    IF v_old_ef IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', v_old_ef, true);
    END IF;
    IF v_old_iter IS NOT NULL THEN
        PERFORM set_config('hnsw.iterative_scan', v_old_iter, true);
    END IF;
END;
$$;

-- The chunk signal: (document_id, score) of the p_n documents with the best chunks, best first: the
-- documents, scores and order of longembed.search_vector(name, p_query, p_n, ...) (the same candidate
-- list, widened the same way), without what only a result row needs. search_vector reads each document's
-- text for its snippet: for a pool of 100 long documents that is most of a fused search's time.
CREATE OR REPLACE FUNCTION longembed.search_chunks_pool(
    p_collection_id bigint, p_query vector, p_n integer, p_filter jsonb DEFAULT NULL,
    p_ef_search integer DEFAULT NULL)
RETURNS TABLE (document_id bigint, score double precision)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    c          longembed.collections%ROWTYPE;
    v_n        integer := greatest(4 * p_n, 40);
    v_old_ef   text := current_setting('hnsw.ef_search', true);
    v_old_iter text := current_setting('hnsw.iterative_scan', true);
    v_sql      text;
    v_ids      bigint[];
    v_scores   float8[];
    v_count    integer;
BEGIN
    SELECT * INTO c FROM longembed.collections WHERE id = p_collection_id;
    IF p_ef_search IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', p_ef_search::text, true);
    END IF;
    IF v_old_iter IS NOT NULL THEN
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
    END IF;
    v_sql := format(
        $q$WITH cand AS MATERIALIZED (
               SELECT c.document_id, c.embedding %1$s $1 AS distance
               FROM longembed.%2$I c %3$s
               ORDER BY c.embedding %1$s $1
               LIMIT $2),
           best AS (SELECT cand.document_id, min(cand.distance) AS distance FROM cand GROUP BY 1),
           top AS (SELECT b.document_id, b.distance, d.external_id
                   FROM best b JOIN longembed.documents d ON d.id = b.document_id
                   ORDER BY b.distance, d.external_id
                   LIMIT $3)
           SELECT array_agg(t.document_id ORDER BY t.distance, t.external_id),
                  array_agg(CASE $5 WHEN 'cosine' THEN 1 - t.distance ELSE -t.distance END
                            ORDER BY t.distance, t.external_id),
                  (SELECT count(*) FROM cand)::integer
           FROM top t$q$,
        CASE c.distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' ELSE '<#>' END, 'chunks_' || c.id,
        CASE WHEN p_filter IS NULL THEN ''
             ELSE 'JOIN longembed.documents fd ON fd.id = c.document_id AND fd.metadata @> $4' END);
    LOOP  -- widen as search_vector does
        EXECUTE v_sql INTO v_ids, v_scores, v_count USING p_query, v_n, p_n, p_filter, c.distance;
        EXIT WHEN coalesce(cardinality(v_ids), 0) >= p_n OR v_count < v_n OR v_n >= 20000;
        v_n := least(4 * v_n, 20000);
    END LOOP;
    IF p_ef_search IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', v_old_ef, true);
    END IF;
    IF v_old_iter IS NOT NULL THEN
        PERFORM set_config('hnsw.iterative_scan', v_old_iter, true);
    END IF;
    RETURN QUERY SELECT u.id, u.score FROM unnest(v_ids, v_scores) WITH ORDINALITY AS u(id, score, nr)
                 ORDER BY u.nr;
END;
$$;

-- The lexical signal: (document_id, score), best first: Okapi BM25 (longembed.search_bm25,
-- 012_bm25.sql), over embedded documents only (a queued one has no chunk to show yet).
CREATE OR REPLACE FUNCTION longembed.search_lexical_pool(
    p_collection_id bigint, p_query text, p_n integer, p_filter jsonb DEFAULT NULL)
RETURNS TABLE (document_id bigint, score double precision)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT b.document_id, b.score
    FROM longembed.collections c,
         longembed.search_bm25(c.name, p_query, least(p_n, 1000), p_filter) b
         JOIN longembed.documents d ON d.id = b.document_id
    WHERE c.id = p_collection_id AND d.status = 'embedded'
    ORDER BY b.score DESC, b.external_id;
END;

-- The fusion options a call gets: {"weights": {...}, "fusion": ..., "rrf_k": ...}, checked; raises a
-- clear error for an unknown mode, signal, fusion or a bad weight.
CREATE OR REPLACE FUNCTION longembed.search_options(
    p_collection text, p_mode text, p_weights jsonb, p_fusion text, p_rrf_k integer)
RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    c         longembed.collections%ROWTYPE;
    v_mode    text;
    v_options jsonb;
    v_signal  record;
    v_any     boolean := false;
BEGIN
    SELECT * INTO c FROM longembed.collections WHERE name = p_collection;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection named %', quote_literal(p_collection)
            USING ERRCODE = 'undefined_object';
    END IF;
    v_mode := coalesce(p_mode, c.search_mode);
    IF v_mode NOT IN ('dense', 'chunks', 'lexical', 'hybrid', 'auto') THEN
        RAISE EXCEPTION 'longembed: unknown search mode %', quote_literal(v_mode)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'use dense, chunks, lexical, hybrid or auto (NULL: the collection''s default)';
    END IF;
    IF v_mode <> 'hybrid' AND (p_weights IS NOT NULL OR p_fusion IS NOT NULL OR p_rrf_k IS NOT NULL) THEN
        RAISE EXCEPTION 'longembed: weights, fusion and rrf_k apply to mode hybrid, not %', v_mode
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_options := CASE v_mode
        WHEN 'dense' THEN '{"weights": {"dense": 1}, "fusion": "raw"}'
        WHEN 'chunks' THEN '{"weights": {"chunks": 1}, "fusion": "raw"}'
        WHEN 'lexical' THEN '{"weights": {"lexical": 1}, "fusion": "raw"}'
        WHEN 'auto' THEN coalesce(c.auto_fusion, '{"weights": {"dense": 1}, "fusion": "raw"}')
        ELSE '{"weights": {"dense": 1, "chunks": 1, "lexical": 1}, "fusion": "rrf", "rrf_k": 60}'::jsonb
             || coalesce(c.fusion, '{}') END::jsonb;
    IF p_weights IS NOT NULL THEN
        v_options := v_options || jsonb_build_object('weights', p_weights);
    END IF;
    IF p_fusion IS NOT NULL THEN
        v_options := v_options || jsonb_build_object('fusion', p_fusion);
    END IF;
    IF p_rrf_k IS NOT NULL THEN
        v_options := v_options || jsonb_build_object('rrf_k', p_rrf_k);
    END IF;
    IF jsonb_typeof(v_options -> 'weights') IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'longembed: weights must be a JSON object like {"dense": 1, "lexical": 0.5}, got %',
            v_options -> 'weights' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_signal IN SELECT * FROM jsonb_each(v_options -> 'weights') LOOP
        IF v_signal.key NOT IN ('dense', 'chunks', 'lexical') THEN
            RAISE EXCEPTION 'longembed: unknown signal % in weights: use dense, chunks or lexical',
                quote_literal(v_signal.key) USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(v_signal.value) <> 'number' OR v_signal.value::float8 < 0
           OR v_signal.value::float8 > 1e6 THEN
            RAISE EXCEPTION 'longembed: weight of % must be a number in 0..1000000, got %', v_signal.key,
                v_signal.value USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_any := v_any OR v_signal.value::float8 > 0;
    END LOOP;
    IF NOT v_any THEN
        RAISE EXCEPTION 'longembed: at least one weight must be above 0' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_options ->> 'fusion' NOT IN ('rrf', 'minmax', 'zscore', 'raw') OR (
           v_options ->> 'fusion' = 'raw' AND v_mode = 'hybrid') THEN
        RAISE EXCEPTION 'longembed: unknown fusion %: use rrf, minmax or zscore', quote_literal(v_options ->> 'fusion')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_options ->> 'fusion' = 'rrf' AND (jsonb_typeof(v_options -> 'rrf_k') IS DISTINCT FROM 'number'
           OR (v_options ->> 'rrf_k')::float8 NOT BETWEEN 1 AND 100000
           OR (v_options ->> 'rrf_k')::float8 <> floor((v_options ->> 'rrf_k')::float8)) THEN
        RAISE EXCEPTION 'longembed: rrf_k must be an integer in 1..100000, got %', v_options -> 'rrf_k'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v_options || jsonb_build_object('mode', v_mode);
END;
$$;

-- Top-k documents in any search mode (see above). p_query_text feeds the lexical signal, p_query the
-- dense and chunk signals; each may be NULL where no signal needs it.
CREATE OR REPLACE FUNCTION longembed.search_modes(
    p_collection text, p_query_text text, p_query vector, p_k integer DEFAULT 10,
    p_filter jsonb DEFAULT NULL, p_ef_search integer DEFAULT NULL, p_mode text DEFAULT NULL,
    p_weights jsonb DEFAULT NULL, p_fusion text DEFAULT NULL, p_rrf_k integer DEFAULT NULL)
RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer, char_start integer,
               char_end integer, snippet text, metadata jsonb, truncated boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    c         longembed.collections%ROWTYPE;
    v_options jsonb;
    v_dense   float8;
    v_chunks  float8;
    v_lexical float8;
    v_pool    integer;
BEGIN
    IF p_k IS NULL OR p_k < 1 OR p_k > 1000 THEN
        RAISE EXCEPTION 'longembed: k must be in 1..1000, got %', p_k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_filter IS NOT NULL AND jsonb_typeof(p_filter) <> 'object' THEN
        RAISE EXCEPTION 'longembed: filter must be a JSON object, got %', jsonb_typeof(p_filter)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_options := longembed.search_options(p_collection, p_mode, p_weights, p_fusion, p_rrf_k);
    SELECT * INTO c FROM longembed.collections WHERE name = p_collection;
    IF v_options ->> 'mode' = 'chunks' THEN  -- today's search, exactly
        RETURN QUERY SELECT * FROM longembed.search_vector(p_collection, p_query, p_k, p_filter, p_ef_search);
        RETURN;
    END IF;
    v_dense := coalesce((v_options #>> '{weights,dense}')::float8, 0);
    v_chunks := coalesce((v_options #>> '{weights,chunks}')::float8, 0);
    v_lexical := coalesce((v_options #>> '{weights,lexical}')::float8, 0);
    IF (v_dense > 0 OR v_chunks > 0) AND p_query IS NULL THEN
        RAISE EXCEPTION 'longembed: search mode % needs a query vector', v_options ->> 'mode'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_query IS NOT NULL AND vector_dims(p_query) <> c.dim THEN
        RAISE EXCEPTION 'longembed: the query vector has % dimensions, collection % needs %',
            vector_dims(p_query), quote_literal(p_collection), c.dim USING ERRCODE = 'data_exception';
    END IF;
    IF v_lexical > 0 AND (p_query_text IS NULL OR btrim(p_query_text) = '') THEN
        RAISE EXCEPTION 'longembed: search mode % needs a query text', v_options ->> 'mode'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_ef_search IS NOT NULL AND (p_ef_search < 1 OR p_ef_search > 1000) THEN
        RAISE EXCEPTION 'longembed: ef_search must be in 1..1000, got %', p_ef_search
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_pool := CASE WHEN v_options ->> 'fusion' = 'raw' THEN p_k ELSE greatest(p_k, 100) END;
    RETURN QUERY EXECUTE format(
        $q$WITH pools AS (%3$s),
           ranked AS (
               SELECT p.*, d.external_id,
                      row_number() OVER (PARTITION BY p.signal ORDER BY p.score DESC, d.external_id) AS rnk,
                      min(p.score) OVER w AS lo, max(p.score) OVER w AS hi,
                      avg(p.score) OVER w AS mean, stddev_pop(p.score) OVER w AS sd
               FROM pools p JOIN longembed.documents d ON d.id = p.document_id
               WINDOW w AS (PARTITION BY p.signal)),
           normed AS (
               SELECT r.*, CASE $12
                   WHEN 'rrf' THEN 1.0 / ($13 + r.rnk)
                   WHEN 'minmax' THEN CASE WHEN r.hi > r.lo THEN (r.score - r.lo) / (r.hi - r.lo) ELSE 1 END
                   WHEN 'zscore' THEN CASE WHEN r.sd > 0 THEN (r.score - r.mean) / r.sd ELSE 0 END
                   ELSE r.score END AS value,
                   -- what a document absent from this signal's pool gets
                   CASE $12 WHEN 'zscore' THEN CASE WHEN r.sd > 0 THEN (r.lo - r.mean) / r.sd ELSE 0 END
                            ELSE 0 END AS floor
               FROM ranked r),
           floors AS (  -- the floors' weighted sum: what a document found by no signal would score
               SELECT sum(f.weighted) AS total
               FROM (SELECT DISTINCT ON (signal) weight * floor AS weighted FROM normed) f),
           fused AS (
               SELECT n.document_id, n.external_id,
                      (sum(n.weight * (n.value - n.floor)) + coalesce((SELECT total FROM floors), 0))::float8
                          AS score
               FROM normed n GROUP BY n.document_id, n.external_id
               ORDER BY 3 DESC, n.external_id
               LIMIT $4)
           -- the snippet is cut once per result, not per chunk compared (each cut reads the whole text)
           SELECT f.external_id, f.score, b.ordinal, b.char_start, b.char_end,
                  substr(d.text, b.char_start + 1, least(b.char_end - b.char_start, 300)), d.metadata,
                  b.truncated
           FROM fused f JOIN longembed.documents d ON d.id = f.document_id
           LEFT JOIN LATERAL (
               SELECT ch.ordinal, ch.char_start, ch.char_end, ch.truncated
               FROM longembed.%1$I ch WHERE ch.document_id = f.document_id
               ORDER BY CASE WHEN $3 IS NULL THEN 0 ELSE ch.embedding %2$s $3 END, ch.ordinal
               LIMIT 1) b ON true
           ORDER BY f.score DESC, f.external_id$q$,
        'chunks_' || c.id, CASE c.distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' ELSE '<#>' END,
        -- only the signals with a weight: the others' functions are not even called
        array_to_string(ARRAY[
            CASE WHEN v_dense > 0 THEN
                $p$SELECT 'dense' AS signal, p.document_id, p.score, $7::float8 AS weight
                   FROM longembed.search_dense_pool($9, $3, $10, $5, $6) p$p$ END,
            CASE WHEN v_chunks > 0 THEN
                $p$SELECT 'chunks' AS signal, p.document_id, p.score, $8::float8 AS weight
                   FROM longembed.search_chunks_pool($9, $3, $10, $5, $6) p$p$ END,
            CASE WHEN v_lexical > 0 THEN
                $p$SELECT 'lexical' AS signal, l.document_id, l.score, $11::float8 AS weight
                   FROM longembed.search_lexical_pool($9, $2, $10, $5) l$p$ END], ' UNION ALL '))
    USING p_collection, p_query_text, p_query, p_k, p_filter, p_ef_search, v_dense, v_chunks, c.id,
          v_pool, v_lexical, v_options ->> 'fusion', coalesce((v_options ->> 'rrf_k')::float8, 60);
END;
$$;

-- The BM25 score p_query would give p_text were it a document of the collection (N, df and avgdl of the
-- collection as they are; search_bm25's formula): plugin/store/calibrate.py scores a document with its
-- pseudo-query taken out of it. NULL when no query term is in the text.
CREATE OR REPLACE FUNCTION longembed.search_lexical_score(p_collection_id bigint, p_query text, p_text text)
RETURNS double precision
LANGUAGE sql STABLE
BEGIN ATOMIC
    WITH c AS (SELECT * FROM longembed.collections WHERE id = p_collection_id),
         stats AS (SELECT sum(s.n_documents)::float8 AS n, sum(s.total_length)::float8 AS total
                   FROM longembed.bm25_collection_deltas s WHERE s.collection_id = p_collection_id),
         doc AS (SELECT t.term, t.tf FROM c, longembed.bm25_terms(c.text_search_config, p_text) t),
         q AS (SELECT DISTINCT unnest(tsvector_to_array(to_tsvector(c.text_search_config, p_query))) AS term
               FROM c),
         df AS (SELECT q.term, (SELECT count(*) FROM longembed.bm25_postings p
                                WHERE p.collection_id = p_collection_id AND p.term = q.term)::float8 AS df
                FROM q)
    SELECT sum(ln(1 + (stats.n - df.df + 0.5) / (df.df + 0.5))
               * doc.tf * (c.bm25_k1 + 1)
               / (doc.tf + c.bm25_k1 * (1 - c.bm25_b + c.bm25_b * (SELECT sum(tf) FROM doc) * stats.n
                                                         / nullif(stats.total, 0))))
    FROM c, stats, df JOIN doc ON doc.term = df.term;
END;

-- Hybrid of the best chunk and the lexical ranking by reciprocal rank fusion, score = sum of
-- 1 / (60 + rank): what mode hybrid with weights {"chunks": 1, "lexical": 1} gives (longembed.search_modes
-- below), kept for callers from before search modes.
CREATE OR REPLACE FUNCTION longembed.search_hybrid(
    p_collection text, p_query_text text, p_query vector, p_k integer DEFAULT 10,
    p_filter jsonb DEFAULT NULL, p_ef_search integer DEFAULT NULL)
RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer, char_start integer,
               char_end integer, snippet text, metadata jsonb, truncated boolean)
LANGUAGE sql
BEGIN ATOMIC
    SELECT * FROM longembed.search_modes(p_collection, p_query_text, p_query, p_k, p_filter, p_ef_search,
                                         'hybrid', '{"chunks": 1, "lexical": 1}', 'rrf', 60);
END;
