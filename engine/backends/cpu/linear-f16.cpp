// Scheme f16 on the CPU: fp16 weights read straight from the mapping, fp32 accumulation; rows split across the
// threads in blocks (kernels/gemm-f16.cpp has the GEMV for one token and the GEMM for several).
#include "cpu-backend.h"
#include "cpu-simd.h"

namespace mq::cpu {

static void run_f16(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    const int64_t n = lin.n, k = lin.k;
    const uint16_t * w = lin.tensors[0]->as<uint16_t>();
    cpu_of(be).run_row_blocks(n, [&](int64_t r0, int64_t r1) { cpu_gemm_f16(w, x, y, m, n, k, r0, r1, accumulate); });
}

const LinearKernels linear_f16 = {"f16", 0, 0, nullptr, nullptr, run_f16, nullptr, nullptr};

}  // namespace mq::cpu
