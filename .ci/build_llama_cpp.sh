#!/usr/bin/env bash
# Builds the llama.cpp the llama.cpp tests run: the tree PyPI's llama-cpp-python sdist vendors (its converter
# convert_hf_to_gguf.py and gguf-py as users run them), libllama, and one small driver (.ci/llama_cpp/greedy.cpp)
# that generates greedily from given token ids. Only that target is built, not the tools or the Python package.
# Idempotent: a finished build for the same version and driver is kept. Prints the folder; tests find it through
# UPTRAIN_LLAMA_CPP (that folder), or at its default place.
#   .ci/build_llama_cpp.sh            # -> ~/.cache/uptrain/llama.cpp-<version>
# Measured here (2 cores shared with other jobs): see docs/serving.md.
set -euo pipefail
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
dest="${UPTRAIN_LLAMA_CPP:-${XDG_CACHE_HOME:-$HOME/.cache}/uptrain/llama.cpp-$version}"
here="$(cd "$(dirname "$0")/llama_cpp" && pwd)"
stamp="$version $(cat "$here/greedy.cpp" "$here/CMakeLists.txt" | sha256sum | cut -c1-16)"
if [ -x "$dest/bin/uptrain-greedy" ] && [ "$(cat "$dest/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$dest"
    exit 0
fi
mkdir -p "$dest"
if [ ! -f "$dest/src/convert_hf_to_gguf.py" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$version" -d "$tmp" >&2
    tar xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
    rm -rf "$dest/src"
    mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp" "$dest/src"
fi
cmake -S "$here" -B "$dest/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CPP_SOURCE="$dest/src" >&2
nice cmake --build "$dest/build" --target uptrain-greedy -j "${LLAMA_CPP_BUILD_JOBS:-2}" >&2
mkdir -p "$dest/bin"
cp "$dest/build/uptrain-greedy" "$dest/bin/uptrain-greedy"
echo "$stamp" > "$dest/stamp"
echo "$dest"
