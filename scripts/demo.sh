#!/usr/bin/env bash
# make demo: from a fresh clone to ingested, masked rows. Leaves Postgres and LocalStack running.
source "$(dirname "$0")/lib.sh"

bash "$REPO_ROOT/scripts/setup.sh"
bash "$REPO_ROOT/scripts/stop.sh" >/dev/null 2>&1 || true
bash "$REPO_ROOT/scripts/install.sh"

RUN="$(run_root)/demo"
mkdir -p "$RUN"
LS_PORT=4566
port_free "$LS_PORT" || LS_PORT="$(free_port 4567)"
PG_PORT="$(free_port 55432)"

say "starting LocalStack (SQS) on 127.0.0.1:$LS_PORT"
localstack_start "$RUN/localstack" "$LS_PORT"
say "starting Postgres $PG_MAJOR on port $PG_PORT (socket in $RUN/pg)"
pg_start "$RUN/pg" "$PG_PORT" "sqs_ingest,pg_cron"
printf 'LS_PORT=%s\nPG_PORT=%s\n' "$LS_PORT" "$PG_PORT" >"$RUN/env"

say "creating login-queue and loading 100 generated login messages (one malformed)"
QUEUE_URL="$(python3 "$REPO_ROOT/scripts/gen_messages.py" 100 \
    | "$LOCALSTACK_VENV/bin/python" "$REPO_ROOT/scripts/sqs_load.py" --endpoint "http://localhost:$LS_PORT" --queue login-queue)"
QUEUE_URL="http://localhost:$LS_PORT/000000000000/login-queue"

PSQL=(psql -X -q -h "$RUN/pg" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -P pager=off)
say "CREATE EXTENSION sqs_ingest; SELECT * FROM sqs_ingest('$QUEUE_URL');"
"${PSQL[@]}" <<SQL
CREATE EXTENSION IF NOT EXISTS sqs_ingest;
\echo
\echo '-- ingest counts'
SELECT * FROM sqs_ingest('$QUEUE_URL');
\echo '-- a sample of user_logins (ip and device_id are masked; app_version is packed)'
SELECT user_id, device_type, left(masked_ip, 24) || '…' AS masked_ip, left(masked_device_id, 24) || '…' AS masked_device_id,
       locale, app_version, sqs_ingest.app_version_text(app_version) AS version, create_date
  FROM user_logins LIMIT 8;
\echo '-- equal inputs give equal tokens: devices seen more than once'
SELECT left(masked_device_id, 24) || '…' AS masked_device_id, count(*) AS logins
  FROM user_logins GROUP BY masked_device_id HAVING count(*) > 1 ORDER BY logins DESC LIMIT 5;
\echo '-- privileged roles recover the clear value (this call is audited)'
SELECT left(masked_ip, 24) || '…' AS masked_ip, sqs_ingest.unmask(masked_ip) AS ip FROM user_logins LIMIT 3;
\echo '-- dead letters (the body is stored encrypted)'
SELECT message_id, reason_code, reason, body_bytes, length(body_encrypted) AS encrypted_bytes FROM sqs_ingest.dead_letters;
\echo '-- per-queue stats'
SELECT queue_url, received, inserted, duplicates, dead_lettered, deleted, last_success_at, approximate_depth FROM sqs_ingest.stats;
\echo '-- the queue afterwards'
SELECT * FROM sqs_ingest.queue_depth('$QUEUE_URL');
SQL

cat <<EOF

Both services are still running:
  psql -h $RUN/pg -p $PG_PORT -U postgres postgres
  queue: $QUEUE_URL   (LocalStack on 127.0.0.1:$LS_PORT)
Load more:  python3 scripts/gen_messages.py 1000 | $LOCALSTACK_VENV/bin/python scripts/sqs_load.py --endpoint http://localhost:$LS_PORT --queue login-queue
Stop them:  make stop
EOF
