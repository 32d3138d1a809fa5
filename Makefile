# `make demo` and `make test` each create or reuse .venv, then run. Everything installs in one
# pip pass: adding litert-torch to an existing environment later downgrades typing-extensions and
# breaks pydantic. torch is pinned to the CPU build 2.13.0; an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgeopt-installed

.PHONY: setup demo test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgeopt optimize --data digits --out runs/demo --overwrite

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -ra

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
