// SIMD inner loops: AVX-512F, AVX2+F16C+FMA, or portable C++, chosen at compile time.
#include "cpu-ops.h"

#include <cmath>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace mq {

static inline float f16_to_f32_scalar(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: renormalize
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) {
                mant <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void cpu_f16_to_f32(const uint16_t * x, float * y, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (x + i))));
    }
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i))));
    }
#endif
    for (; i < n; i++) {
        y[i] = f16_to_f32_scalar(x[i]);
    }
}

static inline uint16_t f32_to_f16_scalar(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t absx = x & 0x7FFFFFFF;
    if (absx >= 0x7F800000) {  // inf or nan
        return (uint16_t) (sign | 0x7C00 | (absx > 0x7F800000 ? 0x200 : 0));
    }
    if (absx >= 0x477FF000) {  // rounds to >= 65520: overflow to inf
        return (uint16_t) (sign | 0x7C00);
    }
    if (absx < 0x38800000) {  // subnormal or zero in fp16: scale into an integer, round half to even
        float a;
        memcpy(&a, &absx, 4);
        return (uint16_t) (sign | (uint16_t) std::nearbyint(a * 16777216.0f));
    }
    // normal: drop 13 mantissa bits with round-half-to-even
    uint32_t r = absx - 0x38000000;
    r += 0x0FFF + ((r >> 13) & 1);
    return (uint16_t) (sign | (r >> 13));
}

void cpu_f32_to_f16(const float * x, uint16_t * y, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_si256((__m256i *) (y + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    }
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128((__m128i *) (y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    }
#endif
    for (; i < n; i++) {
        y[i] = f32_to_f16_scalar(x[i]);
    }
}

void cpu_i8_to_f32_scaled(const int8_t * x, const float * s, float * y, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (x + i))));
        _mm512_storeu_ps(y + i, _mm512_mul_ps(f, _mm512_loadu_ps(s + i)));
    }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    for (; i + 8 <= n; i += 8) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (x + i))));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(f, _mm256_loadu_ps(s + i)));
    }
#endif
    for (; i < n; i++) {
        y[i] = (float) x[i] * s[i];
    }
}

void cpu_f32_to_i8_scaled(const float * x, const float * inv, int8_t * y, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(inv + i));
        const __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        // clamp, and NaN (unordered) to 0 as the scalar path and CUDA's __float2int_rn
        const __m512 c =
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), _mm512_min_ps(_mm512_max_ps(r, lo), hi));
        _mm_storeu_si128((__m128i *) (y + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)));
    }
#endif
    for (; i < n; i++) {
        const float r = std::nearbyint(x[i] * inv[i]);  // default rounding mode: half to even
        y[i] = (int8_t) (r != r ? 0.0f : r < -127.0f ? -127.0f : r > 127.0f ? 127.0f : r);
    }
}

float cpu_dot_f32(const float * a, const float * b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    }
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    }
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    s = _mm_cvtss_f32(lo);
#endif
    for (; i < n; i++) {
        s += a[i] * b[i];
    }
    return s;
}

double cpu_dot_f64(const float * a, const float * b, int64_t n) {
    int64_t i = 0;
    double s = 0.0;
#if defined(__AVX512F__)
    __m512d acc = _mm512_setzero_pd();
    for (; i + 8 <= n; i += 8) {
        acc = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + i)), _mm512_cvtps_pd(_mm256_loadu_ps(b + i)), acc);
    }
    s = _mm512_reduce_add_pd(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256d acc = _mm256_setzero_pd();
    for (; i + 4 <= n; i += 4) {
        acc = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i)), _mm256_cvtps_pd(_mm_loadu_ps(b + i)), acc);
    }
    __m128d lo = _mm_add_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd(acc, 1));
    s = _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
#endif
    for (; i < n; i++) {
        s += (double) a[i] * b[i];
    }
    return s;
}

void cpu_axpy_f64(double a, const float * x, double * y, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512d va = _mm512_set1_pd(a);
    for (; i + 8 <= n; i += 8) {
        _mm512_storeu_pd(y + i, _mm512_fmadd_pd(va, _mm512_cvtps_pd(_mm256_loadu_ps(x + i)), _mm512_loadu_pd(y + i)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256d va = _mm256_set1_pd(a);
    for (; i + 4 <= n; i += 4) {
        _mm256_storeu_pd(y + i, _mm256_fmadd_pd(va, _mm256_cvtps_pd(_mm_loadu_ps(x + i)), _mm256_loadu_pd(y + i)));
    }
#endif
    for (; i < n; i++) {
        y[i] += a * x[i];
    }
}

// Tokens are processed four at a time so each weight row, converted to fp32 once, feeds four dot
// products; decode (m = 1) streams every weight byte exactly once.
// decode (m = 1): weights converted in registers and streamed once; four rows in flight keep enough
// loads outstanding to approach the memory bandwidth
static void gemv_f16(const uint16_t * w, const float * x, float * y, int64_t k, int64_t n_begin, int64_t n_end,
                     bool accumulate) {
    int64_t r = n_begin;
#if defined(__AVX512F__)
    if (k % 16 == 0) {
        for (; r + 4 <= n_end; r += 4) {
            const uint16_t * w0 = w + r * k;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
                   a3 = _mm512_setzero_ps();
            // prefetch the group after next (rows are contiguous: 128 bytes of it per step)
            const char * pf = (const char *) (w0 + 8 * k);
            for (int64_t i = 0; i < k; i += 16) {
                _mm_prefetch(pf + i * 8, _MM_HINT_T0);
                _mm_prefetch(pf + i * 8 + 64, _MM_HINT_T0);
                const __m512 xv = _mm512_loadu_ps(x + i);
                a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (w0 + i))), xv, a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (w0 + k + i))), xv, a1);
                a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (w0 + 2 * k + i))), xv, a2);
                a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (w0 + 3 * k + i))), xv, a3);
            }
            const float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                _mm512_reduce_add_ps(a3)};
            for (int j = 0; j < 4; j++) {
                y[r + j] = accumulate ? y[r + j] + s[j] : s[j];
            }
        }
    }
#endif
    float wbuf[16];
    for (; r < n_end; r++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < k; i += 16) {
            const int64_t len = k - i < 16 ? k - i : 16;
            cpu_f16_to_f32(w + r * k + i, wbuf, len);
            for (int64_t j = 0; j < len; j++) {
                acc += wbuf[j] * x[i + j];
            }
        }
        y[r] = accumulate ? y[r] + acc : acc;
    }
}

void cpu_gemm_f16(const uint16_t * w, const float * x, float * y, int64_t m, int64_t n, int64_t k, int64_t n_begin,
                  int64_t n_end, bool accumulate) {
    if (m == 1) {
        gemv_f16(w, x, y, k, n_begin, n_end, accumulate);
        return;
    }
#if defined(__AVX512F__)
    // prefill: 4 weight rows x 4 tokens in 16 accumulators; the 4 rows stay in L1 across the token loop
    if (k % 16 == 0) {
        const int64_t n4 = n_begin + (n_end - n_begin) / 4 * 4, m4 = m / 4 * 4;
        for (int64_t r = n_begin; r < n4; r += 4) {
            const uint16_t * w0 = w + r * k;
            for (int64_t t = 0; t < m4; t += 4) {
                __m512 acc[4][4];
                for (int a = 0; a < 4; a++) {
                    for (int b = 0; b < 4; b++) {
                        acc[a][b] = _mm512_setzero_ps();
                    }
                }
                const float * x0 = x + t * k;
                for (int64_t i = 0; i < k; i += 16) {
                    __m512 wv[4];
                    for (int a = 0; a < 4; a++) {
                        wv[a] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (w0 + a * k + i)));
                    }
                    for (int b = 0; b < 4; b++) {
                        const __m512 xv = _mm512_loadu_ps(x0 + b * k + i);
                        for (int a = 0; a < 4; a++) {
                            acc[a][b] = _mm512_fmadd_ps(wv[a], xv, acc[a][b]);
                        }
                    }
                }
                for (int b = 0; b < 4; b++) {
                    float * yr = y + (t + b) * n + r;
                    for (int a = 0; a < 4; a++) {
                        const float v = _mm512_reduce_add_ps(acc[a][b]);
                        yr[a] = accumulate ? yr[a] + v : v;
                    }
                }
            }
        }
        // the tokens past the last multiple of 4 for these rows, then the rows past the last multiple of 4
        if (m4 < m) {
            for (int64_t t = m4; t < m; t++) {
                gemv_f16(w, x + t * k, y + t * n, k, n_begin, n4, accumulate);
            }
        }
        for (int64_t t = 0; t < m; t++) {
            gemv_f16(w, x + t * k, y + t * n, k, n4, n_end, accumulate);
        }
        return;
    }
#endif
    float wrow[8192 + 16];
    float * wbuf = k <= 8192 ? wrow : new float[k];
    for (int64_t r = n_begin; r < n_end; r++) {
        cpu_f16_to_f32(w + r * k, wbuf, k);
        int64_t t = 0;
        for (; t + 4 <= m; t += 4) {
            const float * x0 = x + (t + 0) * k;
            const float * x1 = x + (t + 1) * k;
            const float * x2 = x + (t + 2) * k;
            const float * x3 = x + (t + 3) * k;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            int64_t i = 0;
#if defined(__AVX512F__)
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
                   a3 = _mm512_setzero_ps();
            for (; i + 16 <= k; i += 16) {
                const __m512 wv = _mm512_loadu_ps(wbuf + i);
                a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + i), a0);
                a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x1 + i), a1);
                a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x2 + i), a2);
                a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x3 + i), a3);
            }
            s0 = _mm512_reduce_add_ps(a0);
            s1 = _mm512_reduce_add_ps(a1);
            s2 = _mm512_reduce_add_ps(a2);
            s3 = _mm512_reduce_add_ps(a3);
#endif
            for (; i < k; i++) {
                s0 += wbuf[i] * x0[i];
                s1 += wbuf[i] * x1[i];
                s2 += wbuf[i] * x2[i];
                s3 += wbuf[i] * x3[i];
            }
            float * yr = y + t * n + r;
            if (accumulate) {
                yr[0] += s0, yr[n] += s1, yr[2 * n] += s2, yr[3 * n] += s3;
            } else {
                yr[0] = s0, yr[n] = s1, yr[2 * n] = s2, yr[3 * n] = s3;
            }
        }
        for (; t < m; t++) {
            const float s = cpu_dot_f32(wbuf, x + t * k, k);
            y[t * n + r] = accumulate ? y[t * n + r] + s : s;
        }
    }
    if (wbuf != wrow) {
        delete[] wbuf;
    }
}

}  // namespace mq
