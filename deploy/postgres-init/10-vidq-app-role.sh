#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
#
# Two roles: POSTGRES_USER (vidq) owns the database and the schema, and is used only
# by the one-shot `migrate` service; vidq_app, what workers, producers and Flower log
# in as, may read and write rows and nothing else: no DDL, no superuser, no new roles.
# Tables are created later by `vidq db upgrade` (as vidq): default privileges give
# vidq_app its rights on them as they appear.
set -eu
: "${APP_DB_PASSWORD:?set VIDQ_POSTGRES_APP_PASSWORD}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v app_password="$APP_DB_PASSWORD" -v owner="$POSTGRES_USER" -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE vidq_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT
    PASSWORD :'app_password';
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
-- TEMPORARY: `vidq submit` copies new jobs into a temporary table first.
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO vidq_app;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO vidq_app;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO vidq_app;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO vidq_app;
-- Tables that already exist (a volume initialised before this script was added).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO vidq_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO vidq_app;
SQL
