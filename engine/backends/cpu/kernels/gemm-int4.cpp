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
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "exp-f64.h"
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

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// ---- the blocked GEMM for a block of tokens (W4a4Tiles, cpu-simd.h) ----
//
// A panel is 16 weight rows in the order the kernel reads them: dword c of lane j holds the codes 8c .. 8c + 7 of
// row j, each + 8 (the XOR with 0x88), byte i = (code 8c + i) | (code 8c + 4 + i) << 4. Its low nibbles (mask) then
// meet the token's codes a[8c .. 8c + 3] and its high nibbles (shift, mask) a[8c + 4 .. 8c + 7], each a dword
// broadcast from the codes as they are, so one 64-byte load of a panel feeds 2 vpdpbusd per token: a tile of 12
// tokens x 2 panels keeps 24 accumulators of 16 columns in registers and spends 6 instructions unpacking per 48
// vpdpbusd. A unit's two panels (16·kp bytes) are built once from the file's rows (gathers, a byte and a nibble
// shuffle) and stay in L1 while every token block of the call runs over them; the tokens' codes stream from L2.
// Σ (w + 8)·a = Σ w·a + 8·Σ a: the epilogue subtracts 8·Σ a per token (exact in int32).

static const int TILE_T = 12;

// the panel of rows [row0, row0 + nv) (nv ≤ 16; lanes ≥ nv hold code 0) from the file's packed rows (h bytes each)
static void panel_pack(const uint8_t * qw, int64_t h, int64_t row0, int64_t nv, uint32_t * dst) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int32_t) h));
    const __mmask16 live = nv >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << nv) - 1);
    const uint8_t * base = qw + row0 * h;
    const __m512i x88 = _mm512_set1_epi8((char) 0x88);
    // bytes b0 b1 b2 b3 (nibbles n0 .. n7 in order) -> b0 b2 b1 b3 (n0 n1 n4 n5 n2 n3 n6 n7)
    const __m512i bytes = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15));
    const __m512i keep = _mm512_set1_epi32((int32_t) 0xF00FF00F), down = _mm512_set1_epi32(0x00F000F0),
                  up = _mm512_set1_epi32(0x0F000F00);
    const int64_t nc = h / 4;
    for (int64_t c = 0; c < nc; c++) {
        __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, idx, base + 4 * c, 1);
        v = _mm512_shuffle_epi8(_mm512_xor_si512(v, x88), bytes);
        // in each 16-bit half, swap the middle nibbles: n0 n1 n4 n5 -> n0 n4 n1 n5
        v = _mm512_or_si512(_mm512_and_si512(v, keep),
                            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(v, 4), down),
                                            _mm512_and_si512(_mm512_slli_epi32(v, 4), up)));
        _mm512_storeu_si512(dst + 16 * c, v);
    }
}

static inline int32_t load_i32(const int8_t * p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

// acc of T tokens (rows of a, kp codes apart) x R panels over nc dwords, into out [T][32] (panel r at 16r)
template <int T, int R>
static void tile_dot(const uint32_t * p0, const uint32_t * p1, int64_t nc, const int8_t * a, int64_t kp, int32_t * out) {
    const __m512i x0f = _mm512_set1_epi8(0x0F);
    __m512i acc[T][R];
#pragma GCC unroll 16
    for (int t = 0; t < T; t++) {
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            acc[t][r] = _mm512_setzero_si512();
        }
    }
    for (int64_t c = 0; c < nc; c++) {
        __m512i lo[R], hi[R];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            const __m512i q = _mm512_loadu_si512((r == 0 ? p0 : p1) + 16 * c);
            lo[r] = _mm512_and_si512(q, x0f);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(q, 4), x0f);
        }
        const int8_t * ac = a + 8 * c;
    #pragma GCC unroll 16
    for (int t = 0; t < T; t++) {
            const __m512i e = _mm512_set1_epi32(load_i32(ac + t * kp));
            const __m512i o = _mm512_set1_epi32(load_i32(ac + t * kp + 4));
    #pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
                acc[t][r] = _mm512_dpbusd_epi32(acc[t][r], lo[r], e);
                acc[t][r] = _mm512_dpbusd_epi32(acc[t][r], hi[r], o);
            }
        }
    }
#pragma GCC unroll 16
    for (int t = 0; t < T; t++) {
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            _mm512_storeu_si512(out + 32 * t + 16 * r, acc[t][r]);
        }
    }
}

typedef void (*TileDot)(const uint32_t *, const uint32_t *, int64_t, const int8_t *, int64_t, int32_t *);
template <int R>
static TileDot tile_dot_for(int64_t T) {
    switch (T) {
    case 1: return tile_dot<1, R>;
    case 2: return tile_dot<2, R>;
    case 3: return tile_dot<3, R>;
    case 4: return tile_dot<4, R>;
    case 5: return tile_dot<5, R>;
    case 6: return tile_dot<6, R>;
    case 7: return tile_dot<7, R>;
    case 8: return tile_dot<8, R>;
    case 9: return tile_dot<9, R>;
    case 10: return tile_dot<10, R>;
    case 11: return tile_dot<11, R>;
    default: return tile_dot<12, R>;
    }
}

// lora[t, j] = Σ_i l[t0 + t, i]·bt[i, col + j] in float64 (i = 0, 1, ...) for U tokens from t and 16 columns,
// btd [rank][16] the columns' Bᵀ widened to float64: 2U independent sums, each row of btd shared by the U tokens
template <int U>
static void lora_group(const double * lt, int64_t rank, const double * btd, double * ld) {
    __m512d s[U][2];
#pragma GCC unroll 8
    for (int u = 0; u < U; u++) {
        s[u][0] = _mm512_setzero_pd();
        s[u][1] = _mm512_setzero_pd();
    }
    for (int64_t i = 0; i < rank; i++) {
        const __m512d b0 = _mm512_loadu_pd(btd + 16 * i), b1 = _mm512_loadu_pd(btd + 16 * i + 8);
#pragma GCC unroll 8
        for (int u = 0; u < U; u++) {
            const __m512d li = _mm512_set1_pd(lt[u * rank + i]);
            s[u][0] = _mm512_fmadd_pd(li, b0, s[u][0]);
            s[u][1] = _mm512_fmadd_pd(li, b1, s[u][1]);
        }
    }
#pragma GCC unroll 8
    for (int u = 0; u < U; u++) {
        _mm512_storeu_pd(ld + 16 * u, s[u][0]);
        _mm512_storeu_pd(ld + 16 * u + 8, s[u][1]);
    }
}

// the low-rank sums of T tokens from t0 for one panel (ld [T][16])
static void lora_tile(const W4a4Tiles & g, int64_t t0, int64_t T, const double * btd, double * ld) {
    int64_t t = 0;
    for (; t + 6 <= T; t += 6) {
        lora_group<6>(g.l + (t0 + t) * g.rank, g.rank, btd, ld + 16 * t);
    }
    switch (T - t) {
    case 5: lora_group<5>(g.l + (t0 + t) * g.rank, g.rank, btd, ld + 16 * t); break;
    case 4: lora_group<4>(g.l + (t0 + t) * g.rank, g.rank, btd, ld + 16 * t); break;
    case 3: lora_group<3>(g.l + (t0 + t) * g.rank, g.rank, btd, ld + 16 * t); break;
    case 2: lora_group<2>(g.l + (t0 + t) * g.rank, g.rank, btd, ld + 16 * t); break;
    case 1: lora_group<1>(g.l + (t0 + t) * g.rank, g.rank, btd, ld + 16 * t); break;
    default: break;
    }
}

// Bᵀ[:, col .. col + 16) widened to float64 into btd [rank][16] (columns past the live ones: 0)
static void lora_widen(const W4a4Tiles & g, int64_t col, __mmask16 live, double * btd) {
    const __mmask8 m0 = (__mmask8) (live & 0xFF), m1 = (__mmask8) (live >> 8);
    for (int64_t i = 0; i < g.rank; i++) {
        const float * b = g.bt + i * g.n + col;
        _mm512_storeu_pd(btd + 16 * i, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m0, b)));
        _mm512_storeu_pd(btd + 16 * i + 8, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m1, b + 8)));
    }
}

// swiglu(g, u) = fp32(g / (1 + exp(-g)) · u), in float64 as swiglu_row (swiglu.cpp)
static inline __m256 swiglu8(__m256 g, __m256 u) {
    const __m512d gd = _mm512_cvtps_pd(g);
    const __m512d neg = _mm512_castsi512_pd(
        _mm512_xor_si512(_mm512_castpd_si512(gd), _mm512_set1_epi64((long long) 0x8000000000000000ULL)));
    const __m512d d = _mm512_div_pd(gd, _mm512_add_pd(_mm512_set1_pd(1.0), exp_f64(neg)));
    return _mm512_cvtpd_ps(_mm512_mul_pd(d, _mm512_cvtps_pd(u)));
}

static inline __m512 lora_f32(const double * ld) {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_loadu_pd(ld)), hi = _mm512_cvtpd_ps(_mm512_loadu_pd(ld + 8));
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

// unit q's epilogue for tokens [t0, t0 + T): tacc [T][32] the raw sums of its panels (first rows col[r], nv[r] live)
static void tile_epilogue(const W4a4Tiles & g, int64_t q, int64_t t0, int64_t T, int R, const int64_t * col,
                          const int64_t * nv, const int32_t * tacc, const double * btd, double * ld) {
    __m512 v[2][TILE_T];
    for (int r = 0; r < R; r++) {
        const __mmask16 live = nv[r] >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << nv[r]) - 1);
        if (g.acc) {
            for (int64_t t = 0; t < T; t++) {
                const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512(tacc + 32 * t + 16 * r),
                                                   _mm512_set1_epi32(8 * g.a_sum[t0 + t]));
                _mm512_mask_storeu_epi32(g.acc + (t0 + t) * g.n + col[r], live, a);
            }
            continue;
        }
        const __m512 sc = _mm512_maskz_loadu_ps(live, g.scale + col[r]);
        if (g.l) {
            lora_tile(g, t0, T, btd + r * 16 * g.rank, ld);
        }
        for (int64_t t = 0; t < T; t++) {
            const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512(tacc + 32 * t + 16 * r),
                                               _mm512_set1_epi32(8 * g.a_sum[t0 + t]));
            __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(a), sc);
            if (g.l) {
                x = _mm512_add_ps(x, lora_f32(ld + 16 * t));
            }
            if (g.step) {
                x = _mm512_mul_ps(x, _mm512_set1_ps(g.step[t0 + t]));
            }
            if (g.n_ff > 0) {
                v[r][t] = x;
                continue;
            }
            float * y = g.y + (t0 + t) * g.n + col[r];
            if (g.accumulate) {
                x = _mm512_add_ps(_mm512_maskz_loadu_ps(live, y), x);
            }
            _mm512_mask_storeu_ps(y, live, x);
        }
    }
    if (g.n_ff > 0 && !g.acc) {
        for (int64_t t = 0; t < T; t++) {
            float * z = g.y + (t0 + t) * g.n_ff + 16 * q;
            const __m256 z0 = swiglu8(_mm512_castps512_ps256(v[0][t]), _mm512_castps512_ps256(v[1][t]));
            const __m256 z1 = swiglu8(_mm512_extractf32x8_ps(v[0][t], 1), _mm512_extractf32x8_ps(v[1][t], 1));
            _mm256_storeu_ps(z, z0);
            _mm256_storeu_ps(z + 8, z1);
        }
    }
}

static void tiles_avx512(const W4a4Tiles & g, int64_t u0, int64_t u1) {
    const int64_t h = g.kp / 2, nc = h / 4;
    // plain new[]: no std template instantiated here (kernels.h)
    uint32_t * panels = new uint32_t[2 * 16 * nc];
    int32_t * tacc = new int32_t[TILE_T * 32];
    double * ld = new double[TILE_T * 16];
    double * btd = g.l ? new double[2 * 16 * g.rank] : nullptr;
    for (int64_t q = u0; q < u1; q++) {
        int64_t col[2], nv[2];
        if (g.n_ff > 0) {
            col[0] = 16 * q, col[1] = g.n_ff + 16 * q, nv[0] = nv[1] = 16;
        } else {
            col[0] = 32 * q, col[1] = 32 * q + 16;
            nv[0] = g.n - col[0] < 16 ? g.n - col[0] : 16;
            nv[1] = g.n - col[1] < 16 ? (g.n - col[1] > 0 ? g.n - col[1] : 0) : 16;
        }
        const int R = nv[1] > 0 ? 2 : 1;
        panel_pack(g.qw, h, col[0], nv[0], panels);
        if (R == 2) {
            panel_pack(g.qw, h, col[1], nv[1], panels + 16 * nc);
        }
        for (int r = 0; g.l && r < R; r++) {
            lora_widen(g, col[r], nv[r] >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << nv[r]) - 1),
                       btd + r * 16 * g.rank);
        }
        for (int64_t t0 = 0; t0 < g.m; t0 += TILE_T) {
            const int64_t T = g.m - t0 < TILE_T ? g.m - t0 : TILE_T;
            (R == 2 ? tile_dot_for<2>(T) : tile_dot_for<1>(T))(panels, panels + 16 * nc, nc, g.a + t0 * g.kp, g.kp,
                                                               tacc);
            tile_epilogue(g, q, t0, T, R, col, nv, tacc, btd, ld);
        }
    }
    delete[] panels;
    delete[] tacc;
    delete[] ld;
    delete[] btd;
}

void (*const gemm_w4a4_tiles)(const W4a4Tiles & g, int64_t u0, int64_t u1) = tiles_avx512;
#else
void (*const gemm_w4a4_tiles)(const W4a4Tiles & g, int64_t u0, int64_t u1) = nullptr;
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

// clamp(rint(x), lo, hi), NaN to 0 (quantize.h's cpu_round_clamp; a copy here, see kernels.h)
static inline int32_t round_clamp(float x, int32_t lo, int32_t hi) {
    if (!(x >= (float) lo)) {
        return x != x ? 0 : lo;
    }
    if (x > (float) hi) {
        return hi;
    }
    const float magic = 12582912.0f;  // 1.5 · 2^23
    return (int32_t) ((x + magic) - magic);
}

void expand_slots(const float * z, const int32_t * in_map, int64_t kp, int8_t * a) {
    int64_t s = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // 16 slots at a time: the map's three columns, z_j gathered, then the same steps in 16 lanes: the clamp to
    // [-8·parts, 7·parts] (NaN to 0), rint half to even (the default rounding of vcvtps2dq), and
    // floordiv(t + part, parts) as floor of the fp32 quotient (exact: |t + part| < 2^24, and a quotient that is not
    // an integer is at least 1/parts from one)
    // the map's rows (j, part, parts) of 16 slots are 48 int32 in three vectors: column c is elements 3i + c, i < 16,
    // of which i ≤ (31 - c) / 3 lie in the first two vectors and the rest in the third
    __m512i first[3], second[3];
    for (int c = 0; c < 3; c++) {
        alignas(64) int32_t a[16], b[16];
        for (int i = 0; i < 16; i++) {
            const int e = 3 * i + c;
            a[i] = e < 32 ? e : 0;
            b[i] = e < 32 ? i : 16 + (e - 32);
        }
        first[c] = _mm512_load_si512(a);
        second[c] = _mm512_load_si512(b);
    }
    for (; s + 16 <= kp; s += 16) {
        const int32_t * mp = in_map + 3 * s;
        const __m512i v0 = _mm512_loadu_si512(mp), v1 = _mm512_loadu_si512(mp + 16), v2 = _mm512_loadu_si512(mp + 32);
        const __m512i j = _mm512_permutex2var_epi32(_mm512_permutex2var_epi32(v0, first[0], v1), second[0], v2);
        const __m512i part = _mm512_permutex2var_epi32(_mm512_permutex2var_epi32(v0, first[1], v1), second[1], v2);
        const __m512i parts = _mm512_permutex2var_epi32(_mm512_permutex2var_epi32(v0, first[2], v1), second[2], v2);
        const __mmask16 live = _mm512_cmpge_epi32_mask(j, _mm512_setzero_si512());
        const __m512 x = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, j, z, 4);
        const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_mullo_epi32(parts, _mm512_set1_epi32(-8)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_mullo_epi32(parts, _mm512_set1_epi32(7)));
        const __m512 c = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
        const __m512i t = _mm512_add_epi32(_mm512_maskz_mov_epi32((__mmask16) ~nan, _mm512_cvtps_epi32(c)), part);
        const __m512 qf = _mm512_roundscale_ps(_mm512_div_ps(_mm512_cvtepi32_ps(t), _mm512_cvtepi32_ps(parts)),
                                               _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __m512i q = _mm512_maskz_mov_epi32(live, _mm512_cvtps_epi32(qf));
        _mm_storeu_si128((__m128i *) (a + s), _mm512_cvtepi32_epi8(q));
    }
#endif
    for (; s < kp; s++) {
        const int32_t j = in_map[3 * s], part = in_map[3 * s + 1], parts = in_map[3 * s + 2];
        if (j < 0) {
            a[s] = 0;
            continue;
        }
        const int32_t t = round_clamp(z[j], -8 * parts, 7 * parts) + part;
        a[s] = (int8_t) ((t >= 0 ? t : t - parts + 1) / parts);
    }
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
