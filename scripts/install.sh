#!/usr/bin/env bash
# Builds the extension (release) and installs it into the system Postgres 15 without disturbing running clusters:
# every file is written beside its destination and renamed into place. A rename is atomic and leaves the old inode
# to whoever has it open or mapped, so running backends keep the library they loaded and new backends load the new
# one; `cargo pgrx install` rewrote sqs_ingest.so in place, which crashes every process that has it mapped.
# The library goes in first: older SQL scripts only reference symbols the new library keeps.
#   scripts/install.sh             build (`cargo pgrx package`, staged in $CACHE_DIR/package), then install
#   scripts/install.sh --no-build  install what the last build staged
source "$(dirname "$0")/lib.sh"
STAGE="$CACHE_DIR/package"
mkdir -p "$CACHE_DIR"
cd "$REPO_ROOT"
if [[ "${1:-}" != --no-build ]]; then
    say "building sqs_ingest (release)"
    rm -rf "$STAGE"
    cargo pgrx package --pg-config /usr/bin/pg_config --out-dir "$STAGE" >"$CACHE_DIR/install.log" 2>&1 \
        || die_with_log "cargo pgrx package failed" "$CACHE_DIR/install.log"
fi
[[ -f "$STAGE$(pg_config --pkglibdir)/sqs_ingest.so" ]] || die "nothing staged in $STAGE: run scripts/install.sh without --no-build"
say "installing sqs_ingest (release) into $(pg_config --pkglibdir)"

# Copies $1 to a temporary name beside $2, then renames it over $2.
atomic_install() {
    local src="$1" dest="$2" mode="$3" tmp
    tmp="$(dirname "$dest")/.$(basename "$dest").new.$$"
    install -m "$mode" "$src" "$tmp" && mv -f "$tmp" "$dest"
}
EXT_DIR="$(pg_config --sharedir)/extension"
mkdir -p "$EXT_DIR" "$(pg_config --pkglibdir)"
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
say "installed sqs_ingest $(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)"
