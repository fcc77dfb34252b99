#!/usr/bin/env bash
# make setup: everything the project needs on a fresh Debian 12 machine for Postgres 15 (make setup also runs
# scripts/setup_postgres_majors.sh for 16, 17 and 18). Idempotent: skips what is there.
source "$(dirname "$0")/lib.sh"

[[ $(id -u) -eq 0 ]] || die "run as root (it installs Debian packages and runs Postgres as the postgres user)"

# 1. Debian packages.
need=()
for pkg in postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-contrib libclang-dev postgresql-$PG_MAJOR-cron postgresql-$PG_MAJOR-partman prometheus-postgres-exporter linux-perf sudo curl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if (( ${#need[@]} )); then
    say "installing Debian packages: ${need[*]}"
    mkdir -p "$CACHE_DIR"
    apt-get update -qq >"$CACHE_DIR/apt.log" 2>&1 || die_with_log "apt-get update failed" "$CACHE_DIR/apt.log"
    mkdir -p "$CACHE_DIR"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >"$CACHE_DIR/apt.log" 2>&1 \
        || die_with_log "apt-get install failed" "$CACHE_DIR/apt.log"
else
    say "Debian packages present"
fi
mkdir -p "$CACHE_DIR"

# 2. cargo-pgrx at the pinned version (matches pgrx = \"=$CARGO_PGRX_VERSION\" in Cargo.toml).
if [[ "$(cargo pgrx --version 2>/dev/null || true)" != *"$CARGO_PGRX_VERSION"* ]]; then
    say "installing cargo-pgrx $CARGO_PGRX_VERSION (about 8 minutes on 2 cores)"
    cargo install cargo-pgrx --version "$CARGO_PGRX_VERSION" --locked >"$CACHE_DIR/cargo-pgrx.log" 2>&1 \
        || die_with_log "cargo install cargo-pgrx failed" "$CACHE_DIR/cargo-pgrx.log"
else
    say "cargo-pgrx $CARGO_PGRX_VERSION present"
fi

# 3. pgrx against the system Postgres (downloads nothing; writes ~/.pgrx/config.toml). The other majors are
# registered by scripts/setup_postgres_majors.sh (make test and make setup run it; the demo needs only 15).
if ! grep -q "pg$PG_MAJOR = \"/usr/bin/pg_config\"" "$HOME/.pgrx/config.toml" 2>/dev/null; then
    say "cargo pgrx init --pg$PG_MAJOR /usr/bin/pg_config"
    cargo pgrx init --pg$PG_MAJOR /usr/bin/pg_config >"$CACHE_DIR/pgrx-init.log" 2>&1 \
        || die_with_log "cargo pgrx init failed" "$CACHE_DIR/pgrx-init.log"
else
    say "pgrx initialised for pg$PG_MAJOR"
fi

# 4. LocalStack (SQS, SNS, KMS) in a virtualenv on Python >= 3.12.
if ! "$LOCALSTACK_VENV/bin/python" -c "import localstack, boto3" 2>/dev/null \
    || [[ "$(cat "$LOCALSTACK_VENV/.version" 2>/dev/null)" != "$LOCALSTACK_VERSION" ]]; then
    PY="$(find_python312)" || die "LocalStack needs CPython >= 3.12 and none was found (looked for python3.13, python3.12 on PATH and under /root/.pyenv/versions). Install one, e.g. 'pyenv install 3.12', and re-run make setup."
    say "installing localstack-core $LOCALSTACK_VERSION into $LOCALSTACK_VENV (Python: $PY)"
    rm -rf "$LOCALSTACK_VENV"
    "$PY" -m venv "$LOCALSTACK_VENV" >"$CACHE_DIR/localstack-install.log" 2>&1 \
        || die_with_log "cannot create a virtualenv with $PY" "$CACHE_DIR/localstack-install.log"
    printf 'cbor2<6\npyopenssl<26\ncryptography<47\n' >"$CACHE_DIR/localstack-constraints.txt"
    "$LOCALSTACK_VENV/bin/pip" install -q "localstack-core[runtime]==$LOCALSTACK_VERSION" service-identity boto3 \
        -c "$CACHE_DIR/localstack-constraints.txt" >>"$CACHE_DIR/localstack-install.log" 2>&1 \
        || die_with_log "pip install localstack-core failed" "$CACHE_DIR/localstack-install.log"
    echo "$LOCALSTACK_VERSION" >"$LOCALSTACK_VENV/.version"
else
    say "LocalStack $LOCALSTACK_VERSION present"
fi
say "setup complete"
