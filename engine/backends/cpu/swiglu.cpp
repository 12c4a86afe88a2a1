// SwiGLU over fused [gate | up] rows: out_j = silu(g_j) * u_j (swiglu_value, cpu-backend.h).
#include "cpu-backend.h"

namespace mq::cpu {

void swiglu(Backend &, const float * gu, int32_t m, int32_t n_ff, float * out) {
    for (int32_t r = 0; r < m; r++) {
        const float * g = gu + (size_t) r * 2 * n_ff;
        const float * u = g + n_ff;
        float * o = out + (size_t) r * n_ff;
        for (int32_t j = 0; j < n_ff; j++) {
            o[j] = swiglu_value(g[j], u[j]);
        }
    }
}

}  // namespace mq::cpu
