#!/usr/bin/env bash
# make test: every tier. Style (fmt, clippy), pure-core unit tests, in-database #[pg_test]s (cargo pgrx test),
# then end-to-end tests against a live cluster (library preloaded) and a live LocalStack, started here on free
# ports and always torn down, also on failure. All of it on Postgres 15 (Debian's) and again on 18 (make setup's);
# release builds for 16 and 17 (built only: no server of theirs runs here).
source "$(dirname "$0")/lib.sh"
STARTED=$SECONDS
E2E="" E2E18=""
declare -a SUMMARY=()
step() { SUMMARY+=("$(printf '%-34s %s (%ss)' "$1" "$2" "$3")"); }
finish() {
    local rc=$?
    local dir
    for dir in "$E2E" "$E2E18"; do
        [[ -n "$dir" ]] && { pg_stop "$dir/pg"; localstack_stop "$dir/localstack"; }
    done
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
bash "$REPO_ROOT/scripts/setup_postgres_majors.sh"
cd "$REPO_ROOT"

run_step "cargo fmt --check" cargo fmt --all -- --check
run_step "cargo clippy -D warnings" cargo clippy --workspace --all-targets --quiet -- -D warnings
run_step "cargo clippy -D warnings (pg18)" cargo clippy -p sqs_ingest --all-targets --quiet --no-default-features \
    --features pg18 -- -D warnings
run_step "core unit tests" cargo test -p sqs_ingest_core --quiet
run_step "packaging checks" bash "$REPO_ROOT/scripts/check_packaging.sh"

# In-database tests. Clusters of ours must be down: pgrx test replaces the installed library.
pg_stop_all
PGRX_DIR="$(run_root)/pgrx-test"
mkdir -p "$PGRX_DIR"; chown postgres:postgres "$PGRX_DIR"; chmod 755 "$PGRX_DIR"
run_step "cargo pgrx test pg15" cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_DIR/data"

# End-to-end: install the release build (pgrx test left its test build installed), start the services.
run_step "install release build" bash "$REPO_ROOT/scripts/install.sh"
# e2e_tier DIR MAJOR BIN PRELOAD HAS_EXTRAS: starts LocalStack and a cluster of that major (library preloaded, two
# static workers) under DIR, then runs the end-to-end suite against them. HAS_EXTRAS (1/0): pg_cron is preloaded
# and pg_partman installed, so the tests that need them run.
e2e_tier() {
    local dir="$1" major="$2" bin="$3" preload="$4" extras="$5" ls_port pg_port
    rm -rf "$dir"; mkdir -p "$dir"; chmod 755 "$dir"
    ls_port="$(free_port 14566)"
    pg_port="$(free_port 25432)"
    say "starting LocalStack on $ls_port and Postgres $major on $pg_port for the end-to-end tests"
    localstack_start "$dir/localstack" "$ls_port"
    PG_BIN="$bin" pg_start "$dir/pg" "$pg_port" "$preload" "sqs_ingest.worker_database = 'e2e_worker'
sqs_ingest.worker_role = 'e2e_worker_role'
sqs_ingest.worker_count = 2
sqs_ingest.worker_restart_delay = 1
max_prepared_transactions = 4"
    # The static workers connect as a non-superuser role (they wait, restarting, until it exists).
    "$bin/psql" -X -q -h "$dir/pg" -p "$pg_port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE e2e_worker_role LOGIN" -c "CREATE DATABASE e2e_worker" -c "\\c e2e_worker" \
        -c "CREATE EXTENSION sqs_ingest" -c "GRANT sqs_ingest_operator TO e2e_worker_role" \
        -c "GRANT CREATE ON SCHEMA public TO e2e_worker_role" >/dev/null
    export SQS_INGEST_PGHOST="$dir/pg" SQS_INGEST_PGPORT="$pg_port" SQS_INGEST_SQS_ENDPOINT="http://localhost:$ls_port"
    export SQS_INGEST_PGDATA="$dir/pg/data" SQS_INGEST_PG_BIN="$bin" SQS_INGEST_PG_CONFIG="$bin/pg_config"
    export SQS_INGEST_REPO="$REPO_ROOT" SQS_INGEST_PG_MAJOR="$major"
    export SQS_INGEST_HAS_PG_CRON="$extras" SQS_INGEST_HAS_PG_PARTMAN="$extras"
    run_step "end-to-end tests (PG $major + SQS)" cargo test -p sqs_ingest_e2e --quiet --no-fail-fast -- --test-threads="${E2E_THREADS:-4}"
}

export SQS_INGEST_SAMPLE_DATA="${SQS_INGEST_SAMPLE_DATA:-$REPO_ROOT/../shared/data/fetch_login_queue.jsonl}"
[[ -f "$SQS_INGEST_SAMPLE_DATA" ]] || warn "$SQS_INGEST_SAMPLE_DATA is absent: the real-data test will say SKIPPED"
E2E="$(run_root)/e2e"
e2e_tier "$E2E" 15 "$PG_BIN" "sqs_ingest,pg_cron" 1
pg_stop "$E2E/pg"; localstack_stop "$E2E/localstack"

# Postgres 16 and 17: release builds (headers and pg_config only; make setup says where they come from).
run_step "release build pg16" bash "$REPO_ROOT/scripts/install.sh" --pg-config "$PG16_BIN/pg_config"
run_step "release build pg17" bash "$REPO_ROOT/scripts/install.sh" --pg-config "$PG17_BIN/pg_config"

# Postgres 18: the same tiers. pg_cron and pg_partman are Debian packages for 15 only, so the tests that need them
# ran above and skip here (the pg_cron test; the hostile-owner test runs without its pg_cron job; the pipeline
# table is partitioned by hand instead of by pg_partman).
PGRX18_DIR="$(run_root)/pgrx-test18"
mkdir -p "$PGRX18_DIR"; chown postgres:postgres "$PGRX18_DIR"; chmod 755 "$PGRX18_DIR"
run_step "cargo pgrx test pg18" cargo pgrx test pg18 --runas postgres --pgdata "$PGRX18_DIR/data"
run_step "install release build (pg18)" bash "$REPO_ROOT/scripts/install.sh" --pg-config "$PG18_BIN/pg_config"
E2E18="$(run_root)/e2e18"
e2e_tier "$E2E18" 18 "$PG18_BIN" "sqs_ingest" 0
SUMMARY+=("pg_cron, pg_partman parts: run on PG 15 only, skipped on 18 (not packaged); PG 16, 17: built, not run")
