// RMSNorm, y = (x * r) * w with r = 1 / sqrt(mean(x²) + eps) (docs/numerics.md), one row per task.
#include "cpu-backend.h"
#include "cpu-simd.h"

namespace mq {

float rms_factor(const float * x, int32_t dim, float eps) {
    const double ss = cpu_dot_f64(x, x, dim);
    return (float) (1.0 / std::sqrt(ss / dim + (double) eps));
}

namespace cpu {

void rmsnorm(Backend & be, const float * x, const float * w, int32_t n_rows, int32_t dim, float eps, float * out) {
    cpu_of(be).run_rows(n_rows, [&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(n_rows, ith, nth, b, e);
        for (int64_t r = b; r < e; r++) {
            const float * xr = x + r * dim;
            float * o = out + r * dim;
            // y = (x * r) * w
            const float inv = rms_factor(xr, dim, eps);
            for (int32_t i = 0; i < dim; i++) {
                o[i] = xr[i] * inv * w[i];
            }
        }
    });
}

}  // namespace cpu

}  // namespace mq
