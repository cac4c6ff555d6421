#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (native: -march=native through GGML_NATIVE) from the llama.cpp sources
# inside the llama-cpp-python sdist, for bench/run_report.sh's llama.cpp stage. Nothing goes into the
# repository: the sdist, the sources and the build land under $PEERS (default ~/.cache/aisandbox/peers).
#
#   bench/build_llama_server.sh            # about 10 minutes on 2 cores; prints the binary's path
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 bench/build_llama_server.sh
#
# Then: LLAMA_SERVER=<that path> STAGES=llamacpp bench/run_report.sh
set -euo pipefail

peers=${PEERS:-$HOME/.cache/aisandbox/peers}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
python=${PYTHON:-python3}
mkdir -p "$peers"
cd "$peers"
sdist=llama_cpp_python-$version.tar.gz
if [ ! -f "sdist/$sdist" ]; then
  "$python" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d sdist >&2
fi
[ -d "llama_cpp_python-$version" ] || tar xzf "sdist/$sdist"
src=$peers/llama_cpp_python-$version/vendor/llama.cpp
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$src/build" --target llama-server -j "$(nproc)" >&2
echo "$src/build/bin/llama-server"
