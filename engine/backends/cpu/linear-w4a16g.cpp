// Scheme w4a16g on the CPU: int4 weights with fp16 group scales, dequantized a row at a time and dotted with
// the activations rounded to fp16 (docs/numerics.md; kernels/gemm-int4.cpp).
#include "cpu-backend.h"
#include "cpu-simd.h"

namespace mq::cpu {

static void run_w4a16g(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    const int64_t n = lin.n, k = lin.k;
    const float * xh = round_to_f16(x, (int64_t) m * k);
    cpu_of(be).run_row_blocks(n, [&](int64_t r0, int64_t r1) {
        cpu_gemm_w4a16g(lin.qweight->data, lin.scale->as<uint16_t>(), xh, y, m, n, k, lin.group, r0, r1, accumulate);
    });
}

const LinearKernels linear_w4a16g = {"w4a16g", 0, 0, nullptr, nullptr, run_w4a16g, nullptr, nullptr};

}  // namespace mq::cpu
