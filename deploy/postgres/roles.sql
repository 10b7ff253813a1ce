-- The least-privilege roles shoal connects as (docs/security.md). Run by the database's owner (a
-- superuser) after the schema: docker compose runs it from docker-entrypoint-initdb.d after
-- demo.sql, the test kit and `shoal-cluster --postgres` right after starting PostgreSQL.
--
--   shoal_reader  reads (pg_query, pg_list_tables, pg_describe_table, resources, change poller):
--                 SELECT on the tables of schema public, nothing else.
--   shoal_writer  pg_execute: SELECT, INSERT, UPDATE, DELETE on those tables and their sequences.
--
-- Neither is a superuser, may create roles or databases, or is a member of
-- pg_execute_server_program, pg_read_server_files or pg_write_server_files; a replica refuses a
-- role that is. Passwords are set apart (role-passwords.sql in compose); with trust
-- authentication (the test kit) none is needed. To expose another schema, grant USAGE on it and
-- SELECT on its tables to shoal_reader (and what pg_execute may change to shoal_writer).
-- Idempotent: safe to run again.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'shoal_reader') THEN
        CREATE ROLE shoal_reader LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'shoal_writer') THEN
        CREATE ROLE shoal_writer LOGIN;
    END IF;
END
$$;

ALTER ROLE shoal_reader NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 200;
ALTER ROLE shoal_writer NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 200;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO shoal_reader, shoal_writer', current_database());
END
$$;

-- Schema public: use it, never create in it (PUBLIC's CREATE is already gone since PostgreSQL 15).
REVOKE CREATE ON SCHEMA public FROM shoal_reader, shoal_writer;
GRANT USAGE ON SCHEMA public TO shoal_reader, shoal_writer;

GRANT SELECT ON ALL TABLES IN SCHEMA public TO shoal_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO shoal_writer;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO shoal_writer;

-- Tables the owner creates later get the same grants.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO shoal_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO shoal_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO shoal_writer;

-- Tenant isolation (docs/security.md, "The database"): every principal's calls run as these two
-- roles, and PostgreSQL lets a role read the statement text of every other session of the same
-- role (pg_stat_activity, with its literals) and cancel or terminate it (pg_cancel_backend,
-- pg_terminate_backend): one principal could watch another's SQL or kill every replica's pooled
-- connections. Those functions are taken from PUBLIC in this database and given back to the
-- roles made for them (pg_read_all_stats, part of pg_monitor; pg_signal_backend), so monitoring
-- keeps working. Superusers are not affected. By name, so it holds whatever the signatures of
-- this PostgreSQL version are.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS signature,
                    CASE WHEN p.proname LIKE 'pg_stat%' THEN 'pg_read_all_stats' ELSE 'pg_signal_backend' END AS role
             FROM pg_proc p
             WHERE p.pronamespace = 'pg_catalog'::regnamespace
               AND p.proname IN ('pg_stat_get_activity', 'pg_stat_get_backend_activity',
                                 'pg_cancel_backend', 'pg_terminate_backend')
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.signature);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f.signature, f.role);
    END LOOP;
END
$$;

-- What one statement may make the server spill: sorts and hashes use at most work_mem each
-- before they go to temporary files, and temporary files are capped per session (temp_file_limit
-- can only be set by a superuser, so a tool's SQL cannot lift it; work_mem is reset with every
-- pooled connection's reset between calls). The statement timeout is set per transaction by the
-- replica (SHOAL_POSTGRES_STATEMENT_TIMEOUT_MS).
ALTER ROLE shoal_reader SET work_mem = '16MB';
ALTER ROLE shoal_reader SET temp_file_limit = '256MB';
ALTER ROLE shoal_writer SET work_mem = '16MB';
ALTER ROLE shoal_writer SET temp_file_limit = '256MB';
