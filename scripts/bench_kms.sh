#!/usr/bin/env bash
# The cost of keys under AWS KMS (LocalStack's KMS): the first mask() in a new backend unwraps the active key
# (one Decrypt); later calls use the copy in the backend's memory. Prints the median first and second call in
# fresh sessions, with and without KMS. Called by scripts/bench.sh; runs alone too.
source "$(dirname "$0")/lib.sh"
ROUNDS="${BENCH_KMS_ROUNDS:-20}"
K="$(run_root)/bench-kms"
rm -rf "$K"; mkdir -p "$K"; chmod 755 "$K"
cleanup() { pg_stop "$K/pg"; localstack_stop "$K/localstack"; }
trap cleanup EXIT
LS_PORT="$(free_port 24766)"; PG_PORT="$(free_port 35632)"
localstack_start "$K/localstack" "$LS_PORT"
pg_start "$K/pg" "$PG_PORT" ""
EP="http://localhost:$LS_PORT"
PSQL=(psql -X -q -A -t -h "$K/pg" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1)
ARN="$("$LOCALSTACK_VENV/bin/python" - "$EP" <<'PY'
import sys, boto3
kms = boto3.client("kms", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
print(kms.create_key(Description="sqs_ingest bench")["KeyMetadata"]["Arn"])
PY
)"
for db in plain kms; do
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE bench_$db" >/dev/null
    [[ $db == kms ]] && "${PSQL[@]}" -d postgres -c "ALTER DATABASE bench_kms SET sqs_ingest.kms_key_id = '$ARN'" \
        -c "ALTER DATABASE bench_kms SET sqs_ingest.kms_endpoint = '$EP'" >/dev/null
    "${PSQL[@]}" -d "bench_$db" -c "CREATE EXTENSION sqs_ingest" -c "SELECT sqs_ingest.rotate_key()" >/dev/null
done
for db in plain kms; do
    : >"$K/first"; : >"$K/second"
    for _ in $(seq "$ROUNDS"); do
        mapfile -t t < <("${PSQL[@]}" -d "bench_$db" -c '\timing on' -c "SELECT sqs_ingest.mask('198.51.100.1')" \
            -c "SELECT sqs_ingest.mask('198.51.100.2')" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
        echo "${t[0]}" >>"$K/first"; echo "${t[1]}" >>"$K/second"
    done
    printf 'keys %-6s first mask() in a new backend %7.2f ms, second %6.2f ms (median of %s sessions)\n' \
        "$([[ $db == kms ]] && echo "KMS" || echo "clear")" "$(median <"$K/first")" "$(median <"$K/second")" "$ROUNDS"
done
wrapped="$("${PSQL[@]}" -d bench_kms -c "SELECT count(*) FILTER (WHERE wrapped IS NOT NULL) || '/' || count(*) FROM sqs_ingest.keys")"
echo "keys wrapped in bench_kms: $wrapped"
