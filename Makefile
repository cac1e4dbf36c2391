# localllm: `make chat` takes a fresh clone to a running chat, `make test` to passing tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
# Reinstall only when the project's dependencies change; pip's wheel cache keeps the
# llama.cpp build, so even a reinstall does not recompile it.
STAMP  := $(VENV)/.installed

.PHONY: setup model chat test test-fast lint format clean

setup: $(STAMP) model

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "localllm needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/localllm pull smollm2-135m

chat: setup
	$(BIN)/localllm chat

test: setup
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check localllm tests benchmarks
	$(BIN)/ruff format --check localllm tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format localllm tests benchmarks
	$(BIN)/ruff check --fix localllm tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache models/.tmp
