// The ops that make int4 codes for the static W4A4 linears (docs/numerics.md, "Input slots"): RMSNorm and
// SwiGLU fused with the static quantization into a consumer's input slots, and the plain rounding of attention's
// output; and the slot expansion and code rounding they share with linear-w4a4.cpp.
#include "quantize.h"

#include "cpu-backend.h"
#include "cpu-simd.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace mq {

void cpu_expand_slots(const float * z, const int32_t * in_map, int64_t kp, int8_t * a) {
    cpu_kernels().expand_slots(z, in_map, kp, a);
}

void cpu_round_codes(const float * x, int64_t k, int64_t kp, int8_t * a) {
    for (int64_t i = 0; i < k; i++) {
        a[i] = (int8_t) cpu_round_clamp(x[i], -8, 7);
    }
    memset(a + k, 0, (size_t) (kp - k));
}

void cpu_codes_prepare(const int8_t * a, int64_t m, int64_t kp, CodesPrepared & out) {
    const int64_t h = kp / 2;
    for (int64_t t = 0; t < m; t++) {
        const int8_t * src = a + t * kp;
        int32_t sum = 0;
        for (int64_t i = 0; i < h; i++) {
            out.even[t * h + i] = src[2 * i];
            out.odd[t * h + i] = src[2 * i + 1];
            sum += src[2 * i] + src[2 * i + 1];
        }
        out.sum[t] = sum;
    }
}

namespace cpu {

void rmsnorm_quant(Backend & be, const float * x, const Linear & c, int32_t m, int32_t dim, float eps, int8_t * out) {
    const float * in_scale = c.in_scale->as<float>();
    const int32_t * in_map = c.in_map->as<int32_t>();
    cpu_of(be).run_rows(m, [&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(m, ith, nth, b, e);
        std::vector<float> z(dim);
        for (int64_t r = b; r < e; r++) {
            const float * xr = x + r * dim;
            // z_j = (x_j * r) * in_scale_j
            const float inv = rms_factor(xr, dim, eps);
            for (int32_t i = 0; i < dim; i++) {
                z[i] = (xr[i] * inv) * in_scale[i];
            }
            cpu_expand_slots(z.data(), in_map, c.kp, out + r * c.kp);
        }
    });
}

void quantize_codes(Backend & be, const float * x, int32_t m, int32_t k, const Linear & c, int8_t * out) {
    cpu_of(be).run_rows(m, [&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(m, ith, nth, b, e);
        for (int64_t t = b; t < e; t++) {
            cpu_round_codes(x + t * k, k, c.kp, out + t * c.kp);
        }
    });
}

void swiglu_quant(Backend & be, const float * gu, const Linear & c, int32_t m, int32_t n_ff, int8_t * out) {
    const int32_t * in_map = c.in_map->as<int32_t>();
    cpu_of(be).run_rows(m, [&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(m, ith, nth, b, e);
        std::vector<float> z(n_ff);
        for (int64_t t = b; t < e; t++) {
            const float * g = gu + t * 2 * n_ff;
            cpu_kernels().swiglu_row(g, g + n_ff, z.data(), n_ff);
            cpu_expand_slots(z.data(), in_map, c.kp, out + t * c.kp);
        }
    });
}

}  // namespace cpu

}  // namespace mq
