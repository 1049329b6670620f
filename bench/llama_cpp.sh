#!/usr/bin/env bash
# Obtain llama.cpp from a package registry and build its benchmark tools:
# the PyPI source package of llama-cpp-python 0.3.36 vendors llama.cpp 0c1e57098.
# Builds llama-bench, llama-batched-bench and llama-server (Release, native CPU, no curl) into
# bench/.llama/ (ignored by git) and prints the bin directory. Idempotent.
# LLAMA_CPP_DIR=/path/to/llama.cpp uses an existing source tree (its build/ directory) instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=0.3.36
if [ -n "${LLAMA_CPP_DIR:-}" ]; then
    src=$LLAMA_CPP_DIR
else
    src="$here/.llama/llama_cpp_python-$version/vendor/llama.cpp"
    if [ ! -f "$src/CMakeLists.txt" ]; then
        mkdir -p "$here/.llama"
        # pip prepares an sdist's metadata with its build backend: install that backend (and
        # CMake, which the build needs too) into a venv first and download without isolation;
        # `--no-binary :all:` would build CMake itself from source.
        venv="$here/.llama/venv"
        [ -x "$venv/bin/cmake" ] || { python3 -m venv "$venv" &&
            "$venv/bin/pip" install --quiet scikit-build-core cmake ninja; }
        "$venv/bin/pip" download --quiet --no-deps --no-build-isolation \
            --no-binary llama-cpp-python -d "$here/.llama" "llama-cpp-python==$version"
        tar xzf "$here/.llama/llama_cpp_python-$version.tar.gz" -C "$here/.llama"
    fi
fi
# CMake from the venv above unless the machine has one.
command -v cmake >/dev/null || export PATH="$here/.llama/venv/bin:$PATH"
build="$src/build"
targets=(llama-bench llama-batched-bench llama-server)
missing=0
for t in "${targets[@]}"; do [ -x "$build/bin/$t" ] || missing=1; done
if [ $missing = 1 ]; then
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON >&2
    cmake --build "$build" --target "${targets[@]}" -j "$(nproc)" >&2
fi
echo "$build/bin"
