#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-bench, llama-perplexity, test-llama-archs, which
# writes a small random-weight GGUF of every architecture, llama-server, llama-embedding,
# llama-lookup and llama-speculative-simple) from the llama.cpp tree inside
# llama-cpp-python's sdist: the same commit our Python package runs, so native and
# localllm numbers compare like for like. Output: benchmarks/build/bin/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv_py="${PYTHON:-$here/../.venv/bin/python}"
version="$("$venv_py" -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')"
work="$here/build"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# cmake from PyPI in the venv (pyproject's dev extra); a system cmake otherwise.
cmake="$(dirname "$venv_py")/cmake"
[[ -x "$cmake" ]] || cmake=cmake
mkdir -p "$work"
if [[ ! -d "$src" ]]; then
    "$venv_py" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$version" -d "$work"
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
fi
"$cmake" -S "$src" -B "$work/cmake" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=ON -DGGML_RPC=ON -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON \
    -DGGML_NATIVE=ON >/dev/null
tools=(llama-bench llama-perplexity test-llama-archs llama-server llama-embedding llama-lookup
    llama-speculative-simple)
"$cmake" --build "$work/cmake" --target "${tools[@]}" -j "$(nproc)" >/dev/null
mkdir -p "$work/bin"
# Copy then rename: a running binary cannot be overwritten in place ("text file busy").
for tool in "${tools[@]}"; do
    cp "$work/cmake/bin/$tool" "$work/bin/.$tool.new"
    mv -f "$work/bin/.$tool.new" "$work/bin/$tool"
done
echo "$work/bin"
