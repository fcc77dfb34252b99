#!/usr/bin/env bash
# Builds the extension (release) and installs it into the system Postgres 15. Stops this repo's clusters
# first: replacing a .so that a running cluster has loaded crashes that cluster.
source "$(dirname "$0")/lib.sh"
pg_stop_all
say "building and installing sqs_ingest (release) into $(pg_config --pkglibdir)"
mkdir -p "$CACHE_DIR"
cd "$REPO_ROOT"
cargo pgrx install --release --pg-config /usr/bin/pg_config >"$CACHE_DIR/install.log" 2>&1 \
    || die_with_log "cargo pgrx install failed" "$CACHE_DIR/install.log"
# Earlier releases' install scripts and the hand-written upgrade scripts, so ALTER EXTENSION ... UPDATE works.
EXT_DIR="$(pg_config --sharedir)/extension"
install -m 644 "$REPO_ROOT"/sql/releases/sqs_ingest--*.sql "$REPO_ROOT"/sql/sqs_ingest--*--*.sql "$EXT_DIR/"
say "installed sqs_ingest $(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)"
