// Conversions, dot products and axpy of the CPU backend: AVX-512F, AVX2+F16C+FMA or portable C++ by the
// instruction set this translation unit is compiled for (once per set, kernels.h).
#include "kernels.h"

#include <cmath>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace mq::MQ_CPU_ISA {

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

void f16_to_f32(const uint16_t * x, float * y, int64_t n) {
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

void f32_to_f16(const float * x, uint16_t * y, int64_t n) {
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

void i8_to_f32_scaled(const int8_t * x, const float * s, float * y, int64_t n) {
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

void f32_to_i8_scaled(const float * x, const float * inv, int8_t * y, int64_t n) {
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

float dot_f32(const float * a, const float * b, int64_t n) {
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

double dot_f64(const float * a, const float * b, int64_t n) {
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

void axpy_f64(double a, const float * x, double * y, int64_t n) {
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

}  // namespace mq::MQ_CPU_ISA
