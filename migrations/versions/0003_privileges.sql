-- longembed schema, version 3: PUBLIC gets nothing in schema longembed.
--
-- PostgreSQL makes every new function EXECUTE-able by PUBLIC unless the creating role's default
-- privileges say otherwise. Version files run before the function files, so from this version on a
-- fresh database never has one of our functions callable by PUBLIC, not even between two files of
-- the first migrate. A per-schema default privilege cannot revoke what the global default grants,
-- hence the global form: it applies to functions the migrating role creates anywhere in this
-- database (use a dedicated owner role for longembed on a shared database).
-- migrations/functions/090_privileges.sql repeats these statements on every migrate (another role
-- may migrate later) and grants what the roles longembed_reader and longembed_writer need.

ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
REVOKE ALL ON SCHEMA longembed FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA longembed FROM PUBLIC;
