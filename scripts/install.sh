#!/usr/bin/env bash
# Builds the extension (release) and installs it into a Postgres installation without disturbing running clusters:
# every file is written beside its destination and renamed into place. A rename is atomic and leaves the old inode
# to whoever has it open or mapped, so running backends keep the library they loaded and new backends load the new
# one; `cargo pgrx install` rewrote sqs_ingest.so in place, which crashes every process that has it mapped.
# The library goes in first: older SQL scripts only reference symbols the new library keeps.
#   scripts/install.sh [--pg-config PATH]             build (`cargo pgrx package`, staged in
#                                                     $CACHE_DIR/package-pg<major>), then install; PATH defaults to
#                                                     /usr/bin/pg_config (Debian's Postgres 15); the build is for
#                                                     the major that pg_config reports
#   scripts/install.sh [--pg-config PATH] --no-build  install what the last build for that major staged
source "$(dirname "$0")/lib.sh"
PG_CONFIG=/usr/bin/pg_config
BUILD=1
while (( $# )); do
    case "$1" in
        --pg-config) [[ $# -ge 2 ]] || die "--pg-config needs a path"; PG_CONFIG="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        *) die "unknown argument $1 (usage: scripts/install.sh [--pg-config PATH] [--no-build])" ;;
    esac
done
[[ -x "$PG_CONFIG" ]] || die "$PG_CONFIG is not an executable pg_config (make setup installs the supported majors)"
MAJOR="$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')"
[[ "$MAJOR" =~ ^(15|16|17|18)$ ]] || die "$PG_CONFIG reports '$("$PG_CONFIG" --version)': sqs_ingest builds for PostgreSQL 15 to 18"
PKGLIBDIR="$("$PG_CONFIG" --pkglibdir)"
EXT_DIR="$("$PG_CONFIG" --sharedir)/extension"
STAGE="$CACHE_DIR/package-pg$MAJOR"
mkdir -p "$CACHE_DIR"
cd "$REPO_ROOT"
if (( BUILD )); then
    say "building sqs_ingest (release) for PostgreSQL $MAJOR"
    rm -rf "$STAGE"
    cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$STAGE" >"$CACHE_DIR/install-pg$MAJOR.log" 2>&1 \
        || die_with_log "cargo pgrx package (PostgreSQL $MAJOR) failed" "$CACHE_DIR/install-pg$MAJOR.log"
fi
[[ -f "$STAGE$PKGLIBDIR/sqs_ingest.so" ]] || die "nothing staged in $STAGE: run scripts/install.sh without --no-build"
say "installing sqs_ingest (release) into $PKGLIBDIR"

# Copies $1 to a temporary name beside $2, then renames it over $2.
atomic_install() {
    local src="$1" dest="$2" mode="$3" tmp
    tmp="$(dirname "$dest")/.$(basename "$dest").new.$$"
    install -m "$mode" "$src" "$tmp" && mv -f "$tmp" "$dest"
}
mkdir -p "$EXT_DIR" "$PKGLIBDIR"
# The package mirrors the absolute install paths.
while IFS= read -r -d '' f; do
    atomic_install "$f" "${f#"$STAGE"}" 755
done < <(find "$STAGE" -type f -name '*.so' -print0)
while IFS= read -r -d '' f; do
    atomic_install "$f" "${f#"$STAGE"}" 644
done < <(find "$STAGE" -type f ! -name '*.so' -print0)
# Earlier releases' install scripts and the hand-written upgrade scripts, so ALTER EXTENSION ... UPDATE works.
for f in "$REPO_ROOT"/sql/releases/sqs_ingest--*.sql "$REPO_ROOT"/sql/sqs_ingest--*--*.sql; do
    atomic_install "$f" "$EXT_DIR/$(basename "$f")" 644
done
say "installed sqs_ingest $(grep -m1 '^version' Cargo.toml | cut -d'"' -f2) for PostgreSQL $MAJOR"
