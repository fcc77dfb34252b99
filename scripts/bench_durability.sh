#!/usr/bin/env bash
# What durability costs a call (make bench runs this; numbers, not pass/fail). A primary with a streaming standby
# on loopback (physical slot, asynchronous), and one session that ingests BENCH_DUR_MESSAGES (100) messages per
# call under three settings, BENCH_DUR_ROUNDS (15) rounds in alternating order, each call timed by psql around the
# autocommit statement (so COMMIT, the flush, the standby wait and the deletes are in it; no confirming long poll):
#   on/local     synchronous_commit = on,  sqs_ingest.delete_after = local: the flush at COMMIT is Postgres' own;
#                the extension's flush finds it done
#   off/local    synchronous_commit = off at COMMIT: the extension's flush does the work Postgres skipped
#   on/standbys  synchronous_commit = on,  delete_after = all_standbys: the deletes also wait for the standby
# Usage: EP=<LocalStack URL> B=<bench dir> scripts/bench_durability.sh (make bench sets both).
source "$(dirname "$0")/lib.sh"
: "${EP:?EP (the LocalStack endpoint) is set by scripts/bench.sh}" "${B:?B (the bench dir) is set by scripts/bench.sh}"
M="${BENCH_DUR_MESSAGES:-100}"
ROUNDS="${BENCH_DUR_ROUNDS:-15}"
D="$B/durability"
rm -rf "$D"; mkdir -p "$D"; chmod 755 "$D"; chown postgres:postgres "$D"
stop_both() { pg_stop "$D/primary"; pg_stop "$D/standby"; }
trap stop_both EXIT
P_PORT="$(free_port 36432)"; S_PORT="$(free_port $((P_PORT + 1)))"
pg_start "$D/primary" "$P_PORT" "sqs_ingest" "sqs_ingest.worker_count = 0"
PSQL=(psql -X -q -A -t -h "$D/primary" -p "$P_PORT" -U postgres -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "SELECT pg_create_physical_replication_slot('bench_standby', true)" >/dev/null
"${PSQL[@]}" -d postgres -c "CREATE DATABASE bench" >/dev/null
"${PSQL[@]}" -d bench -c "CREATE EXTENSION sqs_ingest" -c "SELECT sqs_ingest.rotate_key()" >/dev/null
mkdir -p "$D/standby"; chmod 755 "$D/standby"; chown postgres:postgres "$D/standby"
runuser -u postgres -- "$PG_BIN/pg_basebackup" -D "$D/standby/data" -h "$D/primary" -p "$P_PORT" -U postgres \
    >"$D/basebackup.log" 2>&1 || die_with_log "pg_basebackup failed" "$D/basebackup.log"
runuser -u postgres -- touch "$D/standby/data/standby.signal"
pg_start "$D/standby" "$S_PORT" "sqs_ingest" "sqs_ingest.worker_count = 0
primary_conninfo = 'host=$D/primary port=$P_PORT user=postgres application_name=bench_standby'
primary_slot_name = 'bench_standby'"
streaming="$(psql -X -A -t -h "$D/standby" -p "$S_PORT" -U postgres -d postgres \
    -c "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")"
[[ "$streaming" == 1 ]] || warn "the standby is not streaming: the on/standbys figures wait for nothing"

MODES=(on/local off/local on/standbys)
settings() {
    # No confirming long poll (wait_time 0): the call's time is then its receives, stores, COMMIT and deletes.
    echo -n "SET sqs_ingest.wait_time = 0; "
    case "$1" in
        on/local) echo "SET synchronous_commit = on; SET sqs_ingest.delete_after = local;" ;;
        off/local) echo "SET synchronous_commit = off; SET sqs_ingest.delete_after = local;" ;;
        on/standbys) echo "SET synchronous_commit = on; SET sqs_ingest.delete_after = all_standbys;" ;;
    esac
}
queue() { echo "$EP/000000000000/bench-durable-${1//\//-}"; }
for mode in "${MODES[@]}"; do "${PSQL[@]}" -d bench -c "SELECT sqs_ingest.queue_create('$(queue "$mode")', 30)" >/dev/null; done

# One session for every call (its first SQS call, which sets up the runtime and clients, is a warm-up); each call
# is preceded by loading its messages (\! runs the loader between statements, outside the timing).
{
    echo "\\timing off"
    for mode in "${MODES[@]}"; do
        echo "\\! bash -c 'source $REPO_ROOT/scripts/lib.sh; load_queue $EP bench-durable-${mode//\//-} $M 3'"
        echo "$(settings "$mode") SELECT received FROM sqs_ingest('$(queue "$mode")');"
    done
    for ((r = 1; r <= ROUNDS; r++)); do
        order=("${MODES[@]}")
        (( r % 2 == 0 )) && order=(on/standbys off/local on/local)
        for mode in "${order[@]}"; do
            echo "\\! bash -c 'source $REPO_ROOT/scripts/lib.sh; load_queue $EP bench-durable-${mode//\//-} $M $r'"
            echo "$(settings "$mode")"
            echo "\\echo mode $mode"
            echo "\\timing on"
            echo "SELECT received FROM sqs_ingest('$(queue "$mode")');"
            echo "\\timing off"
        done
    done
} >"$D/calls.sql"
"${PSQL[@]}" -d bench -f "$D/calls.sql" >"$D/calls.out" 2>&1 || die_with_log "the durability calls failed" "$D/calls.out"
grep -q WARNING "$D/calls.out" && warn "a call warned (see $D/calls.out): its figures include a deferral or a failed delete"
deferred="$("${PSQL[@]}" -d bench -c "SELECT COALESCE(sum(deletes_deferred), 0) FROM sqs_ingest.stats")"

echo "== durability: ms per call of $M messages, $ROUNDS rounds alternating, one asynchronous standby on loopback (slot), median (min-max)"
awk '/^mode / { mode = $2 } /^Time: / { print mode, $2 }' "$D/calls.out" >"$D/times"
for mode in "${MODES[@]}"; do
    grep "^$mode " "$D/times" | awk '{ print $2 }' >"$D/t"
    printf '%-12s %8s ms  (%s-%s)  received per call: %s\n' "$mode" "$(median <"$D/t")" \
        "$(sort -n "$D/t" | head -1)" "$(sort -n "$D/t" | tail -1)" "$M"
done
echo "deletes deferred in these calls: $deferred"
