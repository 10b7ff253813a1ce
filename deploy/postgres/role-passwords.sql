-- Passwords of shoal's database roles (roles.sql), from the PostgreSQL container's environment:
-- SHOAL_DB_READER_PASSWORD and SHOAL_DB_WRITER_PASSWORD (docker-compose.yml; docs/security.md).
-- psql meta-commands: run by psql (docker-entrypoint-initdb.d), not by a driver.
\getenv reader_password SHOAL_DB_READER_PASSWORD
\getenv writer_password SHOAL_DB_WRITER_PASSWORD
ALTER ROLE shoal_reader PASSWORD :'reader_password';
ALTER ROLE shoal_writer PASSWORD :'writer_password';
