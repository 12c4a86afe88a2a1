// SwiGLU of one row, out[j] = f64(g[j] / (1 + exp(-g[j])) · u[j]) (docs/numerics.md, "SwiGLU"): eight channels at a
// time in float64 on AVX-512 (exp-f64.h), one at a time elsewhere. The two differ only where their exp differs in
// the last bits of a double, which the contract allows.
#include "kernels.h"

#include <cmath>

#if defined(__AVX512F__)
#include "exp-f64.h"
#endif

namespace mq::MQ_CPU_ISA {

void swiglu_row(const float * g, const float * u, float * out, int64_t n) {
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512d one = _mm512_set1_pd(1.0);
    for (; j + 8 <= n; j += 8) {
        const __m512d gd = _mm512_cvtps_pd(_mm256_loadu_ps(g + j));
        const __m512d e = exp_f64(_mm512_sub_pd(_mm512_setzero_pd(), gd));
        const __m512d s = _mm512_div_pd(gd, _mm512_add_pd(one, e));
        _mm256_storeu_ps(out + j, _mm512_cvtpd_ps(_mm512_mul_pd(s, _mm512_cvtps_pd(_mm256_loadu_ps(u + j)))));
    }
#endif
    for (; j < n; j++) {
        const double gd = g[j];
        out[j] = (float) (gd / (1.0 + std::exp(-gd)) * (double) u[j]);
    }
}

}  // namespace mq::MQ_CPU_ISA
