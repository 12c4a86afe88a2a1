// The f16 GEMV/GEMM of the CPU backend (scheme f16): AVX-512F or portable C++ by the instruction set this
// translation unit is compiled for (once per set, kernels.h).
#include "kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mq::MQ_CPU_ISA {

#if defined(__AVX512F__)
// The sum of the 16 lanes of v by one fixed tree: lane i + lane i+8, then i + i+4, then i + i+2, then 0 + 1.
// Every path of this file (GEMV, blocked GEMM, tails) ends a dot product with this tree or with hsum_16x16,
// which applies the same tree to 16 vectors at once, so a token's output does not depend on m, on the
// blocking or on the thread count.
static inline float hsum_16(__m512 v) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// hsum_16 of v[0..15] at once: lane 4q + j of the result is hsum_16(v[q + 4j]), bit for bit (each level below
// adds the same pairs of lanes as one level of hsum_16, two or four vectors per instruction)
static inline __m512 hsum_16x16(const __m512 * v) {
    __m512 l1[8], l2[4], l3[2];
    for (int j = 0; j < 8; j++) {  // quarters 0-1: v[2j]'s lanes i + i+8; quarters 2-3: v[2j+1]'s
        l1[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    for (int j = 0; j < 4; j++) {  // quarter q: v[4j + q]'s lanes i + i+4
        l2[j] = _mm512_add_ps(_mm512_shuffle_f32x4(l1[2 * j], l1[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(l1[2 * j], l1[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    }
    for (int j = 0; j < 2; j++) {  // quarter q: v[8j + q]'s lanes i + i+2 in lanes 0-1, v[8j + 4 + q]'s in 2-3
        l3[j] = _mm512_add_ps(_mm512_shuffle_ps(l2[2 * j], l2[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_ps(l2[2 * j], l2[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    return _mm512_add_ps(_mm512_shuffle_ps(l3[0], l3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(l3[0], l3[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

// decode (m = 1): weights converted in registers and streamed once; four rows in flight keep enough
// loads outstanding to approach the memory bandwidth. Each row's dot product: one 16-lane fp32 accumulator,
// fma over k in steps of 16, then hsum_16.
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
            const float s[4] = {hsum_16(a0), hsum_16(a1), hsum_16(a2), hsum_16(a3)};
            for (int j = 0; j < 4; j++) {
                y[r + j] = accumulate ? y[r + j] + s[j] : s[j];
            }
        }
        for (; r < n_end; r++) {
            const uint16_t * w0 = w + r * k;
            __m512 a0 = _mm512_setzero_ps();
            for (int64_t i = 0; i < k; i += 16) {
                a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (w0 + i))),
                                     _mm512_loadu_ps(x + i), a0);
            }
            const float s = hsum_16(a0);
            y[r] = accumulate ? y[r] + s : s;
        }
        return;
    }
#endif
    float wbuf[16];
    for (; r < n_end; r++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < k; i += 16) {
            const int64_t len = k - i < 16 ? k - i : 16;
            f16_to_f32(w + r * k + i, wbuf, len);
            for (int64_t j = 0; j < len; j++) {
                acc += wbuf[j] * x[i + j];
            }
        }
        y[r] = accumulate ? y[r] + acc : acc;
    }
}

#if defined(__AVX512F__)
// Prefill on AVX-512 (m >= 4, k % 16 == 0): rows [n_begin, n_end) in panels of P rows (a multiple of 4, at most
// 16, P·k fp32 within 32 KiB where k allows). A panel's fp16 rows are converted to fp32 once (vcvtph2ps) into a
// buffer that stays in L1 while every block of 4 tokens runs over it; the 4-token block of x (4·k fp32) stays in
// L1 across the panel's groups of 4 rows. The micro-kernel holds 4 rows x 4 tokens in 16 accumulators, each
// the GEMV's single 16-lane accumulator (fma over k in steps of 16), reduced by hsum_16x16 into one vector:
// quarter b holds token b's 4 rows, added to y with one 128-bit store.
static void gemm_f16_panels(const uint16_t * w, const float * x, float * y, int64_t m, int64_t n, int64_t k,
                            int64_t n_begin, int64_t n_end, bool accumulate) {
    const int64_t rows = (n_end - n_begin) / 4 * 4, m4 = m / 4 * 4;
    constexpr int64_t kBufFloats = 8192;  // 32 KiB
    int64_t panel = kBufFloats / k / 4 * 4;
    panel = panel < 4 ? 4 : panel > 16 ? 16 : panel;
    alignas(64) float stack_buf[kBufFloats];
    float * buf = panel * k <= kBufFloats ? stack_buf : new float[panel * k];  // (heap: k > 2048; loads unaligned)
    for (int64_t p0 = 0; p0 < rows; p0 += panel) {
        const int64_t pr = rows - p0 < panel ? rows - p0 : panel;
        const uint16_t * wp = w + (n_begin + p0) * k;
        for (int64_t i = 0; i < pr * k; i += 16) {
            _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (wp + i))));
        }
        // the next panel's fp16 rows are prefetched into L2 a slice per block of tokens, so that its conversion
        // does not wait for memory
        const char * next = (const char *) (wp + pr * k);
        const int64_t next_lines = p0 + pr < rows ? ((rows - p0 - pr < panel ? rows - p0 - pr : panel) * k * 2 + 63) / 64 : 0;
        const int64_t per_block = (next_lines + m4 / 4 - 1) / (m4 / 4);
        for (int64_t t = 0; t < m4; t += 4) {
            const float * x0 = x + t * k;
            for (int64_t l = t / 4 * per_block, le = l + per_block < next_lines ? l + per_block : next_lines; l < le; l++) {
                _mm_prefetch(next + l * 64, _MM_HINT_T1);
            }
            for (int64_t g = 0; g < pr; g += 4) {
                const float * b0 = buf + g * k;
                __m512 acc[16];
                for (int j = 0; j < 16; j++) {
                    acc[j] = _mm512_setzero_ps();
                }
                for (int64_t i = 0; i < k; i += 16) {
                    const __m512 w0 = _mm512_loadu_ps(b0 + i), w1 = _mm512_loadu_ps(b0 + k + i),
                                 w2 = _mm512_loadu_ps(b0 + 2 * k + i), w3 = _mm512_loadu_ps(b0 + 3 * k + i);
                    for (int b = 0; b < 4; b++) {  // acc[4a + b]: row a, token b
                        const __m512 xv = _mm512_loadu_ps(x0 + b * k + i);
                        acc[b] = _mm512_fmadd_ps(w0, xv, acc[b]);
                        acc[4 + b] = _mm512_fmadd_ps(w1, xv, acc[4 + b]);
                        acc[8 + b] = _mm512_fmadd_ps(w2, xv, acc[8 + b]);
                        acc[12 + b] = _mm512_fmadd_ps(w3, xv, acc[12 + b]);
                    }
                }
                // lane 4q + j = hsum_16(acc[q + 4j]) = row j, token q
                const __m512 s = hsum_16x16(acc);
                const int64_t r = n_begin + p0 + g;
                float * yr = y + t * n + r;
                const __m128 s0 = _mm512_castps512_ps128(s), s1 = _mm512_extractf32x4_ps(s, 1),
                             s2 = _mm512_extractf32x4_ps(s, 2), s3 = _mm512_extractf32x4_ps(s, 3);
                if (accumulate) {
                    _mm_storeu_ps(yr, _mm_add_ps(_mm_loadu_ps(yr), s0));
                    _mm_storeu_ps(yr + n, _mm_add_ps(_mm_loadu_ps(yr + n), s1));
                    _mm_storeu_ps(yr + 2 * n, _mm_add_ps(_mm_loadu_ps(yr + 2 * n), s2));
                    _mm_storeu_ps(yr + 3 * n, _mm_add_ps(_mm_loadu_ps(yr + 3 * n), s3));
                } else {
                    _mm_storeu_ps(yr, s0);
                    _mm_storeu_ps(yr + n, s1);
                    _mm_storeu_ps(yr + 2 * n, s2);
                    _mm_storeu_ps(yr + 3 * n, s3);
                }
            }
        }
    }
    if (buf != stack_buf) {
        delete[] buf;
    }
    // the tokens past the last multiple of 4 for these rows, then the rows past the last multiple of 4
    for (int64_t t = m4; t < m; t++) {
        gemv_f16(w, x + t * k, y + t * n, k, n_begin, n_begin + rows, accumulate);
    }
    for (int64_t t = 0; t < m; t++) {
        gemv_f16(w, x + t * k, y + t * n, k, n_begin + rows, n_end, accumulate);
    }
}
#endif

void gemm_f16(const uint16_t * w, const float * x, float * y, int64_t m, int64_t n, int64_t k, int64_t n_begin,
                  int64_t n_end, bool accumulate) {
    if (m == 1) {
        gemv_f16(w, x, y, k, n_begin, n_end, accumulate);
        return;
    }
#if defined(__AVX512F__)
    if (k % 16 == 0) {
        if (m < 4) {
            for (int64_t t = 0; t < m; t++) {
                gemv_f16(w, x + t * k, y + t * n, k, n_begin, n_end, accumulate);
            }
        } else {
            gemm_f16_panels(w, x, y, m, n, k, n_begin, n_end, accumulate);
        }
        return;
    }
#endif
    float wrow[8192 + 16];
    float * wbuf = k <= 8192 ? wrow : new float[k];
    for (int64_t r = n_begin; r < n_end; r++) {
        f16_to_f32(w + r * k, wbuf, k);
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
            const float s = dot_f32(wbuf, x + t * k, k);
            y[t * n + r] = accumulate ? y[t * n + r] + s : s;
        }
    }
    if (wbuf != wrow) {
        delete[] wbuf;
    }
}

}  // namespace mq::MQ_CPU_ISA
