// Integer kernels of the dynamic int8-activation schemes w8a8, w4a8 and w4a8g (docs/numerics.md, "Dynamic int8
// activations"), compiled once per instruction set (kernels.h). Every path computes the same exact int32 sums;
// the SIMD paths differ only in how they reach them:
// - AVX-512 VNNI (vpdpbusd: u8 x s8 -> s32, four products a lane, no saturation). w8a8 feeds the activations as
//   u8 = a + 128 (a xor 0x80) against the int8 weights and subtracts 128 · Σ_k w[r, k] (the row sums, made once at
//   load). w4a8/w4a8g widen the packed int4 codes to the int8 weight w = q · g in registers (XOR 0x88 makes both
//   nibbles q + 8 in [0, 15]; times the group scale g in [1, 16] in 16-bit lanes, each byte's product ≤ 240
//   staying in its byte; minus 8·g byte by byte), so the inner loop over a group is int8 x int8 -> int32 as for
//   w8a8, with the same a + 128 operand and row-sum offset, and no float touches a group.
// - AVX2: vpmaddubsw (u8 x s8 -> s16 pairs, saturating) then vpmaddwd with ones. w8a8 multiplies |w| (≤ 128) by
//   a · sign(w), so a pair stays ≤ 2 · 128 · 127 < 2^15; w4a8 multiplies q + 8 (≤ 15) by a, scales each 64-code
//   chunk's int32 sums by its group scale and takes off 8 · Σ_j g_j · Σ_{k in group j} a[k] at the end.
// - scalar: the sums as written.
// Sums that may pass 2^31 before their correction (the offsets) are taken modulo 2^32 (the SIMD adds wrap; the
// scalar corrections use uint32_t), which gives the exact acc because the true acc fits int32 (K ≤ 2^17).
#include "kernels.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>

namespace mq::MQ_CPU_ISA {

// clamp(rint(z), -qmax, qmax): clamped first (the bounds are integers and rint is monotonic), then rounded half to
// even by adding and subtracting 1.5 · 2^23 in fp32 (no libm call in this translation unit)
static int32_t round_clamp_i8(float z, int32_t qmax) {
    const float hi = (float) qmax;
    if (!(z >= -hi)) {
        return z != z ? 0 : -qmax;
    }
    if (z > hi) {
        return qmax;
    }
    const float magic = 12582912.0f;
    return (int32_t) ((z + magic) - magic);
}

float quant_row_i8(const float * x, int64_t k, int64_t kp, int32_t qmax, int8_t * a) {
    float amax = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    {
        __m512 mv = _mm512_setzero_ps();
        for (; i + 16 <= k; i += 16) {
            mv = _mm512_max_ps(mv, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
        }
        amax = _mm512_reduce_max_ps(mv);
    }
#elif defined(__AVX2__)
    {
        const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 mv = _mm256_setzero_ps();
        for (; i + 8 <= k; i += 8) {
            mv = _mm256_max_ps(mv, _mm256_and_ps(_mm256_loadu_ps(x + i), nosign));
        }
        float t[8];
        _mm256_storeu_ps(t, mv);
        for (int j = 0; j < 8; j++) {
            amax = t[j] > amax ? t[j] : amax;
        }
    }
#endif
    for (; i < k; i++) {
        const float v = std::fabs(x[i]);
        amax = v > amax ? v : amax;
    }
    if (!(amax > 0.0f)) {
        memset(a, 0, (size_t) kp);
        return 0.0f;
    }
    const float inv = (float) qmax / amax;
    i = 0;
#if defined(__AVX512F__)
    {
        const __m512 vi = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-qmax), hi = _mm512_set1_epi32(qmax);
        for (; i + 16 <= k; i += 16) {
            // cvtps rounds half to even (the default rounding mode); |z| ≤ qmax (1 + 2^-23), so no overflow
            __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), vi));
            r = _mm512_max_epi32(_mm512_min_epi32(r, hi), lo);
            _mm_storeu_si128((__m128i *) (a + i), _mm512_cvtepi32_epi8(r));
        }
    }
#elif defined(__AVX2__)
    {
        const __m256 vi = _mm256_set1_ps(inv);
        const __m256i lo = _mm256_set1_epi32(-qmax), hi = _mm256_set1_epi32(qmax);
        for (; i + 8 <= k; i += 8) {
            __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi));
            r = _mm256_max_epi32(_mm256_min_epi32(r, hi), lo);
            const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r, r), _mm256_setzero_si256());
            const int32_t w0 = _mm256_extract_epi32(p, 0), w1 = _mm256_extract_epi32(p, 4);
            memcpy(a + i, &w0, 4);
            memcpy(a + i + 4, &w1, 4);
        }
    }
#endif
    for (; i < k; i++) {
        a[i] = (int8_t) round_clamp_i8(x[i] * inv, qmax);
    }
    memset(a + k, 0, (size_t) (kp - k));
    return amax;
}

// ---- w8a8 ------------------------------------------------------------------------------------------------------

static int32_t dot_i8_scalar(const int8_t * w, const int8_t * a, int64_t k) {
    int32_t s = 0;
    for (int64_t i = 0; i < k; i++) {
        s += (int32_t) w[i] * a[i];
    }
    return s;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 64 bytes at p, or its first bytes under the mask mk where the row ends sooner (plain loads where the step is
// whole: masked loads stall the loop on some cores)
static inline __m512i load64(const void * p, bool full, __mmask64 mk) {
    return full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(mk, p);
}

// rows [r, r + R), tokens [t0, t0 + TB): each 64-byte step of the R weight rows is loaded once and meets TB
// activation rows (a xor 0x80 = a + 128 as u8); the tail of K is read with a byte mask
template <int R, int TB>
static void w8a8_block(const int8_t * w, int64_t k, const int32_t * wsum, const int8_t * a, int64_t ka, int64_t t0,
                       int64_t n, int64_t r, int32_t * acc) {
    const __m512i x80 = _mm512_set1_epi8((char) 0x80);
    __m512i s[R][TB];
    for (int j = 0; j < R; j++) {
        for (int b = 0; b < TB; b++) {
            s[j][b] = _mm512_setzero_si512();
        }
    }
    for (int64_t i = 0; i < k; i += 64) {
        const bool full = k - i >= 64;
        const __mmask64 mk = full ? ~(__mmask64) 0 : (((__mmask64) 1 << (k - i)) - 1);
        __m512i wv[R];
        for (int j = 0; j < R; j++) {
            wv[j] = load64(w + (r + j) * k + i, full, mk);
        }
        for (int b = 0; b < TB; b++) {
            const __m512i av = _mm512_xor_si512(_mm512_loadu_si512(a + (t0 + b) * ka + i), x80);
            for (int j = 0; j < R; j++) {
                s[j][b] = _mm512_dpbusd_epi32(s[j][b], av, wv[j]);
            }
        }
    }
    for (int b = 0; b < TB; b++) {
        for (int j = 0; j < R; j++) {
            const uint32_t raw = (uint32_t) _mm512_reduce_add_epi32(s[j][b]);
            acc[(t0 + b) * n + r + j] = (int32_t) (raw - 128u * (uint32_t) wsum[r + j]);
        }
    }
}
#elif defined(__AVX2__)
// the same blocking on AVX2: |w| (as u8, ≤ 128) times a · sign(w) (|a| ≤ 127), pairs in 16 bits, then int32
template <int R, int TB>
static void w8a8_block(const int8_t * w, int64_t k, const int32_t *, const int8_t * a, int64_t ka, int64_t t0,
                       int64_t n, int64_t r, int32_t * acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s[R][TB];
    for (int j = 0; j < R; j++) {
        for (int b = 0; b < TB; b++) {
            s[j][b] = _mm256_setzero_si256();
        }
    }
    const int64_t k32 = k / 32 * 32;
    for (int64_t i = 0; i < k32; i += 32) {
        __m256i wv[R], uw[R];
        for (int j = 0; j < R; j++) {
            wv[j] = _mm256_loadu_si256((const __m256i *) (w + (r + j) * k + i));
            uw[j] = _mm256_abs_epi8(wv[j]);
        }
        for (int b = 0; b < TB; b++) {
            const __m256i av = _mm256_loadu_si256((const __m256i *) (a + (t0 + b) * ka + i));
            for (int j = 0; j < R; j++) {
                const __m256i p = _mm256_maddubs_epi16(uw[j], _mm256_sign_epi8(av, wv[j]));
                s[j][b] = _mm256_add_epi32(s[j][b], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int b = 0; b < TB; b++) {
        for (int j = 0; j < R; j++) {
            __m128i v = _mm_add_epi32(_mm256_castsi256_si128(s[j][b]), _mm256_extracti128_si256(s[j][b], 1));
            v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
            v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
            const int64_t t = t0 + b;
            acc[t * n + r + j] = _mm_cvtsi128_si32(v) + dot_i8_scalar(w + (r + j) * k + k32, a + t * ka + k32, k - k32);
        }
    }
}
#endif

void gemm_w8a8(const int8_t * w, const int32_t * wsum, const int8_t * a, int64_t ka, int64_t m, int64_t k, int64_t n,
               int64_t r0, int64_t r1, int32_t * acc) {
#if defined(__AVX2__)
    // AVX-512: 4 rows x 4 tokens of zmm sums; AVX2 (16 ymm registers): 4 x 1 for one token, 2 x 4 for several
    int64_t r = r0;
    if (m == 1) {
        for (; r + 4 <= r1; r += 4) {
            w8a8_block<4, 1>(w, k, wsum, a, ka, 0, n, r, acc);
        }
    } else {
#if defined(__AVX512F__)
        constexpr int RB = 4;
#else
        constexpr int RB = 2;
#endif
        for (; r + RB <= r1; r += RB) {
            int64_t t = 0;
            for (; t + 4 <= m; t += 4) {
                w8a8_block<RB, 4>(w, k, wsum, a, ka, t, n, r, acc);
            }
            for (; t < m; t++) {
                w8a8_block<RB, 1>(w, k, wsum, a, ka, t, n, r, acc);
            }
        }
    }
    for (; r < r1; r++) {
        for (int64_t t = 0; t < m; t++) {
            acc[t * n + r] = dot_i8_scalar(w + r * k, a + t * ka, k);
        }
    }
#else
    (void) wsum;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < m; t++) {
            acc[t * n + r] = dot_i8_scalar(w + r * k, a + t * ka, k);
        }
    }
#endif
}

// ---- w4a8, w4a8g -----------------------------------------------------------------------------------------------

// Σ_k q[r, k] · g[r, k / group] · a[k] of one row and token, exactly (no offset)
static int32_t dot_w4a8_scalar(const uint8_t * q, const uint8_t * g, int64_t gb, const int8_t * even,
                               const int8_t * odd, int64_t h) {
    int32_t acc = 0;
    for (int64_t c = 0; c < h; c += gb) {
        int32_t s = 0;
        for (int64_t i = c; i < c + gb; i++) {
            const int32_t lo = q[i] & 0xF, hi = q[i] >> 4;
            s += (lo - 16 * (lo >= 8)) * even[i] + (hi - 16 * (hi >= 8)) * odd[i];
        }
        acc += (g ? (int32_t) g[c / gb] : 1) * s;
    }
    return acc;
}

// the offset of the biased nibbles (q + 8): 8 · Σ_j g_j · Σ_{k in group j} a[k], modulo 2^32
static uint32_t w4a8_offset(const uint8_t * g, int64_t ng, const int32_t * gsum) {
    uint32_t s = 0;
    for (int64_t j = 0; j < ng; j++) {
        s += (g ? (uint32_t) g[j] : 1u) * (uint32_t) gsum[j];
    }
    return 8u * s;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// rows [r, r + 4), tokens [t0, t0 + TB). A 64-byte step holds 128 codes; each 32-byte half lies in one group (a
// group is a multiple of 64 codes), so the group scales of the step are a pair of 16-bit broadcasts. The weight
// bytes become w = q · g exactly: (q + 8) · g in 16-bit lanes (no carry between the bytes: ≤ 240), minus 8 · g
// byte by byte (wrapping, w in [-128, 112]); they meet the activations as u8 = a + 128 (a xor 0x80), and the
// offset 128 · Σ_k w[r, k] is the row's, made once at load (wsum)
template <int TB, bool G>
static void w4a8_rows4(const uint8_t * qw, const uint8_t * gs, int64_t ng, int64_t gb, const Int8Prepared & a,
                       const int32_t * wsum, int64_t h, int64_t t0, int64_t n, int64_t r, int32_t * acc) {
    const __m512i x88 = _mm512_set1_epi8((char) 0x88), x0f = _mm512_set1_epi8(0x0F), x80 = _mm512_set1_epi8((char) 0x80);
    const __m512i x08 = _mm512_set1_epi8(8);
    __m512i s[4][TB];
    for (int j = 0; j < 4; j++) {
        for (int b = 0; b < TB; b++) {
            s[j][b] = _mm512_setzero_si512();
        }
    }
    // the groups of the step's two halves, i / gb and (i + 32) / gb, advanced without a division (gb >= 32)
    int64_t j0 = 0, j1 = 0, end0 = gb, end1 = gb;
    for (int64_t i = 0; i < h; i += 64) {
        const bool full = h - i >= 64;
        const __mmask64 mk = full ? ~(__mmask64) 0 : (((__mmask64) 1 << (h - i)) - 1);
        if (G) {
            for (; i >= end0; end0 += gb) j0++;
            for (; i + 32 >= end1; end1 += gb) j1++;
        }
        __m512i lo[4], hi[4];
        for (int j = 0; j < 4; j++) {
            const __m512i q = _mm512_xor_si512(load64(qw + (r + j) * h + i, full, mk), x88);
            lo[j] = _mm512_and_si512(q, x0f);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(q, 4), x0f);
            if (G) {
                const uint8_t * g = gs + (r + j) * ng;
                const int16_t g0 = g[j0], g1 = i + 32 < h ? g[j1] : 0;
                const __m512i gv = _mm512_inserti64x4(_mm512_set1_epi16(g0), _mm256_set1_epi16(g1), 1);
                const __m512i g8 = _mm512_inserti64x4(_mm512_set1_epi8((char) (8 * g0)),
                                                      _mm256_set1_epi8((char) (8 * g1)), 1);
                lo[j] = _mm512_sub_epi8(_mm512_mullo_epi16(lo[j], gv), g8);
                hi[j] = _mm512_sub_epi8(_mm512_mullo_epi16(hi[j], gv), g8);
            } else {
                lo[j] = _mm512_sub_epi8(lo[j], x08);
                hi[j] = _mm512_sub_epi8(hi[j], x08);
            }
        }
        for (int b = 0; b < TB; b++) {
            const __m512i e = _mm512_xor_si512(load64(a.even + (t0 + b) * h + i, full, mk), x80);
            const __m512i o = _mm512_xor_si512(load64(a.odd + (t0 + b) * h + i, full, mk), x80);
            for (int j = 0; j < 4; j++) {
                s[j][b] = _mm512_dpbusd_epi32(s[j][b], e, lo[j]);
                s[j][b] = _mm512_dpbusd_epi32(s[j][b], o, hi[j]);
            }
        }
    }
    for (int b = 0; b < TB; b++) {
        for (int j = 0; j < 4; j++) {
            const uint32_t raw = (uint32_t) _mm512_reduce_add_epi32(s[j][b]);
            acc[(t0 + b) * n + r + j] = (int32_t) (raw - 128u * (uint32_t) wsum[r + j]);
        }
    }
}
#elif defined(__AVX2__)
// R rows, TB tokens; a 32-byte step (64 codes) lies in one group: its int32 sums are scaled by the group scale
template <int R, int TB, bool G>
static void w4a8_rows(const uint8_t * qw, const uint8_t * gs, int64_t ng, int64_t gb, const Int8Prepared & a,
                      int64_t h, int64_t t0, int64_t n, int64_t r, int32_t * acc) {
    const __m256i x88 = _mm256_set1_epi8((char) 0x88), x0f = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i s[R][TB];
    for (int j = 0; j < R; j++) {
        for (int b = 0; b < TB; b++) {
            s[j][b] = _mm256_setzero_si256();
        }
    }
    int64_t jg = 0, end = gb;  // the step's group i / gb, advanced without a division (gb >= 32)
    for (int64_t i = 0; i < h; i += 32) {
        if (G) {
            for (; i >= end; end += gb) jg++;
        }
        __m256i lo[R], hi[R], gv[R];
        for (int j = 0; j < R; j++) {
            const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *) (qw + (r + j) * h + i)), x88);
            lo[j] = _mm256_and_si256(q, x0f);
            hi[j] = _mm256_and_si256(_mm256_srli_epi16(q, 4), x0f);
            gv[j] = G ? _mm256_set1_epi32(gs[(r + j) * ng + jg]) : ones;
        }
        for (int b = 0; b < TB; b++) {
            const __m256i e = _mm256_loadu_si256((const __m256i *) (a.even + (t0 + b) * h + i));
            const __m256i o = _mm256_loadu_si256((const __m256i *) (a.odd + (t0 + b) * h + i));
            for (int j = 0; j < R; j++) {
                // pairs ≤ 2 · 15 · 127: no saturation
                __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo[j], e), ones),
                                             _mm256_madd_epi16(_mm256_maddubs_epi16(hi[j], o), ones));
                if (G) {
                    p = _mm256_mullo_epi32(p, gv[j]);
                }
                s[j][b] = _mm256_add_epi32(s[j][b], p);
            }
        }
    }
    for (int b = 0; b < TB; b++) {
        const int64_t t = t0 + b;
        for (int j = 0; j < R; j++) {
            __m128i v = _mm_add_epi32(_mm256_castsi256_si128(s[j][b]), _mm256_extracti128_si256(s[j][b], 1));
            v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
            v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
            const uint32_t off = w4a8_offset(G ? gs + (r + j) * ng : nullptr, ng, a.gsum + t * ng);
            acc[t * n + r + j] = (int32_t) ((uint32_t) _mm_cvtsi128_si32(v) - off);
        }
    }
}
#endif

#if defined(__AVX2__)
template <bool G>
static void gemm_w4a8_blocks(const uint8_t * qw, const uint8_t * gs, int64_t ng, int64_t gb, const Int8Prepared & a,
                             const int32_t * wsum, int64_t m, int64_t h, int64_t n, int64_t & r, int64_t r1,
                             int32_t * acc) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    for (; r + 4 <= r1; r += 4) {
        int64_t t = 0;
        for (; t + 4 <= m; t += 4) {
            w4a8_rows4<4, G>(qw, gs, ng, gb, a, wsum, h, t, n, r, acc);
        }
        for (; t < m; t++) {
            w4a8_rows4<1, G>(qw, gs, ng, gb, a, wsum, h, t, n, r, acc);
        }
    }
#else
    if (m == 1) {
        for (; r + 4 <= r1; r += 4) {
            w4a8_rows<4, 1, G>(qw, gs, ng, gb, a, h, 0, n, r, acc);
        }
        return;
    }
    for (; r + 2 <= r1; r += 2) {
        int64_t t = 0;
        for (; t + 4 <= m; t += 4) {
            w4a8_rows<2, 4, G>(qw, gs, ng, gb, a, h, t, n, r, acc);
        }
        for (; t < m; t++) {
            w4a8_rows<2, 1, G>(qw, gs, ng, gb, a, h, t, n, r, acc);
        }
    }
#endif
}
#endif

void gemm_w4a8(const uint8_t * qw, const uint8_t * gscale, int64_t group, const int32_t * wsum, const Int8Prepared & a,
               int64_t m, int64_t kp, int64_t n, int64_t r0, int64_t r1, int32_t * acc) {
    const int64_t h = kp / 2, gb = group / 2, ng = kp / group;  // bytes a row, bytes a group, groups a row
    int64_t r = r0;
#if !defined(__AVX512F__)
    (void) wsum;
#endif
#if defined(__AVX2__)
    if (gscale) {
        gemm_w4a8_blocks<true>(qw, gscale, ng, gb, a, wsum, m, h, n, r, r1, acc);
    } else {
        gemm_w4a8_blocks<false>(qw, nullptr, ng, gb, a, wsum, m, h, n, r, r1, acc);
    }
#endif
    for (; r < r1; r++) {
        for (int64_t t = 0; t < m; t++) {
            acc[t * n + r] = dot_w4a8_scalar(qw + r * h, gscale ? gscale + r * ng : nullptr, gb, a.even + t * h,
                                             a.odd + t * h, h);
        }
    }
}

}  // namespace mq::MQ_CPU_ISA
