#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-completion (for benchmarks/bench_generate.py) and
# llama-server (for benchmarks/bench_serve.py): CPU only, Release, -march=native, from the
# llama.cpp sources vendored in the llama-cpp-python source distribution on PyPI (the one
# registry our machines reach).
#
#   bash benchmarks/build_llama_cpp.sh          # binaries land in $CACHE/bin
#
# CACHE is ${NLGEN_BENCH_CACHE:-$HOME/.cache/nlgen-bench}: src/ (the sdist, unpacked),
# build/ (cmake) and bin/. Idempotent: does nothing when all three binaries exist (delete bin/
# to rebuild; a cache from before llama-server was added builds just what is missing). Without
# cmake or a C++ compiler it says so and exits 0, and the benchmarks skip their llama.cpp rows.
# About 10 minutes on two cores (llama-server adds a few); it runs under `nice`.
#
# Environment: NLGEN_BENCH_CACHE, PYTHON (a python with pip; default python3),
# LLAMA_CPP_PYTHON_VERSION (default below: the version these benchmarks were written against),
# JOBS (default 2).
set -euo pipefail

CACHE="${NLGEN_BENCH_CACHE:-$HOME/.cache/nlgen-bench}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
TARGETS=(llama-bench llama-completion llama-server)
BIN="$CACHE/bin"
NAMES="$(IFS=,; echo "${TARGETS[*]}")"

have_all() {
    local t
    for t in "${TARGETS[@]}"; do [[ -x "$BIN/$t" ]] || return 1; done
}

if have_all; then
    echo "llama.cpp binaries already built: $BIN/{$NAMES}"
    exit 0
fi

for tool in cmake c++ cc; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "note: '$tool' not found; llama.cpp not built (install cmake and a C/C++ compiler," \
             "e.g. apt-get install cmake g++). The benchmarks will skip their llama.cpp rows."
        exit 0
    fi
done

# 1. Sources: the llama-cpp-python sdist vendors a matching llama.cpp tree.
mkdir -p "$CACHE/src"
SDIST="$CACHE/src/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps \
        "llama-cpp-python==$VERSION" -d "$CACHE/src"
fi
SRC="$CACHE/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    tar -xzf "$SDIST" -C "$CACHE/src"
fi

# 2. Configure: CPU backend only, static (the binaries are copied alone), no network at build
# time (no HTTPS client, no tests or examples). The tools and the server are built
# (LLAMA_BUILD_TOOLS, LLAMA_BUILD_SERVER: llama-server is in tools/server and needs both), but
# not its web UI: with LLAMA_BUILD_UI and LLAMA_USE_PREBUILT_UI on (their defaults), the build
# would download the UI's assets from Hugging Face. LLAMA_BUILD_WEBUI and
# LLAMA_USE_PREBUILT_WEBUI are the same switches in older trees, and LLAMA_CURL is deprecated
# and ignored in this version: cmake only warns about a name a tree does not use, and passing
# them keeps other versions (LLAMA_CPP_PYTHON_VERSION) from needing libcurl or the network.
BUILD="$CACHE/build/llama.cpp-$VERSION"
nice -n 19 cmake -S "$SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_WEBUI=OFF \
    -DLLAMA_USE_PREBUILT_WEBUI=OFF \
    -DLLAMA_BUILD_APP=OFF

# 3. Build only what the benchmarks run, then copy it out.
started=$SECONDS
nice -n 19 cmake --build "$BUILD" --config Release --target "${TARGETS[@]}" -j "$JOBS"
mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do
    install -m 755 "$BUILD/bin/$t" "$BIN/$t"
done
echo "built llama.cpp (llama-cpp-python $VERSION) in $((SECONDS - started)) s:" \
     "$BIN/{$NAMES}"
