-- Roles and privileges. Reruns on every migrate, after the other function files (name order), so it
-- covers the functions and chunk tables they created since.
--
-- - PUBLIC gets nothing: no USAGE on schema longembed, no EXECUTE on its functions or on our wrappers in
--   schema public (see 0003_privileges.sql for the default privileges).
-- - longembed_reader (NOLOGIN): search and embed: USAGE on the schema, SELECT on its tables, EXECUTE on
--   the search*/embed* functions, what they call (host_embed, host_setting: 020_embed.sql) and the
--   public wrappers.
-- - longembed_writer (NOLOGIN, member of longembed_reader): ingest and collections: INSERT, UPDATE,
--   DELETE on the tables (not on schema_migrations) and EXECUTE on every function of the schema
--   (collections' chunk tables are made by SECURITY DEFINER functions, 030_collection_tables.sql).
--   No CREATE on the schema: a writer cannot add or replace objects there.
-- - The owner (the role that migrates) keeps everything else: DDL, migrate, roles.
-- Grant a login role one of them: GRANT longembed_reader TO app;
-- Roles belong to the whole server; creating them needs CREATEROLE. Without it they are left out with a
-- notice (the runner reports it) and the owner stays the only role with access.
--
-- Functions without a pinned search_path (the search functions) get pg_catalog, pgvector's schema and
-- pg_temp, resolved here from pg_extension: pgvector's operators then resolve for every caller, whatever
-- the caller's own search_path holds, and a caller's temporary objects cannot stand in for them.

DO $do$
DECLARE
    v_me        oid := (SELECT oid FROM pg_roles WHERE rolname = current_user);
    v_can_roles boolean := (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user);
    v_vector    name;
    v_role      text;
    v_missing   text[] := '{}';
    f           record;
BEGIN
    ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
    REVOKE ALL ON SCHEMA longembed FROM PUBLIC;
    REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA longembed FROM PUBLIC;
    FOR f IN SELECT p.oid::regprocedure AS signature FROM pg_proc p
             WHERE p.pronamespace = 'public'::regnamespace AND longembed.is_our_wrapper(p.oid) LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.signature);
    END LOOP;

    SELECT n.nspname INTO v_vector
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector';
    FOR f IN SELECT p.oid::regprocedure AS signature FROM pg_proc p
             WHERE p.pronamespace = 'longembed'::regnamespace AND p.proowner = v_me
               AND p.prokind IN ('f', 'p')
               AND NOT EXISTS (SELECT 1 FROM pg_depend d  -- an extension's own functions are not ours
                               WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
               AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) AS setting
                               WHERE setting LIKE 'search\_path=%') LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f.signature, v_vector);
    END LOOP;

    FOREACH v_role IN ARRAY ARRAY['longembed_reader', 'longembed_writer'] LOOP
        IF to_regrole(v_role) IS NULL THEN
            IF v_can_roles THEN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            ELSE
                v_missing := v_missing || v_role;
            END IF;
        END IF;
    END LOOP;
    IF cardinality(v_missing) > 0 THEN
        RAISE NOTICE 'longembed: roles % not created: % lacks CREATEROLE; only the owner has access '
                     '(have an administrator run CREATE ROLE ... NOLOGIN, then migrate again)',
            array_to_string(v_missing, ', '), current_user;
    END IF;

    IF to_regrole('longembed_reader') IS NOT NULL THEN
        GRANT USAGE ON SCHEMA longembed TO longembed_reader;
        GRANT SELECT ON ALL TABLES IN SCHEMA longembed TO longembed_reader;
        FOR f IN SELECT p.oid::regprocedure AS signature FROM pg_proc p
                 WHERE (p.pronamespace = 'longembed'::regnamespace
                        AND (p.proname ~ '^(search|embed)' OR p.proname IN ('host_embed', 'host_setting')))
                    OR (p.pronamespace = 'public'::regnamespace AND longembed.is_our_wrapper(p.oid)) LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO longembed_reader', f.signature);
        END LOOP;
    END IF;
    IF to_regrole('longembed_writer') IS NOT NULL THEN
        IF to_regrole('longembed_reader') IS NOT NULL
           AND NOT pg_has_role('longembed_writer', 'longembed_reader', 'MEMBER') THEN
            GRANT longembed_reader TO longembed_writer;
        END IF;
        GRANT USAGE ON SCHEMA longembed TO longembed_writer;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA longembed TO longembed_writer;
        REVOKE INSERT, UPDATE, DELETE ON longembed.schema_migrations FROM longembed_writer;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA longembed TO longembed_writer;
    END IF;
END;
$do$;
