// Scheme f16 on the CPU: the input rounded to fp16 (docs/numerics.md), fp16 weights read straight from the
// mapping, fp32 accumulation; rows split across the threads in blocks (kernels/gemm-f16.cpp has the GEMV for one
// token and the GEMM for several).
#include "cpu-backend.h"
#include "cpu-simd.h"

#include <vector>

namespace mq::cpu {

const float * round_to_f16(const float * x, int64_t total) {
    // x → fp16 → fp32, once for all threads; the buffers are kept for the next call of this thread
    thread_local std::vector<uint16_t> h;
    thread_local std::vector<float> xr;
    if ((int64_t) h.size() < total) h.resize((size_t) total), xr.resize((size_t) total);
    cpu_f32_to_f16(x, h.data(), total);
    cpu_f16_to_f32(h.data(), xr.data(), total);
    return xr.data();
}

static void run_f16(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    const int64_t n = lin.n, k = lin.k;
    const uint16_t * w = lin.tensors[0]->as<uint16_t>();
    const float * xh = round_to_f16(x, (int64_t) m * k);
    cpu_of(be).run_row_blocks(n, [&](int64_t r0, int64_t r1) { cpu_gemm_f16(w, xh, y, m, n, k, r0, r1, accumulate); });
}

const LinearKernels linear_f16 = {"f16", 0, 0, nullptr, nullptr, run_f16, nullptr, nullptr};

}  // namespace mq::cpu
