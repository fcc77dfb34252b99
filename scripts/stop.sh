#!/usr/bin/env bash
# make stop: stops the demo's (and any leftover test) Postgres clusters and LocalStack instances.
source "$(dirname "$0")/lib.sh"
ROOT="$(run_root)"
[[ -d "$ROOT" ]] || { say "nothing running"; exit 0; }
pg_stop_all
for pidfile in "$ROOT"/*/localstack/localstack.pid "$ROOT"/*/localstack.pid; do
    [[ -f "$pidfile" ]] && localstack_stop "$(dirname "$pidfile")"
done
say "stopped services under $ROOT"
