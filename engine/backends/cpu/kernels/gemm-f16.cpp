// The f16 GEMV/GEMM of the CPU backend (scheme f16): AVX-512F or portable C++ by the instruction set this
// translation unit is compiled for (once per set, kernels.h).
#include "kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mq::MQ_CPU_ISA {

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
            f16_to_f32(w + r * k + i, wbuf, len);
            for (int64_t j = 0; j < len; j++) {
                acc += wbuf[j] * x[i + j];
            }
        }
        y[r] = accumulate ? y[r] + acc : acc;
    }
}

void gemm_f16(const uint16_t * w, const float * x, float * y, int64_t m, int64_t n, int64_t k, int64_t n_begin,
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
