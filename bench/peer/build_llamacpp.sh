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
tarball="${LLAMA_CPP_TARBALL:-$( (ls "$cache"/carry/llama.cpp-from-llama-cpp-python-*.tar.gz 2>/dev/null || true) | sort | tail -n 1)}"
if [[ -z "$tarball" || ! -f "$tarball" ]]; then
    echo "build_llamacpp.sh: no trimmed llama.cpp tarball in $cache/carry: run python3 bench/peer/fetch_llamacpp.py" >&2
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
# cuBLAS: from the CUDA toolkit if it has it, else from the Python package nvidia-cublas (PyTorch's wheels
# bring it: nvidia/cu13/lib/libcublas.so.13 without the unversioned name and headers beside it), which is
# linked through a folder of links in the build tree (its rpath then finds the library at run time)
cublas_flags() {
    local nvcc_root
    nvcc_root="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    if compgen -G "$nvcc_root/lib64/libcublas.so*" >/dev/null || \
       compgen -G "$nvcc_root/targets/x86_64-linux/lib/libcublas.so*" >/dev/null; then
        return
    fi
    local lib
    lib="$(python3 -c 'import glob, importlib.util, os, sys
spec = importlib.util.find_spec("nvidia")
dirs = list(spec.submodule_search_locations) if spec else []
hits = sorted(h for d in dirs for h in glob.glob(os.path.join(d, "*", "lib", "libcublas.so.*")))
print(os.path.dirname(hits[-1]) if hits else "")')"
    if [[ -z "$lib" ]]; then
        echo "build_llamacpp.sh: no libcublas in $nvcc_root nor in a Python nvidia-cublas package" >&2
        exit 1
    fi
    local links="$build/cublas"
    mkdir -p "$links/lib" "$links/include"
    ln -sf "$(ls "$lib"/libcublas.so.* | head -n 1)" "$links/lib/libcublas.so"
    ln -sf "$(ls "$lib"/libcublasLt.so.* | head -n 1)" "$links/lib/libcublasLt.so"
    for h in "$lib"/../include/cublas*.h; do ln -sf "$(readlink -f "$h")" "$links/include/"; done
    echo "build_llamacpp.sh: cuBLAS from $lib" >&2
    flags+=(-DCUDA_cublas_LIBRARY="$links/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$links/lib/libcublasLt.so"
            -DCMAKE_CUDA_FLAGS="-I$links/include")
}
# the driver library (ggml's CUDA memory pool uses the driver's virtual memory API): the toolkit's stub if
# present, else the driver's libcuda.so.1 (which CMake's search by the unversioned name misses); a machine
# with neither (a build host without a GPU driver) builds without that pool (GGML_CUDA_NO_VMM)
driver_flags() {
    local nvcc_root drv
    nvcc_root="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    compgen -G "$nvcc_root/lib64/stubs/libcuda.so" >/dev/null && return
    compgen -G "$nvcc_root/targets/x86_64-linux/lib/stubs/libcuda.so" >/dev/null && return
    drv="$( (ldconfig -p 2>/dev/null | awk '/libcuda\.so(\.1)? /{print $NF}'; ls /usr/local/nvidia/lib64/libcuda.so.1 \
             /usr/lib/x86_64-linux-gnu/libcuda.so.1 2>/dev/null || true) | head -n 1)"
    if [[ -n "$drv" ]]; then
        flags+=(-DCUDA_cuda_driver_LIBRARY="$drv")
    else
        echo "build_llamacpp.sh: no libcuda found: building with GGML_CUDA_NO_VMM=ON" >&2
        flags+=(-DGGML_CUDA_NO_VMM=ON)
    fi
}
build="$cache/build-$kind"
case "$kind" in
    cpu)  flags=(-DGGML_CUDA=OFF) ;;
    cuda) flags=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_ALL_QUANTS=OFF)
          cublas_flags
          driver_flags ;;
    *)    echo "build_llamacpp.sh: unknown build '$kind' (cpu or cuda)" >&2; exit 1 ;;
esac
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S "$src" -B "$build" "${gen[@]}" "${common[@]}" "${flags[@]}"
# LLAMA_CPP_TARGETS: other ninja/make targets (e.g. single object files, to check the flags)
cmake --build "$build" --target ${LLAMA_CPP_TARGETS:-llama-bench llama-quantize} -j "$jobs"
[[ -n "${LLAMA_CPP_TARGETS:-}" ]] && exit 0
ls -l "$build/bin/llama-bench" "$build/bin/llama-quantize"
