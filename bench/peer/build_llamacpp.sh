#!/usr/bin/env bash
# Builds the peer engine's llama-bench and llama-quantize from the trimmed llama.cpp tarball that
# bench/peer/fetch_llamacpp.py writes (no network needed here: the tarball is all it reads).
#
#   bench/peer/build_llamacpp.sh cpu  [JOBS]   # CPU backend, -march=native (GGML_NATIVE), for this machine
#   bench/peer/build_llamacpp.sh cuda [JOBS]   # + CUDA backend for sm_90 (the H100/H200), no extra FA instances
#
# Binaries: bench/peer/cache/build-{cpu,cuda}/bin/llama-{bench,quantize}. Static libraries, so the two
# binaries need nothing from the source or build tree at run time. LLAMA_CPP_TARBALL overrides the tarball.
# Only the two tools are built: tests, examples, the server and libcurl/OpenSSL are off.
set -euo pipefail
kind="${1:?usage: build_llamacpp.sh cpu|cuda [JOBS]}"
jobs="${2:-$(nproc)}"
here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/cache"
tarball="${LLAMA_CPP_TARBALL:-$(ls "$cache"/llama.cpp-from-llama-cpp-python-*.tar.gz 2>/dev/null | sort | tail -n 1)}"
if [[ -z "$tarball" || ! -f "$tarball" ]]; then
    echo "build_llamacpp.sh: no trimmed llama.cpp tarball in $cache: run python3 bench/peer/fetch_llamacpp.py" >&2
    exit 1
fi
src="$cache/src-$(basename "$tarball" .tar.gz)"
if [[ ! -f "$src/.unpacked" ]]; then
    rm -rf "$src" && mkdir -p "$src"
    tar xzf "$tarball" -C "$src" --strip-components=1
    touch "$src/.unpacked"
fi
# the version string comes from the tarball (the tree is not a git checkout of llama.cpp; without this
# llama.cpp's build info would name the enclosing repository's commit)
version="$(basename "$tarball" .tar.gz)"
# AMX off (explicit -mno-* flags win over -march=native in any order): on this project's x86 VM, whose CPU
# reports amx_int8, ggml's AMX matmul (ggml_backend_amx_mul_mat) segfaults on the first Q4_0 prompt; with
# it off, Q4_0 runs ggml's AVX-512 VNNI kernels
noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
common=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" -DLLAMA_BUILD_COMMIT="${version#llama.cpp-from-}" -DLLAMA_BUILD_NUMBER=0 -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON
        -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_SUBPROCESS=OFF)
case "$kind" in
    cpu)  flags=(-DGGML_CUDA=OFF) ;;
    cuda) flags=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_ALL_QUANTS=OFF) ;;
    *)    echo "build_llamacpp.sh: unknown build '$kind' (cpu or cuda)" >&2; exit 1 ;;
esac
build="$cache/build-$kind"
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S "$src" -B "$build" "${gen[@]}" "${common[@]}" "${flags[@]}"
cmake --build "$build" --target llama-bench llama-quantize -j "$jobs"
ls -l "$build/bin/llama-bench" "$build/bin/llama-quantize"
