#!/usr/bin/env bash
# The whole GPU comparison in one call on a machine without network (an H100/H200 with 16 cores); if it
# does not fit one call's time limit, split it with --only / --skip (see below):
#   1. build-llamacpp: unpack the trimmed llama.cpp (bench/peer/cache/carry/, made here beforehand by
#      python3 bench/peer/fetch_llamacpp.py) and build llama-bench + llama-quantize for sm_90 (-j all cores);
#   2. build-engine:   pip-install this checkout with the CUDA backend (sm_90a), in parallel with 1;
#   3. gguf:           the random Llama-2-7B-shaped model as F16 GGUF (bench/peer/write_gguf.py, started at
#      once, in parallel with 1 and 2), then Q4_0 and Q4_K_M through llama-quantize;
#   4. bench:          python bench/bench_gpu.py with the llama.cpp rows (extra arguments after -- go to it).
# MQ_GPU_SHAPE=tiny runs it at a toy size; LLAMA_CPP_BIN=DIR takes llama.cpp's binaries from DIR.
# Logs and the markdown table go to $OUT (or bench/peer/cache/gpu/out). Files go to bench/peer/cache/gpu
# (MQ_GPU_WORK overrides), the GGUFs are kept for a later call on the same machine.
#
#   bash bench/gpu_all.sh                                # everything
#   bash bench/gpu_all.sh --only build-llamacpp,build-engine,gguf   # first call
#   bash bench/gpu_all.sh --only bench -- --profile      # second call, same (still warm) machine
#
# Carry: bench/peer/cache/carry (3.7 MB). The GPU machine needs nvcc, CMake, Python with torch, numpy,
# safetensors, tokenizers, sentencepiece, nanobind and scikit-build-core (the `gguf` wheel is carried).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
stages="build-llamacpp,build-engine,gguf,bench"
skip=""
bench_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --only) stages="$2"; shift 2 ;;
        --skip) skip="$2"; shift 2 ;;
        --) shift; bench_args=("$@"); break ;;
        *) echo "gpu_all.sh: unknown argument $1 (--only STAGES, --skip STAGES, -- BENCH_GPU_ARGS)" >&2; exit 1 ;;
    esac
done
want() { [[ ",$stages," == *",$1,"* && ",$skip," != *",$1,"* ]]; }
carry="$repo/bench/peer/cache/carry"
work="${MQ_GPU_WORK:-$repo/bench/peer/cache/gpu}"
out="${OUT:-$work/out}"
mkdir -p "$work" "$out"
jobs="$(nproc)"
py=python3
t0=$SECONDS
stamp() { echo "[gpu_all $((SECONDS - t0)) s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt" || true

# the gguf package, from the carried wheel when the machine lacks it
if ! $py -c "import gguf" 2>/dev/null; then
    $py -m pip install -q --no-index --no-deps --target "$work/site" "$carry"/wheels/gguf-*.whl
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
shape="${MQ_GPU_SHAPE:-7b}"  # "tiny": the same pipeline at a toy size (a check of the script itself)
shape_gguf() { echo "$work/llama2-$shape-$1.gguf"; }
pids=()
if want build-llamacpp; then
    stamp "building llama.cpp (CUDA sm_90, -j$jobs)"
    bash bench/peer/build_llamacpp.sh cuda "$jobs" >"$out/build-llamacpp.log" 2>&1 &
    pid_llama=$!
fi
if want build-engine; then
    stamp "building mergequant (CUDA sm_90a)"
    (MERGEQUANT_CUDA=ON CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90a CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
        $py -m pip install --no-build-isolation --no-deps . >"$out/build-engine.log" 2>&1) &
    pid_engine=$!
fi
if want gguf && [[ ! -f "$(shape_gguf f16)" ]]; then
    stamp "writing the F16 GGUF"
    # the writer needs numpy and gguf only (not mergequant, which is still being built)
    ($py bench/peer/write_gguf.py random "$(shape_gguf f16)" \
        --shape "$shape" --tokenizer "$carry/tokenizer-llama2" >"$out/gguf.log" 2>&1) &
    pid_gguf=$!
fi
status=0
wait_for() {  # wait_for PID NAME LOG
    if ! wait "$1"; then
        echo "gpu_all.sh: $2 failed; the end of $3:" >&2
        tail -n 40 "$3" >&2
        status=1
    fi
    stamp "$2 done"
}
[[ -n "${pid_llama:-}" ]] && wait_for "$pid_llama" "llama.cpp build" "$out/build-llamacpp.log"
[[ -n "${pid_gguf:-}" ]] && wait_for "$pid_gguf" "F16 GGUF" "$out/gguf.log"
if want gguf && [[ $status -eq 0 ]]; then
    q="${LLAMA_CPP_BIN:-$repo/bench/peer/cache/build-cuda/bin}/llama-quantize"
    for t in Q4_0 Q4_K_M; do
        dst="$(shape_gguf "$(echo "$t" | tr 'A-Z' 'a-z')")"
        [[ -f "$dst" ]] && continue
        ("$q" "$(shape_gguf f16)" "$dst.part" "$t" $((jobs / 2)) >>"$out/gguf.log" 2>&1 && mv "$dst.part" "$dst") &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait_for "$p" "llama-quantize" "$out/gguf.log"; done
    ls -l "$work"/*.gguf | tee -a "$out/gguf.log"
fi
[[ -n "${pid_engine:-}" ]] && wait_for "$pid_engine" "mergequant build" "$out/build-engine.log"
if [[ $status -ne 0 ]]; then
    exit $status
fi
if want bench; then
    stamp "benchmark"
    PYTHONUNBUFFERED=1 $py bench/bench_gpu.py --shape "$shape" --tokenizer "$carry/tokenizer-llama2" --gguf-dir "$work" \
        --workdir "$work" --md "$out/bench_gpu.md" --out "$out/bench_gpu.json" "${bench_args[@]}" 2>&1 \
        | tee "$out/bench_gpu.log"
    stamp "benchmark done"
fi
