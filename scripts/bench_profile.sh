#!/usr/bin/env bash
# Where a backend's CPU goes per message, and the floor under it (issue "throughput", point 4). In one warm
# session: sqs_ingest(url, N) measured from /proc/<pid>/task/<tid>/schedstat in nanoseconds (main thread: SQL,
# masking, ledger; network thread sqs_ingest-net: HTTP to SQS), then a like call on another queue under
# `perf record`, grouped by scripts/profile_summary.py (its shares scaled to the unprofiled call: perf's
# unwinding slows what it samples), then the two floors
# of this design measured on their own: the network client with no database (sqs_ingest.bench_raw_drain: the
# same ReceiveMessage and DeleteMessageBatch calls) and the two writes that make a message stored exactly once
# (the ledger insert and the target insert, the same statements in a PL/pgSQL loop, no network).
# Needs `perf` (Debian: linux-perf) for the profile; without it the figures from /proc are still printed.
# Called by scripts/bench.sh; runs alone too.
#   BENCH_PROFILE_N (default 10000) messages per call; BENCH_FLOOR_ROWS (default 50000) rows per SQL loop;
#   PROFILE_KEEP=1 keeps perf.data under .run/bench-profile.
source "$(dirname "$0")/lib.sh"
N="${BENCH_PROFILE_N:-10000}"
ROWS="${BENCH_FLOOR_ROWS:-50000}"
P="$(run_root)/bench-profile"
rm -rf "$P"; mkdir -p "$P"; chmod 755 "$P"
PSQL_PID=""; PERF_PID=""
# (Under set -e: every step may fail without cutting the cleanup short, so LocalStack is never left running.)
cleanup() {
    touch "$P"/go.{1..8} 2>/dev/null || true  # releases a session waiting at a mark (its \\! shell too)
    if [[ -n "$PERF_PID" ]]; then kill -INT "$PERF_PID" 2>/dev/null || true; fi
    if [[ -n "$PSQL_PID" ]]; then kill "$PSQL_PID" 2>/dev/null || true; fi
    pg_stop "$P/pg" || true
    localstack_stop "$P/localstack" || true
    if [[ -z "${PROFILE_KEEP:-}" ]]; then rm -f "$P/perf.data"; fi
}
trap cleanup EXIT
LS_PORT="$(free_port 24966)"; PG_PORT="$(free_port 35832)"
localstack_start "$P/localstack" "$LS_PORT"
pg_start "$P/pg" "$PG_PORT" "sqs_ingest" "shared_buffers = 256MB"
EP="http://localhost:$LS_PORT"
Q="$EP/000000000000"
PSQL=(psql -X -q -A -t -h "$P/pg" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1)
load() { load_queue "$EP" "$1" "$2" 13; }
"${PSQL[@]}" -d postgres -c "CREATE DATABASE prof" >/dev/null
"${PSQL[@]}" -d prof -c "CREATE EXTENSION sqs_ingest" -c "SELECT sqs_ingest.rotate_key()" \
    -c "CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256), masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date)" \
    -c "CREATE TABLE floor_logins (LIKE user_logins)" >/dev/null
load prof-warm 2000
for q in prof-quiet prof prof-raw; do load "$q" "$N"; done
PERF=""
command -v perf >/dev/null 2>&1 && perf record -e cpu-clock -o /dev/null -- true >/dev/null 2>&1 && PERF=perf
[[ -n "$PERF" ]] || warn "perf is not installed or not permitted here: no profile, CPU per thread only"

# The session runs in the background; at each `mark K` it waits until this script has taken its measurement.
mark() { printf "\\\\! sh -c 'touch %s/at.%s; while [ ! -f %s/go.%s ]; do sleep 0.05; done'\n" "$P" "$1" "$P" "$1"; }
# The SQL floor: B batches of 100 random MessageIds (uuid text, as SQS's) written with the statements ingest
# uses. The row arrays are made before the loop, so the loop is the writes and 100 fresh ids per batch;
# what=gen runs the same loop without the writes (subtracted).
floor_loop() {
    local what="$1" b=$((ROWS / 100)) write=""
    case "$what" in
        ledger) write="WITH c AS (INSERT INTO sqs_ingest.ledger (queue_key, message_id, outcome)
                        SELECT 42, m, o FROM unnest(ids, outs) AS u(m, o) ON CONFLICT DO NOTHING RETURNING message_id)
                        SELECT pg_catalog.count(*) INTO n FROM c;" ;;
        target) write="INSERT INTO floor_logins SELECT * FROM unnest(ids, devs, ips, dids, locs, vers, dates);" ;;
    esac
    cat <<SQL
DO \$\$
DECLARE ids text[]; outs text[]; devs text[]; ips text[]; dids text[]; locs text[]; vers int[];
        dates date[]; n int;
BEGIN
  SELECT array_agg('stored'::text), array_agg('android'::text), array_agg(md5(i::text) || md5((i * 7)::text)),
         array_agg(md5((i * 3)::text) || md5(i::text)), array_agg('en_US'::text), array_agg(20300),
         array_agg(current_date)
    INTO outs, devs, ips, dids, locs, vers, dates FROM generate_series(1, 100) AS i;
  FOR b IN 1..$b LOOP
    SELECT array_agg(gen_random_uuid()::text) INTO ids FROM generate_series(1, 100);
    $write
  END LOOP;
END \$\$;
SQL
}
{
    echo "SELECT pg_backend_pid() \\g $P/pid"
    echo "SELECT received FROM sqs_ingest('$Q/prof-warm', 2000) \\g /dev/null"
    mark 1
    echo "SELECT received FROM sqs_ingest('$Q/prof-quiet', $N) \\g $P/received.quiet"
    mark 2
    echo "SELECT received FROM sqs_ingest('$Q/prof', $N) \\g $P/received.perf"
    mark 3
    echo "SELECT received FROM sqs_ingest.bench_raw_drain('$Q/prof-raw', $N) \\g $P/received.raw"
    mark 4
    floor_loop gen
    mark 5
    floor_loop ledger
    mark 6
    floor_loop target
    mark 7
    floor_loop gen
    mark 8
} >"$P/session.sql"
"${PSQL[@]}" -d prof -f "$P/session.sql" >"$P/out" 2>&1 &
PSQL_PID=$!
# at K: waits for the session to reach mark K; go K lets it go on.
at() {
    until [[ -f "$P/at.$1" ]]; do
        kill -0 "$PSQL_PID" 2>/dev/null || die "the profiling session stopped before step $1: $(cat "$P/out")"
        sleep 0.05
    done
}
go() { touch "$P/go.$1"; }
# cpu: "<main> <net>" nanoseconds on CPU (schedstat) of the backend's main thread and of its network thread(s).
cpu() {
    local pid main net=0 t
    pid="$(cat "$P/pid")"
    main="$(cut -d' ' -f1 "/proc/$pid/task/$pid/schedstat")"
    for t in /proc/"$pid"/task/*; do
        if grep -q '^sqs_ingest-net' "$t/comm" 2>/dev/null; then net=$((net + $(cut -d' ' -f1 "$t/schedstat"))); fi
    done
    echo "$main $net"
}
# us A B COUNT: microseconds per item between two nanosecond counts.
us() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%.1f", (b - a) / 1e3 / n }'; }

at 1; read -r M1 T1 <<<"$(cpu)"; go 1
at 2; read -r M2 T2 <<<"$(cpu)"
if [[ -n "$PERF" ]]; then
    perf record -e cpu-clock -F 1000 --call-graph dwarf,16384 -p "$(cat "$P/pid")" -o "$P/perf.data" >"$P/perf.log" 2>&1 &
    PERF_PID=$!
    sleep 0.5
fi
go 2
at 3; read -r M3 T3 <<<"$(cpu)"
if [[ -n "$PERF" ]]; then kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" || true; PERF_PID=""; fi
go 3
at 4; read -r M4 T4 <<<"$(cpu)"; go 4
at 5; read -r M5 _ <<<"$(cpu)"; go 5
at 6; read -r M6 _ <<<"$(cpu)"; go 6
at 7; read -r M7 _ <<<"$(cpu)"; go 7
at 8; read -r M8 _ <<<"$(cpu)"; go 8
wait "$PSQL_PID" || die "the profiling session failed: $(cat "$P/out")"
PSQL_PID=""

NQ="$(cat "$P/received.quiet")"; NP="$(cat "$P/received.perf")"; NR="$(cut -d'|' -f1 "$P/received.raw")"
QM="$(us "$M1" "$M2" "$NQ")"; QN="$(us "$T1" "$T2" "$NQ")"
RM="$(us "$M3" "$M4" "$NR")"; RN="$(us "$T3" "$T4" "$NR")"
# The loop without the writes runs before and after the two with them: their mean is subtracted.
GEN="$(awk -v a="$(us "$M4" "$M5" "$ROWS")" -v b="$(us "$M7" "$M8" "$ROWS")" 'BEGIN { printf "%.1f", (a + b) / 2 }')"
LEDGER="$(awk -v a="$(us "$M5" "$M6" "$ROWS")" -v g="$GEN" 'BEGIN { printf "%.1f", a - g }')"
TARGET="$(awk -v a="$(us "$M6" "$M7" "$ROWS")" -v g="$GEN" 'BEGIN { printf "%.1f", a - g }')"
say "backend CPU per message, one warm sqs_ingest() of $NQ messages (the session's second call; /proc schedstat)"
printf '%-58s %6s us\n' "main thread (SQL, parsing, masking, ledger)" "$QM" "network thread sqs_ingest-net (HTTP to SQS)" "$QN"
printf '%-58s %6s us\n' "total" "$(awk -v a="$QM" -v b="$QN" 'BEGIN { printf "%.1f", a + b }')"
if [[ -n "$PERF" ]]; then
    say "where it goes: perf profile of the session's third call ($NP messages, another queue), scaled to the call above"
    perf script -i "$P/perf.data" -F comm,tid,period,ip,sym,dso 2>/dev/null \
        | python3 "$REPO_ROOT/scripts/profile_summary.py" "$NP" --scale-main "$QM" --scale-net "$QN"
fi
say "the floor of this design, measured on its own"
printf '%-58s %6s us  (loops with writes: ledger %s, target %s)\n' "the loop without the writes, plain SQL, per row" "$GEN" \
    "$(us "$M5" "$M6" "$ROWS")" "$(us "$M6" "$M7" "$ROWS")"
printf '%-58s %6s us\n' "ledger insert (ON CONFLICT DO NOTHING), plain SQL, per row" "$LEDGER" \
    "target insert (unnest of 7 arrays), plain SQL, per row" "$TARGET"
# The network side's floor is the network thread itself: hyper, aws-sigv4, serde_json and the kernel's loopback
# TCP (see its profile above). The same client with no database at all, for comparison, costs this much:
printf '%-58s %6s us  (main %s, network thread %s: its pollers run on the main thread)\n' \
    "the same SQS client alone, no database (bench_raw_drain)" "$(awk -v a="$RM" -v b="$RN" 'BEGIN { printf "%.1f", a + b }')" "$RM" "$RN"
printf '%-58s %6s us  (of %s measured; above it: the main thread less the two writes)\n' \
    "floor: the network thread + the two writes" \
    "$(awk -v n="$QN" -v l="$LEDGER" -v t="$TARGET" 'BEGIN { printf "%.1f", n + l + t }')" \
    "$(awk -v a="$QM" -v b="$QN" 'BEGIN { printf "%.1f", a + b }')"
