#!/usr/bin/env bash
# One device call of the CUDA checks and the 7B benchmark (the machine reaches no registry; a call is at most
# 10 minutes): stages run in the order given, each logged to $OUT with its time.
#   build  pip-install this checkout with the CUDA backend (sm_90a); test-cuda-ops is built with it
#   ops    test-cuda-ops with MERGEQUANT_REQUIRE_CUBLAS=1 (the integer prefill GEMMs on cuBLAS), then again with
#          MERGEQUANT_CUBLAS=0 (the tiled mma.sync GEMM everywhere): both must be bit-exact against the CPU
#   bench  python bench/bench_gpu.py on the Llama-2-7B shape (MQ_BENCH_ARGS: its extra arguments, e.g.
#          "--schemes f16,w4a4,w4a4-mq --profile")
# Carry .whl (gguf) and .xfer/tokenizers/llama2 (the tokenizer of the random 7B files):
#   bash bench/gpu_session.sh build ops bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
py=python3
status=0
t0=$SECONDS
stamp() { echo "[gpu_session $((SECONDS - t0)) s] $*"; }
if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# cuBLAS: the toolkit's, or the one PyTorch ships
if [ -z "${MERGEQUANT_CUBLAS_LIB:-}" ] && ! ldconfig -p 2>/dev/null | grep -q libcublas.so; then
    lib=$($py -c 'import nvidia, pathlib; print(next(p for d in nvidia.__path__ for p in pathlib.Path(d).rglob("libcublas.so*")))' 2>/dev/null)
    [ -n "$lib" ] && export MERGEQUANT_CUBLAS_LIB=$lib && echo "cuBLAS: $lib"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
for stage in "$@"; do
    case "$stage" in
    build)
        stamp "build"
        MERGEQUANT_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
            $py -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
        stamp "built"
        ;;
    ops)
        ops_bin=$(ls -t build/*/test-cuda-ops 2>/dev/null | head -1)
        if [ -z "$ops_bin" ]; then echo "test-cuda-ops was not built"; status=1; continue; fi
        stamp "test-cuda-ops (cuBLAS required)"
        MERGEQUANT_REQUIRE_CUBLAS=1 "$ops_bin" >"$OUT/ops-cublas.log" 2>&1 || status=1
        grep -E "FAIL|integer prefill|passed|failed|error" "$OUT/ops-cublas.log" | tail -20
        stamp "test-cuda-ops (MERGEQUANT_CUBLAS=0)"
        MERGEQUANT_CUBLAS=0 "$ops_bin" >"$OUT/ops-mma.log" 2>&1 || status=1
        grep -E "FAIL|integer prefill|passed|failed|error" "$OUT/ops-mma.log" | tail -20
        ;;
    bench)
        stamp "bench_gpu 7B"
        read -r -a extra <<< "${MQ_BENCH_ARGS:-}"
        PYTHONUNBUFFERED=1 $py bench/bench_gpu.py --shape 7b --tokenizer .xfer/tokenizers/llama2 --workdir /tmp/w7b \
            --md "$OUT/bench.md" --out "$OUT/bench.json" "${extra[@]}" >"$OUT/bench.log" 2>&1 || status=1
        tail -45 "$OUT/bench.log"
        ;;
    *) echo "gpu_session.sh: unknown stage $stage (build, ops, bench)"; exit 1 ;;
    esac
done
stamp "done (status $status)"
exit $status
