// Attention of one query token over one kv head's cache rows, float64 throughout (docs/numerics.md).
//
// With AVX-512 the query heads of a group are computed together: each cache row is loaded and widened to
// float64 once and used by every head, the p·v accumulators stay in registers (G heads × hd/8 vectors), and
// exp runs on 8 scores at a time. Any summation order and an exp accurate to a few ulp of a double give the
// same fp32 result except with probability about 2⁻²⁹ per value (docs/numerics.md, the f64 rule). Other
// shapes and instruction sets take the per-head loop below. Compiled once per instruction set (kernels.h).
#include "kernels.h"

#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>

#include "exp-f64.h"
#endif

namespace mq::MQ_CPU_ISA {

// row j of a cache as fp32 (fp16 widened, or int8 codes times their steps)
static void load_row_f32(const void * cache, const float * steps, bool i8, int64_t off, int32_t hd, float * dst) {
    if (i8) {
        i8_to_f32_scaled((const int8_t *) cache + off, steps, dst, hd);
    } else {
        f16_to_f32((const uint16_t *) cache + off, dst, hd);
    }
}

// one head at a time: any instruction set, any head size
static void heads_generic(const float * q, int32_t g, int32_t hd, const KvRows & kv, int32_t n_kv, float * out) {
    // plain new[]: no std template instantiated here (kernels.h)
    double * scores = new double[(size_t) n_kv + hd];
    double * acc = scores + n_kv;
    float * row = new float[hd];
    for (int32_t h = 0; h < g; h++) {
        const float * qh = q + (size_t) h * hd;
        double mx = -INFINITY;
        for (int32_t j = 0; j < n_kv; j++) {
            load_row_f32(kv.k, kv.k_step, kv.i8, j * kv.stride, hd, row);
            scores[j] = dot_f64(qh, row, hd);
            mx = scores[j] > mx ? scores[j] : mx;
        }
        double sum = 0.0;
        for (int32_t i = 0; i < hd; i++) {
            acc[i] = 0.0;
        }
        for (int32_t j = 0; j < n_kv; j++) {
            const double p = std::exp(scores[j] - mx);
            sum += p;
            load_row_f32(kv.v, kv.v_step, kv.i8, j * kv.stride, hd, row);
            axpy_f64(p, row, acc, hd);
        }
        for (int32_t i = 0; i < hd; i++) {
            out[(size_t) h * hd + i] = (float) (acc[i] / sum);
        }
    }
    delete[] scores;
    delete[] row;
}

#if defined(__AVX512F__)

// chunk c (8 values) of row j, widened to float64
struct RowsF16 {
    const uint16_t * k;
    const uint16_t * v;
    int64_t stride;
    static __m512d load(const uint16_t * p) {
        return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p)));
    }
    __m512d key(int64_t j, int c) const { return load(k + j * stride + 8 * c); }
    __m512d value(int64_t j, int c) const { return load(v + j * stride + 8 * c); }
};

struct RowsI8 {
    const int8_t * k;
    const int8_t * v;
    const float * k_step;
    const float * v_step;
    int64_t stride;
    // float(code) · step in fp32 (one multiply, as the contract reads the int8 cache), then widened
    static __m512d load(const int8_t * p, const float * step) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) p)));
        return _mm512_cvtps_pd(_mm256_mul_ps(f, _mm256_loadu_ps(step)));
    }
    __m512d key(int64_t j, int c) const { return load(k + j * stride + 8 * c, k_step + 8 * c); }
    __m512d value(int64_t j, int c) const { return load(v + j * stride + 8 * c, v_step + 8 * c); }
};

// the lane sums of v[0 .. 8) as one vector: r[u] = Σ_i v[u][i] (pairs, then 128-bit halves, then 256-bit halves)
static inline __m512d sum8(const __m512d * v) {
    __m512d a[4];
    for (int i = 0; i < 4; i++) {
        a[i] = _mm512_add_pd(_mm512_unpacklo_pd(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_pd(v[2 * i], v[2 * i + 1]));
    }
    __m512d b[2];
    for (int i = 0; i < 2; i++) {
        b[i] = _mm512_add_pd(_mm512_shuffle_f64x2(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f64x2(a[2 * i], a[2 * i + 1], 0xDD));
    }
    return _mm512_add_pd(_mm512_shuffle_f64x2(b[0], b[1], 0x88), _mm512_shuffle_f64x2(b[0], b[1], 0xDD));
}

// G heads of hd = 8·D8 together; G·D8 ≤ 24 keeps the accumulators in registers. s: scratch [G, n_kv].
template <int G, int D8, class Rows>
static void heads_avx512(const float * q, const Rows & rows, int32_t n_kv, double * s, float * out) {
    constexpr int HD = 8 * D8;
    alignas(64) double qd[G * HD];
    for (int i = 0; i < G * HD; i++) {
        qd[i] = q[i];
    }
    // scores s_j = Σ_d q[d]·k_j[d]
    double mx[G];
    for (int h = 0; h < G; h++) {
        mx[h] = -INFINITY;
    }
    for (int32_t j = 0; j < n_kv; j++) {
        __m512d a[G];
        for (int h = 0; h < G; h++) {
            a[h] = _mm512_setzero_pd();
        }
        for (int c = 0; c < D8; c++) {
            const __m512d kc = rows.key(j, c);
            for (int h = 0; h < G; h++) {
                a[h] = _mm512_fmadd_pd(_mm512_load_pd(qd + h * HD + 8 * c), kc, a[h]);
            }
        }
        for (int h = 0; h < G; h++) {
            const double v = _mm512_reduce_add_pd(a[h]);
            s[(size_t) h * n_kv + j] = v;
            mx[h] = v > mx[h] ? v : mx[h];
        }
    }
    // p_j = exp(s_j - max) in place, and Σ p
    double sum[G];
    for (int h = 0; h < G; h++) {
        double * sh = s + (size_t) h * n_kv;
        const __m512d m = _mm512_set1_pd(mx[h]);
        __m512d acc = _mm512_setzero_pd();
        for (int32_t j = 0; j < n_kv; j += 8) {
            const __mmask8 live = n_kv - j >= 8 ? (__mmask8) 0xFF : (__mmask8) ((1u << (n_kv - j)) - 1);
            const __m512d p = _mm512_maskz_mov_pd(live, exp_f64(_mm512_sub_pd(_mm512_maskz_loadu_pd(live, sh + j), m)));
            _mm512_mask_storeu_pd(sh + j, live, p);
            acc = _mm512_add_pd(acc, p);
        }
        sum[h] = _mm512_reduce_add_pd(acc);
    }
    // o = (Σ_j p_j · v_j) / Σ p
    __m512d o[G][D8];
    for (int h = 0; h < G; h++) {
        for (int c = 0; c < D8; c++) {
            o[h][c] = _mm512_setzero_pd();
        }
    }
    for (int32_t j = 0; j < n_kv; j++) {
        __m512d p[G];
        for (int h = 0; h < G; h++) {
            p[h] = _mm512_set1_pd(s[(size_t) h * n_kv + j]);
        }
        for (int c = 0; c < D8; c++) {
            const __m512d vc = rows.value(j, c);
            for (int h = 0; h < G; h++) {
                o[h][c] = _mm512_fmadd_pd(p[h], vc, o[h][c]);
            }
        }
    }
    for (int h = 0; h < G; h++) {
        const __m512d d = _mm512_set1_pd(sum[h]);
        for (int c = 0; c < D8; c++) {
            _mm256_storeu_ps(out + h * HD + 8 * c, _mm512_cvtpd_ps(_mm512_div_pd(o[h][c], d)));
        }
    }
}

// the largest head count of one pass for hd = 8·d8, and the pass for g ≤ that count heads
static int32_t heads_per_pass(int32_t d8) {
    return d8 == 4 ? 3 : d8 == 8 ? 3 : d8 == 16 ? 1 : 0;
}

template <class Rows>
static void heads_pass(const float * q, int32_t g, int32_t d8, const Rows & rows, int32_t n_kv, double * s,
                       float * out) {
    if (d8 == 16) {
        heads_avx512<1, 16>(q, rows, n_kv, s, out);
    } else if (d8 == 8) {
        g == 1 ? heads_avx512<1, 8>(q, rows, n_kv, s, out)
               : g == 2 ? heads_avx512<2, 8>(q, rows, n_kv, s, out) : heads_avx512<3, 8>(q, rows, n_kv, s, out);
    } else {
        g == 1 ? heads_avx512<1, 4>(q, rows, n_kv, s, out)
               : g == 2 ? heads_avx512<2, 4>(q, rows, n_kv, s, out) : heads_avx512<3, 4>(q, rows, n_kv, s, out);
    }
}

// Several query tokens of one kv head at once (a prefill): Q = nq · g query vectors, each with its own causal length
// n_kv[u]. Scores over blocks of 8 keys (the block's rows widened to float64 once, into L1, and read by all Q
// queries), exp and the sums per query, then p·v over blocks of 32 rows (widened once, shared by all queries, each
// query's 8·D8 sums loaded and stored once a block). The same arithmetic as heads_avx512: every sum
// in float64, o = fp32((Σ_j p_j·v_j) / Σ_j p_j), p·v summed in the order j = 0, 1, ...
template <int D8, class Rows>
static void tokens_avx512(const float * q, int64_t q_stride, int32_t nq, const int32_t * n_kv, int32_t g,
                          const Rows & rows, float * out, int64_t out_stride) {
    constexpr int HD = 8 * D8;
    const int32_t nQ = nq * g;
    int32_t n_max = 0;
    for (int32_t u = 0; u < nq; u++) {
        n_max = n_kv[u] > n_max ? n_kv[u] : n_max;
    }
    // plain new[]: no std template instantiated here (kernels.h)
    double * qd = new double[(size_t) nQ * HD + (size_t) nQ * HD + (size_t) nQ * n_max + 3 * (size_t) nQ + 32 * HD];
    double * kb = qd + (size_t) nQ * HD;  // a block of rows widened to float64 (8 keys, or 32 values)
    double * o = kb + 32 * HD;
    double * sc = o + (size_t) nQ * HD;
    double * mx = sc + (size_t) nQ * n_max;
    double * sum = mx + nQ;
    int32_t * len = new int32_t[nQ];
    for (int32_t u = 0; u < nq; u++) {
        for (int32_t h = 0; h < g; h++) {
            const int32_t i = u * g + h;
            len[i] = n_kv[u];
            mx[i] = -INFINITY;
            for (int d = 0; d < HD; d++) {
                qd[(size_t) i * HD + d] = q[u * q_stride + h * HD + d];
                o[(size_t) i * HD + d] = 0.0;
            }
        }
    }
    // scores s_j = Σ_d q[d]·k_j[d]
    int32_t j = 0;
    for (; j + 8 <= n_max; j += 8) {
        for (int u = 0; u < 8; u++) {
            for (int c = 0; c < D8; c++) {
                _mm512_storeu_pd(kb + u * HD + 8 * c, rows.key(j + u, c));
            }
        }
        for (int32_t i = 0; i < nQ; i++) {
            if (j >= len[i]) {
                continue;
            }
            __m512d a[8];
#pragma GCC unroll 8
            for (int u = 0; u < 8; u++) {
                a[u] = _mm512_setzero_pd();
            }
#pragma GCC unroll 16
            for (int c = 0; c < D8; c++) {
                const __m512d qc = _mm512_loadu_pd(qd + (size_t) i * HD + 8 * c);
#pragma GCC unroll 8
                for (int u = 0; u < 8; u++) {
                    a[u] = _mm512_fmadd_pd(qc, _mm512_loadu_pd(kb + u * HD + 8 * c), a[u]);
                }
            }
            _mm512_storeu_pd(sc + (size_t) i * n_max + j, sum8(a));
        }
    }
    for (; j < n_max; j++) {
        for (int c = 0; c < D8; c++) {
            _mm512_storeu_pd(kb + 8 * c, rows.key(j, c));
        }
        for (int32_t i = 0; i < nQ; i++) {
            if (j >= len[i]) {
                continue;
            }
            __m512d a = _mm512_setzero_pd();
            for (int c = 0; c < D8; c++) {
                a = _mm512_fmadd_pd(_mm512_loadu_pd(qd + (size_t) i * HD + 8 * c), _mm512_loadu_pd(kb + 8 * c), a);
            }
            sc[(size_t) i * n_max + j] = _mm512_reduce_add_pd(a);
        }
    }
    // the maximum over the query's own keys (a NaN score is passed over), p_j = exp(s_j - max) in place, Σ p
    for (int32_t i = 0; i < nQ; i++) {
        double * si = sc + (size_t) i * n_max;
        __m512d m = _mm512_set1_pd(-INFINITY);
        for (int32_t jj = 0; jj < len[i]; jj += 8) {
            const __mmask8 live = len[i] - jj >= 8 ? (__mmask8) 0xFF : (__mmask8) ((1u << (len[i] - jj)) - 1);
            m = _mm512_mask_max_pd(m, live, _mm512_maskz_loadu_pd(live, si + jj), m);
        }
        const __m512d mv = _mm512_set1_pd(_mm512_reduce_max_pd(m));
        __m512d acc = _mm512_setzero_pd();
        for (int32_t jj = 0; jj < len[i]; jj += 8) {
            const __mmask8 live = len[i] - jj >= 8 ? (__mmask8) 0xFF : (__mmask8) ((1u << (len[i] - jj)) - 1);
            const __m512d p =
                _mm512_maskz_mov_pd(live, exp_f64(_mm512_sub_pd(_mm512_maskz_loadu_pd(live, si + jj), mv)));
            _mm512_mask_storeu_pd(si + jj, live, p);
            acc = _mm512_add_pd(acc, p);
        }
        sum[i] = _mm512_reduce_add_pd(acc);
    }
    // o = Σ_j p_j · v_j over blocks of 32 rows
    for (int32_t j0 = 0; j0 < n_max; j0 += 32) {
        const int32_t jn = n_max - j0 < 32 ? n_max - j0 : 32;
        for (int32_t u = 0; u < jn; u++) {
            for (int c = 0; c < D8; c++) {
                _mm512_storeu_pd(kb + u * HD + 8 * c, rows.value(j0 + u, c));
            }
        }
        for (int32_t i = 0; i < nQ; i++) {
            const int32_t j1 = len[i] < j0 + 32 ? len[i] : j0 + 32;
            if (j1 <= j0) {
                continue;
            }
            __m512d acc[D8];
            double * oi = o + (size_t) i * HD;
#pragma GCC unroll 16
            for (int c = 0; c < D8; c++) {
                acc[c] = _mm512_loadu_pd(oi + 8 * c);
            }
            const double * si = sc + (size_t) i * n_max;
            for (int32_t jj = j0; jj < j1; jj++) {
                const __m512d p = _mm512_set1_pd(si[jj]);
#pragma GCC unroll 16
                for (int c = 0; c < D8; c++) {
                    acc[c] = _mm512_fmadd_pd(p, _mm512_loadu_pd(kb + (jj - j0) * HD + 8 * c), acc[c]);
                }
            }
#pragma GCC unroll 16
            for (int c = 0; c < D8; c++) {
                _mm512_storeu_pd(oi + 8 * c, acc[c]);
            }
        }
    }
    for (int32_t u = 0; u < nq; u++) {
        for (int32_t h = 0; h < g; h++) {
            const int32_t i = u * g + h;
            const __m512d d = _mm512_set1_pd(sum[i]);
            for (int c = 0; c < D8; c++) {
                _mm256_storeu_ps(out + u * out_stride + h * HD + 8 * c,
                                 _mm512_cvtpd_ps(_mm512_div_pd(_mm512_loadu_pd(o + (size_t) i * HD + 8 * c), d)));
            }
        }
    }
    delete[] qd;
    delete[] len;
}

template <int D8>
static void tokens_rows(const float * q, int64_t q_stride, int32_t nq, const int32_t * n_kv, int32_t g,
                        const KvRows & kv, float * out, int64_t out_stride) {
    if (kv.i8) {
        const RowsI8 rows{(const int8_t *) kv.k, (const int8_t *) kv.v, kv.k_step, kv.v_step, kv.stride};
        tokens_avx512<D8>(q, q_stride, nq, n_kv, g, rows, out, out_stride);
    } else {
        const RowsF16 rows{(const uint16_t *) kv.k, (const uint16_t *) kv.v, kv.stride};
        tokens_avx512<D8>(q, q_stride, nq, n_kv, g, rows, out, out_stride);
    }
}

static bool tokens_any(const float * q, int64_t q_stride, int32_t nq, const int32_t * n_kv, int32_t g, int32_t hd,
                       const KvRows & kv, float * out, int64_t out_stride) {
    switch (hd) {
    case 32: tokens_rows<4>(q, q_stride, nq, n_kv, g, kv, out, out_stride); return true;
    case 64: tokens_rows<8>(q, q_stride, nq, n_kv, g, kv, out, out_stride); return true;
    case 128: tokens_rows<16>(q, q_stride, nq, n_kv, g, kv, out, out_stride); return true;
    default: return false;
    }
}
bool (*const attention_tokens)(const float *, int64_t, int32_t, const int32_t *, int32_t, int32_t, const KvRows &,
                               float *, int64_t) = tokens_any;
#else
bool (*const attention_tokens)(const float *, int64_t, int32_t, const int32_t *, int32_t, int32_t, const KvRows &,
                               float *, int64_t) = nullptr;
#endif


void attention_heads(const float * q, int32_t g, int32_t hd, const KvRows & kv, int32_t n_kv, float * out) {
#if defined(__AVX512F__)
    const int32_t d8 = hd % 8 == 0 ? hd / 8 : 0;
    const int32_t per_pass = heads_per_pass(d8);
    if (per_pass > 0) {
        double * scores = new double[(size_t) per_pass * n_kv];
        for (int32_t h0 = 0; h0 < g; h0 += per_pass) {
            const int32_t gp = per_pass < g - h0 ? per_pass : g - h0;
            const float * qp = q + (size_t) h0 * hd;
            float * op = out + (size_t) h0 * hd;
            if (kv.i8) {
                const RowsI8 rows{(const int8_t *) kv.k, (const int8_t *) kv.v, kv.k_step, kv.v_step, kv.stride};
                heads_pass(qp, gp, d8, rows, n_kv, scores, op);
            } else {
                const RowsF16 rows{(const uint16_t *) kv.k, (const uint16_t *) kv.v, kv.stride};
                heads_pass(qp, gp, d8, rows, n_kv, scores, op);
            }
        }
        delete[] scores;
        return;
    }
#endif
    heads_generic(q, g, hd, kv, n_kv, out);
}

}  // namespace mq::MQ_CPU_ISA
