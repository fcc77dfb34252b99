#!/usr/bin/env bash
# make test: every tier. Style (fmt, clippy), pure-core unit tests, in-database #[pg_test]s (cargo pgrx test),
# then end-to-end tests against a live cluster (library preloaded) and a live LocalStack, started here on free
# ports and always torn down, also on failure.
source "$(dirname "$0")/lib.sh"
STARTED=$SECONDS
declare -a SUMMARY=()
step() { SUMMARY+=("$(printf '%-34s %s (%ss)' "$1" "$2" "$3")"); }
finish() {
    local rc=$?
    [[ -n "${E2E:-}" ]] && { pg_stop "$E2E/pg"; localstack_stop "$E2E/localstack"; }
    echo
    echo "==================== sqs_ingest test summary ===================="
    printf '%s\n' "${SUMMARY[@]}"
    if (( rc == 0 )); then echo "RESULT: PASS in $((SECONDS - STARTED)) s"; else echo "RESULT: FAIL (exit $rc) after $((SECONDS - STARTED)) s"; fi
    exit $rc
}
trap finish EXIT

run_step() {
    local name="$1"; shift
    local t=$SECONDS
    say "$name"
    if "$@"; then step "$name" ok $((SECONDS - t)); else step "$name" FAILED $((SECONDS - t)); return 1; fi
}

bash "$REPO_ROOT/scripts/setup.sh"
cd "$REPO_ROOT"

run_step "cargo fmt --check" cargo fmt --all -- --check
run_step "cargo clippy -D warnings" cargo clippy --workspace --all-targets --quiet -- -D warnings
run_step "core unit tests" cargo test -p sqs_ingest_core --quiet
run_step "packaging checks" bash "$REPO_ROOT/scripts/check_packaging.sh"

# In-database tests. Clusters of ours must be down: pgrx test replaces the installed library.
pg_stop_all
PGRX_DIR="$(run_root)/pgrx-test"
mkdir -p "$PGRX_DIR"; chown postgres:postgres "$PGRX_DIR"; chmod 755 "$PGRX_DIR"
run_step "cargo pgrx test pg15" cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_DIR/data"

# End-to-end: install the release build (pgrx test left its test build installed), start the services.
run_step "install release build" bash "$REPO_ROOT/scripts/install.sh"
E2E="$(run_root)/e2e"
rm -rf "$E2E"; mkdir -p "$E2E"; chmod 755 "$E2E"
LS_PORT="$(free_port 14566)"
PG_PORT="$(free_port 25432)"
say "starting LocalStack on $LS_PORT and Postgres on $PG_PORT for the end-to-end tests"
localstack_start "$E2E/localstack" "$LS_PORT"
pg_start "$E2E/pg" "$PG_PORT" "sqs_ingest,pg_cron" "sqs_ingest.worker_database = 'e2e_worker'
sqs_ingest.worker_role = 'e2e_worker_role'
sqs_ingest.worker_count = 2
sqs_ingest.worker_restart_delay = 1
max_prepared_transactions = 4"
# The static workers connect as a non-superuser role (they wait, restarting, until it exists).
psql -X -q -h "$E2E/pg" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE e2e_worker_role LOGIN" -c "CREATE DATABASE e2e_worker" -c "\\c e2e_worker" \
    -c "CREATE EXTENSION sqs_ingest" -c "GRANT sqs_ingest_operator TO e2e_worker_role" \
    -c "GRANT CREATE ON SCHEMA public TO e2e_worker_role" >/dev/null
export SQS_INGEST_PGHOST="$E2E/pg" SQS_INGEST_PGPORT="$PG_PORT" SQS_INGEST_SQS_ENDPOINT="http://localhost:$LS_PORT"
export SQS_INGEST_PGDATA="$E2E/pg/data" SQS_INGEST_PG_BIN="$PG_BIN" SQS_INGEST_REPO="$REPO_ROOT"
export SQS_INGEST_SAMPLE_DATA="${SQS_INGEST_SAMPLE_DATA:-$REPO_ROOT/../shared/data/fetch_login_queue.jsonl}"
[[ -f "$SQS_INGEST_SAMPLE_DATA" ]] || warn "$SQS_INGEST_SAMPLE_DATA is absent: the real-data test will say SKIPPED"
run_step "end-to-end tests (live PG + SQS)" cargo test -p sqs_ingest_e2e --quiet --no-fail-fast -- --test-threads="${E2E_THREADS:-4}"
