# localllm: `make chat` takes a fresh clone to a running chat, `make test` to passing tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
# BACKEND=metal|cuda|vulkan|cpu: the GPU backend llama.cpp is built with (docs/devices.md).
# Default: the one the venv was last set up with, else Metal on macOS and CPU elsewhere.
BACKEND_FILE := $(VENV)/.backend
BACKEND ?= $(or $(shell cat $(BACKEND_FILE) 2>/dev/null),$(if $(filter Darwin,$(shell uname -s)),metal,cpu))
ifeq ($(filter $(BACKEND),metal cuda vulkan cpu),)
$(error BACKEND=$(BACKEND) is not one of metal, cuda, vulkan, cpu)
endif
# ggml's registry name of each backend, checked after the build (cpu: none besides CPU, RPC).
BACKEND_REG_metal := MTL
BACKEND_REG_cuda := CUDA
BACKEND_REG_vulkan := Vulkan
BACKEND_CMAKE_metal := -DGGML_METAL=ON
BACKEND_CMAKE_cuda := -DGGML_CUDA=ON
BACKEND_CMAKE_vulkan := -DGGML_VULKAN=ON
BACKEND_CMAKE_cpu := -DGGML_METAL=OFF
# Reinstall only when the project's dependencies or the backend change; pip's wheel cache
# keeps the llama.cpp build, so even a reinstall does not recompile it.
STAMP  := $(VENV)/.installed-$(BACKEND)
# llama.cpp's RPC backend (localllm rpc-server, --rpc) is off in llama-cpp-python's default
# build: it stays on with every backend.
LLAMA_CMAKE_ARGS := -DGGML_RPC=ON $(BACKEND_CMAKE_$(BACKEND))
# Exit 0 when the installed llama.cpp has RPC and exactly the backend asked for.
BACKEND_CHECK := $(PY) -c 'import sys, llama_cpp; from localllm.runtime.devices import ggml_devices; \
  extra = sorted(set(ggml_devices()[0]) - {"CPU", "RPC"}); want = sorted(sys.argv[1:]); \
  rpc = "" if llama_cpp.llama_supports_rpc() else "no RPC backend; "; \
  sys.exit(0 if not rpc and extra == want else "llama-cpp-python has {}GPU backends {}, BACKEND asks {}".format(rpc, extra, want))' $(BACKEND_REG_$(BACKEND))

.PHONY: setup model native chat test test-fast lint format clean prerequisites

setup: $(STAMP) $(VENV)/.compiled model

# An editable install is not byte-compiled by pip, and where PYTHONDONTWRITEBYTECODE is
# set (CI images, containers) Python would compile localllm's modules anew on every run:
# ~0.13 s of each `chat -p` (benchmarks/chat_oneshot.md). Compiled once per change here.
$(VENV)/.compiled: $(STAMP) $(shell find localllm -name '*.py')
	$(PY) -m compileall -q localllm
	touch $@

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "localllm needs Python >= 3.11")'
	@PYTHON=$(PYTHON) bash .ci/prerequisites.sh check setup
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --disable-pip-version-check -e ".[dev]"
	@# pip's wheel cache is keyed by version, not by build flags: an older build without
	@# the RPC backend, or with another BACKEND, may have been reused. Detect that and
	@# rebuild from source once.
	@$(BACKEND_CHECK) 2>/dev/null || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --disable-pip-version-check \
	    --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$$($(PY) -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')"
	$(BACKEND_CHECK)
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	echo $(BACKEND) > $(BACKEND_FILE)
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

# The system packages (README's list, .ci/prerequisites.sh): one line naming what is
# missing and the command that installs it, before anything is built.
prerequisites:
	@PYTHON=$(PYTHON) bash .ci/prerequisites.sh check test

test: prerequisites setup native
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
