#!/usr/bin/env bash
# Throughput as a user sees it (issue "throughput on the user's path"): a fresh session, no max_messages, the
# table created by the call, default settings; beside LocalStack's raw drain with 4 and 8 pollers (the bar is the
# one with the better median, compared round by round), and beside the same call with the receive concurrency fixed at 4 (no adaptation). Then one
# backend through a proxy adding 10 ms and 30 ms round trips (scripts/delay_proxy.py), printed against the bound
# in-flight x 10 / RTT, and one background worker (worker_start(), 100-message batches) draining the same number
# through the proxy, adaptive and fixed at 4. The confirming long poll (sqs_ingest.wait_time, 1 s) is subtracted
# from the call's wall clock. Called by scripts/bench.sh; runs alone too.
#   BENCH_USER_N (default 10000) messages per round, BENCH_USER_ROUNDS (default 6: an even number,
#   as many rounds in each order), BENCH_DELAY_N (default 5000),
#   BENCH_USER_RTTS (default "10 30": the added round trips in ms; empty for the loopback rounds alone).
source "$(dirname "$0")/lib.sh"
N="${BENCH_USER_N:-10000}"
ROUNDS="${BENCH_USER_ROUNDS:-6}"
DN="${BENCH_DELAY_N:-5000}"
U="$(run_root)/bench-user"
rm -rf "$U"; mkdir -p "$U"; chmod 755 "$U"
PROXY_PIDS=()
cleanup() {
    local p
    for p in "${PROXY_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    pg_stop "$U/pg"; localstack_stop "$U/localstack"
}
trap cleanup EXIT
LS_PORT="$(free_port 24866)"; PG_PORT="$(free_port 35732)"
localstack_start "$U/localstack" "$LS_PORT"
pg_start "$U/pg" "$PG_PORT" "sqs_ingest" "shared_buffers = 256MB
log_min_messages = warning"
EP="http://localhost:$LS_PORT"
PSQL=(psql -X -q -A -t -h "$U/pg" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1)
load() { load_queue "$3" "$1" "$2" 11; }
"${PSQL[@]}" -d postgres -c "CREATE EXTENSION sqs_ingest" >/dev/null  # for bench_raw_drain
WAIT_S="$("${PSQL[@]}" -d postgres -c "SELECT setting FROM pg_settings WHERE name = 'sqs_ingest.wait_time'")"  # seconds

# raw_drain QUEUE_URL POLLERS N: msg/s of the receive+delete drain (no database work).
raw_drain() {
    "${PSQL[@]}" -d postgres -c "SET sqs_ingest.receive_concurrency = $2" \
        -c "SELECT round(received / (elapsed_ms / 1000.0)) FROM sqs_ingest.bench_raw_drain('$1', $3)"
}
# user_call DB QUEUE_URL [SETTINGS]: a fresh database and session, sqs_ingest('<url>') with no max_messages;
# prints "<msg/s> <peak in flight> <final in flight>", the wall clock less the confirming long poll.
user_call() {
    local db="$1" url="$2" settings="${3:-}"
    PGOPTIONS="-c client_min_messages=warning" "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
    "${PSQL[@]}" -d "$db" -c "CREATE EXTENSION sqs_ingest" >/dev/null
    local out
    out="$(psql -X -A -t -h "$U/pg" -p "$PG_PORT" -U postgres -d "$db" -v ON_ERROR_STOP=1 2>&1 <<SQL
$settings
SET client_min_messages = debug1;
\\timing on
SELECT received FROM sqs_ingest('$url');
SQL
)"
    local ms received conc
    ms="$(sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' <<<"$out" | tail -1)"
    received="$(grep -E '^[0-9]+$' <<<"$out" | tail -1)"
    conc="$(sed -n 's/.*receive concurrency: started at [0-9]*, peak \([0-9]*\), ended at \([0-9]*\).*/\1 \2/p' <<<"$out" | tail -1)"
    # A failed call, or one with a WARNING (deletes after COMMIT stopped at sqs_ingest.post_commit_timeout would
    # end it early and overstate its rate), is no measurement: the caller stops the benchmark.
    if [[ -z "$received" || -z "$ms" ]] || grep -q WARNING <<<"$out"; then
        echo "the call failed or warned: $(grep -E 'ERROR|WARNING' <<<"$out" | head -3)" >&2; echo "failed"; return
    fi
    awk -v n="$received" -v ms="$ms" -v w="$WAIT_S" -v c="${conc:-? ?}" \
        'BEGIN { s = ms / 1000 - w; if (s <= 0) s = ms / 1000; printf "%.0f %s\n", n / s, c }'
}

# ls_cpu_ms: CPU time LocalStack's process has used so far (all its threads, user + system), in ms.
LS_PID="$(cat "$U/localstack/localstack.pid")"; TICKS="$(getconf CLK_TCK)"
ls_cpu_ms() { sed 's/.*) //' "/proc/$LS_PID/stat" | awk -v hz="$TICKS" '{ printf "%.0f\n", ($12 + $13) * 1000 / hz }'; }

echo "== user's path: $ROUNDS rounds of $N messages, LocalStack $LOCALSTACK_VERSION on loopback, $(nproc) cores"
# Each round runs the four drains on queues loaded alike, in the opposite order every other round (drift in
# LocalStack's speed within a round then favours neither side), and records each one's msg/s (with the call's
# peak and final in flight) and, last on the line, LocalStack's CPU time per 1,000 messages (ms).
: >"$U/raw4"; : >"$U/raw8"; : >"$U/user"; : >"$U/fixed"
for r in $(seq "$ROUNDS"); do
    order="raw4 raw8 user fixed"; (( r % 2 )) || order="fixed user raw8 raw4"
    for who in $order; do
        load "$who-$r" "$N" "$EP"
        url="$EP/000000000000/$who-$r"; cpu0="$(ls_cpu_ms)"
        case "$who" in
            raw4) out="$(raw_drain "$url" 4 "$N")" ;;
            raw8) out="$(raw_drain "$url" 8 "$N")" ;;
            user) out="$(user_call "user_$r" "$url")" ;;
            fixed) out="$(user_call "fixed_$r" "$url" "SET sqs_ingest.max_receive_concurrency = 4;")" ;;
        esac
        [[ "$out" != failed ]] || die "$who in round $r did not give a measurement"
        echo "$out $(awk -v a="$cpu0" -v b="$(ls_cpu_ms)" -v n="$N" 'BEGIN { printf "%.0f", (b - a) * 1000 / n }')" >>"$U/$who"
    done
    read -r rate peak end _ < <(tail -1 "$U/user")
    printf 'round %s (%s): raw drain 4 pollers %s, 8 pollers %s msg/s; sqs_ingest() %s msg/s (in flight peak %s, end %s); fixed at 4: %s msg/s\n' \
        "$r" "${order// /, }" "$(tail -1 "$U/raw4" | cut -d' ' -f1)" "$(tail -1 "$U/raw8" | cut -d' ' -f1)" \
        "$rate" "$peak" "$end" "$(tail -1 "$U/fixed" | cut -d' ' -f1)"
done
rates() { cut -d' ' -f1 "$U/$1"; }
R4="$(rates raw4 | median)"; R8="$(rates raw8 | median)"
# The bar is the raw drain with the better median over the rounds, compared round by round with the call of the
# same round. (Not the better of the two in each round: the larger of two noisy figures overstates the drain.)
BEST=raw4; BAR="$R4"; awk -v a="$R4" -v b="$R8" 'BEGIN { exit !(b > a) }' && { BEST=raw8; BAR="$R8"; }
printf '%-52s %8s msg/s (%s pollers; 4 pollers %s, 8 pollers %s: medians)\n' "raw drain, the better median of 4 and 8 pollers" \
    "$BAR" "${BEST#raw}" "$R4" "$R8"
# round_ratios WHO: "<median of the per-round ratios> (rounds <each round's>)", each round's call against the
# bar's drain of the same round (rounds minutes apart, while LocalStack's own speed drifts between them).
round_ratios() {
    paste -d' ' <(rates "$BEST") <(rates "$1") \
        | awk '{ if ($1 > 0) printf "%.3f\n", $2 / $1; else print "0" }' >"$U/$1.ratios"
    printf '%.3f (rounds %s)' "$(median <"$U/$1.ratios")" "$(paste -sd/ "$U/$1.ratios")"
}
for who in user fixed; do
    label="sqs_ingest(), user's path, default settings"
    [[ "$who" == fixed ]] && label="the same, receive concurrency fixed at 4"
    rate="$(rates "$who" | median)"
    printf '%-52s %8s msg/s; to the raw drain: per-round median %s, ratio of medians %s\n' "$label" "$rate" \
        "$(round_ratios "$who")" "$(awk -v a="$rate" -v b="$BAR" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
done
# LocalStack runs its requests on one core (one Python process): where it is the bottleneck, what a drain costs
# it per message sets the drain's rate, whatever the client does beside it.
# Its busy share (CPU ms per message x msg/s, in cores) shows whether it was the bottleneck: about 1.0.
ls_cpu_per_1000() { awk '{ print $NF }' "$U/$1" | median; }
busy() { awk '{ printf "%.2f\n", $NF * $1 / 1e6 }' "$U/$1" | median; }
printf '%-52s raw drain 4 pollers %s, 8 pollers %s; sqs_ingest() %s; fixed at 4: %s (medians)\n' \
    "LocalStack CPU per 1,000 messages, ms" "$(ls_cpu_per_1000 raw4)" "$(ls_cpu_per_1000 raw8)" "$(ls_cpu_per_1000 user)" "$(ls_cpu_per_1000 fixed)"
printf '%-52s raw drain 4 pollers %s, 8 pollers %s; sqs_ingest() %s; fixed at 4: %s (medians)\n' \
    "LocalStack busy during each, cores" "$(busy raw4)" "$(busy raw8)" "$(busy user)" "$(busy fixed)"

# worker_drain DB QUEUE_URL [DATABASE_SETTING] [BATCH]: msg/s of one dynamic worker (default 100-message
# batches) draining DN messages: from worker_start() until the last row is visible (polled every 0.1 s).
worker_drain() {
    local db="$1" url="$2" setting="${3:-}" batch="${4:-NULL}" t0 t1 n=0
    PGOPTIONS="-c client_min_messages=warning" "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
    "${PSQL[@]}" -d "$db" -c "CREATE EXTENSION sqs_ingest" >/dev/null
    [[ -z "$setting" ]] || "${PSQL[@]}" -d postgres -c "ALTER DATABASE $db SET $setting" >/dev/null
    t0="$(date +%s.%N)"
    "${PSQL[@]}" -d "$db" -c "SELECT sqs_ingest.worker_start('$url', $batch)" >/dev/null
    while (( n < DN )); do
        sleep 0.1
        n="$("${PSQL[@]}" -d "$db" -c "SELECT CASE WHEN pg_catalog.to_regclass('public.user_logins') IS NULL THEN 0 ELSE (SELECT pg_catalog.count(*) FROM public.user_logins) END")"
        if awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { exit !(b - a > 300) }'; then
            echo "the worker stored $n of $DN messages in 300 s" >&2; break
        fi
    done
    t1="$(date +%s.%N)"
    "${PSQL[@]}" -d "$db" -c "SELECT sqs_ingest.worker_stop()" >/dev/null
    awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f\n", n / (b - a) }'
}

# One backend at real-network round trips. The proxy's loopback RTT (~1-3 ms) adds to the delay.
for rtt in ${BENCH_USER_RTTS-10 30}; do
    port="$(free_port $((24900 + rtt)))"
    "$LOCALSTACK_VENV/bin/python" "$REPO_ROOT/scripts/delay_proxy.py" "$port" "$LS_PORT" "$rtt" >"$U/proxy$rtt.log" 2>&1 &
    PROXY_PIDS+=($!)
    for _ in $(seq 50); do grep -q ready "$U/proxy$rtt.log" 2>/dev/null && break; sleep 0.1; done
    DEP="http://localhost:$port"
    load "delay$rtt" "$DN" "$EP"
    read -r rate peak end < <(user_call "delay_$rtt" "$DEP/000000000000/delay$rtt")
    load "delay$rtt-fixed" "$DN" "$EP"
    read -r frate _ _ < <(user_call "delay_${rtt}_fixed" "$DEP/000000000000/delay$rtt-fixed" "SET sqs_ingest.max_receive_concurrency = 4;")
    load "delay$rtt-raw" "$DN" "$EP"
    raw="$(raw_drain "$DEP/000000000000/delay$rtt-raw" 16 "$DN")"
    printf 'RTT +%2s ms: sqs_ingest() %5s msg/s, in flight peak %s (bound %s x 10 / %s ms = %s msg/s); fixed at 4: %5s msg/s (bound %s); raw drain, 16 pollers: %s msg/s\n' \
        "$rtt" "$rate" "$peak" "$peak" "$rtt" "$(awk -v k="$peak" -v r="$rtt" 'BEGIN { printf "%.0f", k * 10000 / r }')" \
        "$frate" "$(awk -v r="$rtt" 'BEGIN { printf "%.0f", 40000 / r }')" "$raw"
    load "worker$rtt" "$DN" "$EP"
    wrate="$(worker_drain "worker_$rtt" "$DEP/000000000000/worker$rtt")"
    load "worker$rtt-fixed" "$DN" "$EP"
    wfixed="$(worker_drain "worker_${rtt}_fixed" "$DEP/000000000000/worker$rtt-fixed" "sqs_ingest.max_receive_concurrency = 4")"
    load "worker$rtt-1000" "$DN" "$EP"
    wbig="$(worker_drain "worker_${rtt}_1000" "$DEP/000000000000/worker$rtt-1000" "" 1000)"
    printf 'RTT +%2s ms: one worker (100-message batches) %5s msg/s; fixed at 4: %5s msg/s; 1000-message batches: %5s msg/s\n' \
        "$rtt" "$wrate" "$wfixed" "$wbig"
done
