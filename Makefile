# localllm: `make chat` takes a fresh clone to a running chat, `make test` to passing tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
# Reinstall only when the project's dependencies change; pip's wheel cache keeps the
# llama.cpp build, so even a reinstall does not recompile it.
STAMP  := $(VENV)/.installed
# llama.cpp's RPC backend (localllm rpc-server, --rpc) is off in llama-cpp-python's default build.
LLAMA_CMAKE_ARGS := -DGGML_RPC=ON

.PHONY: setup model native chat test test-fast lint format clean

setup: $(STAMP) model

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "localllm needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --disable-pip-version-check -e ".[dev]"
	@# pip's wheel cache is keyed by version, not by build flags: an older build without
	@# the RPC backend may have been reused. Detect that and rebuild from source once.
	@$(PY) -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else 1)' || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --disable-pip-version-check \
	    --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$$($(PY) -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')"
	$(PY) -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else "llama-cpp-python was built without GGML_RPC")'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/localllm pull smollm2-135m

# llama.cpp's own tools from the same commit: the native reference the tests and benchmarks
# compare against (built once, ~10 minutes on 2 cores; see benchmarks/build_native.sh).
NATIVE := $(addprefix benchmarks/build/bin/,llama-bench llama-perplexity test-llama-archs \
	llama-server llama-embedding llama-lookup llama-speculative-simple)
native: $(NATIVE)

$(NATIVE) &: benchmarks/build_native.sh | $(STAMP)
	PYTHON=$(PY) bash benchmarks/build_native.sh

chat: setup
	$(BIN)/localllm chat

test: setup native
	$(BIN)/pytest

# No model loads, no native tools: LOCALLLM_ALLOW_NO_NATIVE=1 lets the comparisons with
# llama.cpp's own tools skip when benchmarks/build is missing (`make test` never sets it).
test-fast: $(STAMP)
	@echo "test-fast: LOCALLLM_ALLOW_NO_NATIVE=1, comparisons with native llama.cpp tools skip if they are not built"
	LOCALLLM_ALLOW_NO_NATIVE=1 $(BIN)/pytest -m "not slow and not pip_index"

lint: $(STAMP)
	$(BIN)/ruff check localllm tests benchmarks
	$(BIN)/ruff format --check localllm tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format localllm tests benchmarks
	$(BIN)/ruff check --fix localllm tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache models/.tmp benchmarks/build
