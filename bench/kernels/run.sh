#!/usr/bin/env bash
# Builds the kernel lab (bench/kernels/linear.cu, linked with the engine library) and runs every check and
# timing; logs go to $OUT (or build/kernels/) as well. BUILD: the CMake build directory (default build/kernels).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${BUILD:-$root/build/kernels}"
out="${OUT:-$build}"
mkdir -p "$out"
cmake -S "$root" -B "$build" -DMERGEQUANT_CUDA=ON -DMERGEQUANT_PYTHON=OFF > "$out/cmake.txt"
cmake --build "$build" --target bench-kernels -j "$(nproc)" >> "$out/cmake.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
"$build/bench-kernels" 2>&1 | tee "$out/linear.log"
