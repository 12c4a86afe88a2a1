// Integer kernels for the 4-bit schemes, compiled once per instruction set (kernels.h). The int4 GEMM uses
// AVX-512 VNNI (vpdpbusd: u8 x s8 -> s32) when this translation unit targets it: each packed weight byte is
// XORed with 0x88, which turns both nibbles into w + 8 in [0, 15] (unsigned), so Σ (w + 8)·a = Σ w·a + 8·Σ a,
// and the kernel subtracts 8·Σ a per token. The low nibbles hold even k and the high nibbles odd k, so the
// activations are split into even and odd slots once per call (cpu_codes_prepare) and every byte lane lines up
// without shuffles.
#include "kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mq::MQ_CPU_ISA {

// one row, one token: Σ_k q[k]·a[k] over the packed row (kp/2 bytes)
static int32_t dot_w4a4_scalar(const uint8_t * q, const int8_t * even, const int8_t * odd, int64_t h) {
    int32_t acc = 0;
    for (int64_t i = 0; i < h; i++) {
        const int32_t lo = q[i] & 0xF, hi = q[i] >> 4;
        acc += (lo - 16 * (lo >= 8)) * even[i] + (hi - 16 * (hi >= 8)) * odd[i];
    }
    return acc;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// acc for four rows [r, r + 4) and TB tokens [t0, t0 + TB): each 64-byte step of the four packed rows is unpacked
// once (xor, mask, shift: 5 ops a row) and feeds 2·TB vpdpbusd a row, so prefill spends its time in the dot
// products; the four rows (4 x kp/2 bytes) stay in L1 across the token blocks
template <int TB>
static void rows4_tokens(const uint8_t * q0, int64_t h, const CodesPrepared & a, int64_t t0, int64_t n, int64_t r,
                         int32_t * acc) {
    const __m512i x88 = _mm512_set1_epi8((char) 0x88), x0f = _mm512_set1_epi8(0x0F);
    const __m256i y88 = _mm256_set1_epi8((char) 0x88), y0f = _mm256_set1_epi8(0x0F);
    const int64_t h64 = h / 64 * 64;
    __m512i s[4][TB];
    for (int j = 0; j < 4; j++) {
        for (int b = 0; b < TB; b++) {
            s[j][b] = _mm512_setzero_si512();
        }
    }
    for (int64_t i = 0; i < h64; i += 64) {
        __m512i lo[4], hi[4];
        for (int j = 0; j < 4; j++) {
            const __m512i q = _mm512_xor_si512(_mm512_loadu_si512(q0 + j * h + i), x88);
            lo[j] = _mm512_and_si512(q, x0f);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(q, 4), x0f);
        }
        for (int b = 0; b < TB; b++) {
            const __m512i e = _mm512_loadu_si512(a.even + (t0 + b) * h + i);
            const __m512i o = _mm512_loadu_si512(a.odd + (t0 + b) * h + i);
            for (int j = 0; j < 4; j++) {
                s[j][b] = _mm512_dpbusd_epi32(s[j][b], lo[j], e);
                s[j][b] = _mm512_dpbusd_epi32(s[j][b], hi[j], o);
            }
        }
    }
    for (int b = 0; b < TB; b++) {
        const int64_t t = t0 + b;
        int32_t tail[4] = {0, 0, 0, 0};
        if (h64 < h) {  // the last 32 bytes
            const __m256i e = _mm256_loadu_si256((const __m256i *) (a.even + t * h + h64));
            const __m256i o = _mm256_loadu_si256((const __m256i *) (a.odd + t * h + h64));
            for (int j = 0; j < 4; j++) {
                const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *) (q0 + j * h + h64)), y88);
                __m256i v = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(q, y0f), e);
                v = _mm256_dpbusd_epi32(v, _mm256_and_si256(_mm256_srli_epi16(q, 4), y0f), o);
                __m128i w = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                w = _mm_add_epi32(w, _mm_shuffle_epi32(w, 0x4E));
                w = _mm_add_epi32(w, _mm_shuffle_epi32(w, 0xB1));
                tail[j] = _mm_cvtsi128_si32(w);
            }
        }
        for (int j = 0; j < 4; j++) {
            acc[t * n + r + j] = _mm512_reduce_add_epi32(s[j][b]) + tail[j] - 8 * a.sum[t];
        }
    }
}
#endif

void gemm_w4a4(const uint8_t * qw, const CodesPrepared & a, int64_t m, int64_t kp, int64_t n, int64_t r0,
                   int64_t r1, int32_t * acc) {
    const int64_t h = kp / 2;  // bytes per packed row; a multiple of 32
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        int64_t t = 0;
        for (; t + 4 <= m; t += 4) {
            rows4_tokens<4>(qw + r * h, h, a, t, n, r, acc);
        }
        for (; t < m; t++) {
            rows4_tokens<1>(qw + r * h, h, a, t, n, r, acc);
        }
    }
    for (; r < r1; r++) {
        for (int64_t t = 0; t < m; t++) {
            acc[t * n + r] = dot_w4a4_scalar(qw + r * h, a.even + t * h, a.odd + t * h, h);
        }
    }
#else
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < m; t++) {
            acc[t * n + r] = dot_w4a4_scalar(qw + r * h, a.even + t * h, a.odd + t * h, h);
        }
    }
#endif
}

void gemm_w4a16g(const uint8_t * qw, const uint16_t * scale, const float * x, float * y, int64_t m, int64_t n,
                     int64_t k, int64_t group, int64_t r0, int64_t r1, bool accumulate) {
    // w[r, k] = q[r, k] · s[r, k / group]: dequantize one row to fp32 once, then dot with every token
    // plain new[]: no std template instantiated here (see kernels.h)
    const int64_t n_groups = k / group;
    float * w = new float[k + n_groups];
    float * s = w + k;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t * q = qw + r * (k / 2);
        f16_to_f32(scale + r * n_groups, s, n_groups);
        for (int64_t i = 0; i < k / 2; i++) {
            const int32_t lo = q[i] & 0xF, hi = q[i] >> 4;
            const int64_t g = (2 * i) / group;
            w[2 * i] = (float) (lo - 16 * (lo >= 8)) * s[g];
            w[2 * i + 1] = (float) (hi - 16 * (hi >= 8)) * s[g];
        }
        for (int64_t t = 0; t < m; t++) {
            const float v = dot_f32(w, x + t * k, k);
            y[t * n + r] = accumulate ? y[t * n + r] + v : v;
        }
    }
    delete[] w;
}

}  // namespace mq::MQ_CPU_ISA
