-- requires: plpython3u
-- Unqualified names: embed() and search() in schema public, calling longembed.embed() and
-- longembed.search() (020_embed.sql, hence the same requirement). Rerun on every migrate.
--
-- A function of the same name and signature already in public is ours when the migrating role owns it
-- (proowner) and its body calls into schema longembed (pg_depend: SQL-standard bodies record what they
-- call). Anything else, a user's own embed() included, is left alone with a notice; nobody but its
-- owner could have replaced it anyway, and a comment proves nothing (any owner can write one).
-- EXECUTE is not PUBLIC's: 090_privileges.sql grants it to longembed_reader. The wrappers are SQL
-- functions running with the caller's rights, so calling one also needs EXECUTE on what it calls.

DO $do$
DECLARE
    wrapper record;
    v_oid   oid;
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
            ('public.search(text,text,integer,jsonb,boolean,integer,text,jsonb,text,integer)', $f$
                CREATE OR REPLACE FUNCTION public.search(
                    collection text, query text, k integer DEFAULT 10, filter jsonb DEFAULT NULL,
                    hybrid boolean DEFAULT NULL, ef_search integer DEFAULT NULL, mode text DEFAULT NULL,
                    weights jsonb DEFAULT NULL, fusion text DEFAULT NULL, rrf_k integer DEFAULT NULL)
                RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer,
                               char_start integer, char_end integer, snippet text, metadata jsonb,
                               truncated boolean)
                LANGUAGE sql
                BEGIN ATOMIC
                    SELECT * FROM longembed.search(collection, query, k, filter, hybrid, ef_search, mode,
                                                   weights, fusion, rrf_k);
                END$f$)
        ) AS w(signature, ddl)
    LOOP
        v_oid := to_regprocedure(wrapper.signature);
        IF v_oid IS NOT NULL AND NOT longembed.is_our_wrapper(v_oid) THEN
            RAISE NOTICE 'longembed: % exists and is not ours; left alone (use the longembed. names)',
                wrapper.signature;
            CONTINUE;
        END IF;
        EXECUTE wrapper.ddl;
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', wrapper.signature);
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', wrapper.signature,
                       'longembed: unqualified wrapper of longembed.' || split_part(
                           split_part(wrapper.signature, '(', 1), '.', 2) || '()');
    END LOOP;
END;
$do$;
