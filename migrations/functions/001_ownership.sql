-- Which functions in schema public are ours (025_public_wrappers.sql creates them, 090_privileges.sql
-- grants them): owned by the migrating role AND calling into schema longembed. The owner alone is not
-- enough on a server where one role (the embedded server's superuser) both migrates and writes its own
-- functions; the body's dependencies (recorded for SQL-standard bodies) tell a wrapper from those.
CREATE OR REPLACE FUNCTION longembed.is_our_wrapper(p_function oid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN EXISTS (
    SELECT 1 FROM pg_proc p
    WHERE p.oid = p_function
      AND p.proowner = (SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user)
      AND EXISTS (SELECT 1 FROM pg_depend d JOIN pg_proc callee ON callee.oid = d.refobjid
                  WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                    AND d.refclassid = 'pg_proc'::regclass
                    AND callee.pronamespace = 'longembed'::regnamespace));
