#!/usr/bin/env bash
# Builds the kernel lab and runs every check and benchmark; logs go to $OUT (or build/) as well.
set -euo pipefail
cd "$(dirname "$0")"
out="${OUT:-build}"
mkdir -p "$out"
make -s all 2>&1 | grep -v "ptxas info" || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
status=0
for b in gemv gemm; do
    ./build/$b "$@" 2>&1 | tee "$out/$b.log" || status=1
done
exit $status
