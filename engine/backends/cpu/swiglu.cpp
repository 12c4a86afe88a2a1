// SwiGLU over fused [gate | up] rows: out_j = silu(g_j) * u_j in float64 (docs/numerics.md), a row per task
// across the threads, each row by the kernel of the CPU's instruction set (kernels/swiglu.cpp).
#include "cpu-backend.h"
#include "cpu-simd.h"

namespace mq::cpu {

void swiglu(Backend & be, const float * gu, int32_t m, int32_t n_ff, float * out) {
    cpu_of(be).run_rows(m, [&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(m, ith, nth, b, e);
        for (int64_t r = b; r < e; r++) {
            const float * g = gu + r * 2 * n_ff;
            cpu_kernels().swiglu_row(g, g + n_ff, out + r * n_ff, n_ff);
        }
    });
}

}  // namespace mq::cpu
