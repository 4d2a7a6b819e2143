-- requires: plpython3u
-- SQL embed() and search() (PL/Python). Rerun on every migrate (CREATE OR REPLACE); skipped with a notice
-- by the runner where the server has no plpython3u (`longembed setup-plpython` builds it for the embedded
-- server). The bodies only import longembed.plugin.sql_functions and pass `plpy` on; the backend finds the module
-- through PYTHONPATH, which `longembed up` sets from the interpreter that runs it.
--
-- STABLE: `ORDER BY embedding <=> embed('...') LIMIT k` then evaluates embed() once and walks the HNSW
-- index; a VOLATILE function would be called per row with a sequential scan (tests/test_sql_functions.py checks the plan).
-- PARALLEL RESTRICTED, not SAFE: each parallel worker is a fresh process that would load the model (about
-- 2 s) for a value the leader computes once.
-- search_path is pinned; the bodies name every object with its schema. NULL in, NULL out (STRICT).

CREATE EXTENSION IF NOT EXISTS plpython3u;

CREATE OR REPLACE FUNCTION longembed.embed(input text, kind text DEFAULT 'query')
RETURNS vector
LANGUAGE plpython3u STRICT STABLE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $body$
try:
    import site, sys
    for entry in [p for p in sys.path if p.endswith("-packages")]:
        site.addsitedir(entry)  # runs the editable install's .pth hook, which maps longembed.*
    from longembed.plugin import sql_functions
except ImportError as exc:
    plpy.error("longembed: the server's Python cannot import longembed (%s)" % exc,
               hint="start the server with `longembed up` from longembed's environment, or put its "
                    "site-packages on the server's PYTHONPATH")
return sql_functions.embed_text(plpy, input, kind)
$body$;

CREATE OR REPLACE FUNCTION longembed.embed(inputs text[], kind text DEFAULT 'query')
RETURNS vector[]
LANGUAGE plpython3u STRICT STABLE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $body$
try:
    import site, sys
    for entry in [p for p in sys.path if p.endswith("-packages")]:
        site.addsitedir(entry)  # runs the editable install's .pth hook, which maps longembed.*
    from longembed.plugin import sql_functions
except ImportError as exc:
    plpy.error("longembed: the server's Python cannot import longembed (%s)" % exc,
               hint="start the server with `longembed up` from longembed's environment, or put its "
                    "site-packages on the server's PYTHONPATH")
return sql_functions.embed_texts(plpy, inputs, kind)
$body$;

-- The query vector for a collection: its model, its query prefix, its dimension.
CREATE OR REPLACE FUNCTION longembed.embed_query(collection text, query text)
RETURNS vector
LANGUAGE plpython3u STRICT STABLE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $body$
try:
    import site, sys
    for entry in [p for p in sys.path if p.endswith("-packages")]:
        site.addsitedir(entry)  # runs the editable install's .pth hook, which maps longembed.*
    from longembed.plugin import sql_functions
except ImportError as exc:
    plpy.error("longembed: the server's Python cannot import longembed (%s)" % exc,
               hint="start the server with `longembed up` from longembed's environment, or put its "
                    "site-packages on the server's PYTHONPATH")
return sql_functions.embed_query(plpy, collection, query)
$body$;

-- Top-k documents of a collection for a text query: the same rows as longembed.plugin.store.search.search() and
-- `longembed search` (all three end in longembed.search_vector / search_hybrid, 015_search.sql).
CREATE OR REPLACE FUNCTION longembed.search(
    collection text, query text, k integer DEFAULT 10, filter jsonb DEFAULT NULL,
    hybrid boolean DEFAULT false, ef_search integer DEFAULT NULL)
RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer, char_start integer,
               char_end integer, snippet text, metadata jsonb)
LANGUAGE plpgsql
AS $body$
BEGIN
    IF collection IS NULL OR query IS NULL THEN
        RAISE EXCEPTION 'longembed: search needs a collection and a query, got NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF hybrid THEN
        RETURN QUERY SELECT * FROM longembed.search_hybrid(
            collection, query, longembed.embed_query(collection, query), k, filter, ef_search);
    ELSE
        RETURN QUERY SELECT * FROM longembed.search_vector(
            collection, longembed.embed_query(collection, query), k, filter, ef_search);
    END IF;
END;
$body$;

-- Unqualified names: wrappers in schema public, unless the user already has a function of that name and
-- signature there (ours carry a comment starting with 'longembed:'), which is then left alone.
DO $do$
DECLARE
    wrapper record;
BEGIN
    IF to_regnamespace('public') IS NULL THEN
        RAISE NOTICE 'longembed: schema public is missing; call longembed.embed() and longembed.search()';
        RETURN;
    END IF;
    FOR wrapper IN
        SELECT * FROM (VALUES
            ('public.embed(text,text)', $f$
                CREATE OR REPLACE FUNCTION public.embed(input text, kind text DEFAULT 'query')
                RETURNS vector LANGUAGE sql STRICT STABLE PARALLEL RESTRICTED
                RETURN longembed.embed(input, kind)$f$),
            ('public.embed(text[],text)', $f$
                CREATE OR REPLACE FUNCTION public.embed(inputs text[], kind text DEFAULT 'query')
                RETURNS vector[] LANGUAGE sql STRICT STABLE PARALLEL RESTRICTED
                RETURN longembed.embed(inputs, kind)$f$),
            ('public.search(text,text,integer,jsonb,boolean,integer)', $f$
                CREATE OR REPLACE FUNCTION public.search(
                    collection text, query text, k integer DEFAULT 10, filter jsonb DEFAULT NULL,
                    hybrid boolean DEFAULT false, ef_search integer DEFAULT NULL)
                RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer,
                               char_start integer, char_end integer, snippet text, metadata jsonb)
                LANGUAGE sql
                BEGIN ATOMIC
                    SELECT * FROM longembed.search(collection, query, k, filter, hybrid, ef_search);
                END$f$)
        ) AS w(signature, ddl)
    LOOP
        IF to_regprocedure(wrapper.signature) IS NOT NULL
           AND coalesce(obj_description(to_regprocedure(wrapper.signature), 'pg_proc'), '')
               NOT LIKE 'longembed:%' THEN
            RAISE NOTICE 'longembed: % exists and is not ours; left alone (use the longembed. names)',
                wrapper.signature;
            CONTINUE;
        END IF;
        EXECUTE wrapper.ddl;
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', wrapper.signature,
                       'longembed: unqualified wrapper of longembed.' || split_part(
                           split_part(wrapper.signature, '(', 1), '.', 2) || '()');
    END LOOP;
END;
$do$;
