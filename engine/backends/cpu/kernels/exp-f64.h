// e^x in float64 on AVX-512 for the kernels that need it (attention's softmax, SwiGLU in the int4 GEMM's epilogue).
// Included only by translation units that target AVX-512; static, so every one keeps its own copy (kernels.h).
#pragma once

#include <immintrin.h>

// e^x in float64: x = n·ln2 + r with |r| ≤ ln2/2 (ln2 in two parts: n·LN2_HI is exact for |n| < 2^20), e^r by its
// Taylor series to degree 13 (remainder below 5e-18), times 2^n by vscalefpd (which also gives the subnormals and 0
// far below, and +inf above e^709.78). Error a few ulp; NaN stays NaN.
static inline __m512d exp_f64(__m512d x) {
    const double LN2_HI = 6.93147180369123816490e-01, LN2_LO = 1.90821492927058770002e-10;
    const double LOG2E = 1.44269504088896338700e+00;
    x = _mm512_max_pd(_mm512_set1_pd(-746.0), x);  // e^-746 rounds to 0; max(c, NaN) is NaN
    x = _mm512_min_pd(_mm512_set1_pd(710.0), x);   // e^710 overflows to +inf; min(c, NaN) is NaN
    const __m512d n =
        _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_HI), x);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_LO), r);
    // 1/k! for k = 13 .. 0, Horner
    static const double inv_fact[14] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                        1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
                                        1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         0.5,
                                        1.0,                1.0};
    __m512d p = _mm512_set1_pd(inv_fact[0]);
    for (int i = 1; i < 14; i++) {
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(inv_fact[i]));
    }
    return _mm512_scalef_pd(p, n);
}
