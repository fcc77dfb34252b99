# The two commands: `make demo` (the main job, end to end) and `make test` (every test tier).
.PHONY: demo test setup install stop bench fmt
SHELL := /bin/bash

demo:
	@bash scripts/demo.sh

test:
	@bash scripts/test.sh

setup:
	@bash scripts/setup.sh
	@bash scripts/setup_postgres_majors.sh

install:
	@bash scripts/install.sh

stop:
	@bash scripts/stop.sh

bench:
	@bash scripts/bench.sh

fmt:
	@cargo fmt --all
