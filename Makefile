# The README's commands. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.bench-installed

.PHONY: run test lint format proto proto-check breaking bench bench-smoke clean

$(INSTALLED): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The benchmark extra (matplotlib for the plots) on top of the dev install.
$(BENCH_INSTALLED): $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $@

## Run the service on the embedded SQLite database (gRPC :50051, REST :8080).
run: $(INSTALLED)
	$(BIN)/cueline serve

## The whole suite: lint, type checks, the contract checks, then pytest on SQLite and PostgreSQL.
test: lint
	$(BIN)/pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/python clients/python/generate.py --check
	BUF=$(BIN)/buf .ci/buf-breaking

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/buf format -w

## Regenerate clients/python/cueline from proto/ (the only way it changes).
proto: $(INSTALLED)
	$(BIN)/python clients/python/generate.py

proto-check: $(INSTALLED)
	$(BIN)/python clients/python/generate.py --check

breaking: $(INSTALLED)
	BUF=$(BIN)/buf .ci/buf-breaking

## Every benchmark (G1-G9, G13, G14) with its ceilings on SQLite and PostgreSQL;
## writes bench/results/ and the plots in docs/bench/.
bench: $(BENCH_INSTALLED)
	$(BIN)/python -m bench

## A short run of the same, to keep the harness working (no speed assertions);
## its plots go to bench/results/, not docs/.
bench-smoke: $(BENCH_INSTALLED)
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
