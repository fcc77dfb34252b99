#!/usr/bin/env bash
# First start only (docker-entrypoint-initdb.d): preload the libraries, restart, create the extensions.
set -euo pipefail
cat /usr/share/postgresql/sqs_ingest.conf >> "$PGDATA/postgresql.conf"
pg_ctl -D "$PGDATA" -m fast -w restart
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE EXTENSION IF NOT EXISTS sqs_ingest;
CREATE EXTENSION IF NOT EXISTS pg_cron;
SQL
