#!/usr/bin/env bash
# Checks the container path without a Docker engine: compose YAML parses, every file Dockerfile.pg copies
# exists, and the Dockerfile builds with the same scripts and pins CI uses.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
"$LOCALSTACK_VENV/bin/python" - <<'PY'
import re, sys, yaml, pathlib
root = pathlib.Path(".")
compose = yaml.safe_load(open("docker-compose.yml"))
services = compose.get("services", {})
for name in ("postgres", "localstack", "init"):
    assert name in services, f"docker-compose.yml has no service {name!r}"
ls_image = services["localstack"]["image"]
m = re.search(r":(\d+)", ls_image)
assert m and int(m.group(1)) >= 3, f"LocalStack image {ls_image} must be >= 3 (JSON protocol)"
ports = {p.split(":")[0] for s in services.values() for p in s.get("ports", [])}
assert {"5432", "4566"} <= ports, f"ports 5432 and 4566 must be published, got {ports}"
docker = open("Dockerfile.pg").read()
for src in re.findall(r"^COPY\s+(?!--from)(?:--\S+\s+)*(.+?)\s+\S+\s*$", docker, re.M):
    for part in src.split():
        assert (root / part).exists(), f"Dockerfile.pg copies {part}, which does not exist"
pins = open("scripts/lib.sh").read()
version = re.search(r'CARGO_PGRX_VERSION="([^"]+)"', pins).group(1)
assert f"cargo-pgrx --version {version}" in docker or f"CARGO_PGRX_VERSION={version}" in docker, "Dockerfile.pg must pin the same cargo-pgrx"
assert "cargo pgrx package" in docker or "scripts/install.sh" in docker, "Dockerfile.pg must build with cargo pgrx like scripts/install.sh"
upgrades = sorted(p.name for p in pathlib.Path("sql").glob("sqs_ingest--*--*.sql"))
for u in upgrades:
    assert u in docker, f"Dockerfile.pg does not ship upgrade script {u}"
version = re.search(r'^version = "([^"]+)"', open("Cargo.toml").read(), re.M).group(1)
releases = sorted(p.name for p in pathlib.Path("sql/releases").glob("sqs_ingest--*.sql"))
for r in releases:
    old = r.removeprefix("sqs_ingest--").removesuffix(".sql")
    assert any(u.startswith(f"sqs_ingest--{old}--") for u in upgrades), f"no upgrade path from {old}"
assert any(u.endswith(f"--{version}.sql") for u in upgrades) or not releases, f"no upgrade script reaches {version}"
print("packaging checks passed")
PY
