/*
Decode GEMV kernels (M = 1..16 tokens) for the w4a4 and f16 linear schemes.

  w4a4: y[m][n] = float(sum_k a[m][k]·w[n][k]) · scale[n]
        W int4 [N][K], two per byte along K, low nibble = even k; A int4 [M][K] packed the same way
        (the kernels unpack both in registers). Integer sum exact, then one fp32 multiply: the result must
        equal the CPU reference bit for bit. Fused epilogues: requantization to int4
        q = clamp(rint(float(acc)·rscale[n]), -8, 7) and SwiGLU (rows [0, F) gate, [F, 2F) up, scales with
        the next layer's 1/Δ folded into the up rows) h = silu(g)·u, q = clamp(rint(h), -8, 7); int4
        outputs packed like the inputs.
  f16:  y[m][n] = sum_k x[m][k]·w[n][k], W fp16, fp32 accumulation; x fp32 (v1) or fp16 (v2).

Versions:
  w4a4 v1  one warp per row, dp4a on the unpacked nibbles
  w4a4 v2  tensor cores (mma m16n8k32 s8 after the nibble unpack, frag.cuh), 8 warps split K, NT tiles of
           8 rows per block, 4 chunks of 64 bytes in flight per thread and row; NT = 1, 2, 4
  f16  v1  one warp per row, fp32 x, FFMA (the CPU backend's arithmetic)
  f16  v2  tensor cores (mma m16n8k16 f16 -> f32), fp16 x, the v2 skeleton

Build and run: make -C bench/kernels && bench/kernels/build/gemv
*/
#include "frag.cuh"
#include "lab.cuh"

#include <cuda_fp16.h>

#include <cmath>

enum Epi { EPI_F32, EPI_Q4, EPI_SWIGLU_Q4 };

// ---------------------------------------------------------------------------------------------------
// CPU reference

static inline int nibble(const uint8_t * row, int64_t k) {
    int v = (row[k >> 1] >> ((k & 1) * 4)) & 15;
    return v >= 8 ? v - 16 : v;
}

// acc[m][n] = sum_k a[m][k]·w[n][k] over int4 codes
static void ref_w4a4_acc(const uint8_t * a, const uint8_t * w, int M, int N, int K, std::vector<int32_t> & acc) {
    acc.assign((size_t) M * N, 0);
    std::vector<int8_t> ad((size_t) M * K);
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) ad[(size_t) m * K + k] = (int8_t) nibble(a + (size_t) m * K / 2, k);
    parallel_for(N, [&](int64_t b, int64_t e) {
        std::vector<int8_t> wd(K);
        for (int64_t n = b; n < e; n++) {
            for (int k = 0; k < K; k++) wd[k] = (int8_t) nibble(w + n * K / 2, k);
            for (int m = 0; m < M; m++) {
                int32_t s = 0;
                for (int k = 0; k < K; k++) s += ad[(size_t) m * K + k] * wd[k];
                acc[(size_t) m * N + n] = s;
            }
        }
    });
}

static inline int q4(float v) { return std::min(7, std::max(-8, (int) std::nearbyint(v))); }
static inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// ---------------------------------------------------------------------------------------------------
// w4a4 v1: one warp per output row, every lane 16 bytes (32 k) per step; dp4a over the unpacked lanes.

__global__ void w4a4_v1(const uint8_t * __restrict__ a, const uint8_t * __restrict__ w, const float * __restrict__ scale,
                        float * __restrict__ y, int M, int N, int kb) {
    const int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (n >= N) return;
    int acc[16] = {};
    for (int off = lane * 16; off < kb; off += 512) {
        const uint4 q = ld_stream(w + (size_t) n * kb + off);
#pragma unroll
        for (int m = 0; m < 16; m++) {
            if (m < M) {
                const uint4 p = ld_cached(a + (size_t) m * kb + off);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    acc[m] = __dp4a((int) FmtI4::lo(word(q, i)), (int) FmtI4::lo(word(p, i)), acc[m]);
                    acc[m] = __dp4a((int) FmtI4::hi(word(q, i)), (int) FmtI4::hi(word(p, i)), acc[m]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < 16; m++) {
        if (m < M) {
            int s = acc[m];
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == 0) y[(size_t) m * N + n] = (float) (s >> 8) * scale[n];
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// v2: tensor-core GEMV. A block of 8 warps owns NT tiles of 8 weight rows; the warps split K chunk by chunk
// (warp w takes chunks w, w+8, ...: the 8 warps read 512 contiguous bytes of each row at a time); each
// thread keeps U = 4 chunks x (NT weight + 2 activation) 16-byte loads in flight. Rows of A past M are
// zeros (M <= 8 uses half of each MMA: the MMA is not the bottleneck, the weight bytes are). Partial sums
// meet in shared memory; integer sums are exact in any order.

template <class Fmt, int NT, int EPI>
__global__ void __launch_bounds__(256, 1) gemv_v2(const uint8_t * __restrict__ a, const uint8_t * __restrict__ w,
                                               const float * __restrict__ scale, void * __restrict__ y, int M,
                                               int N, int kb) {
    constexpr int WARPS = 8, U = 4;
    using acc_t = typename Fmt::acc_t;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int F = N / 2;  // SwiGLU: gate rows [0, F), up rows [F, 2F)

    // first weight row of tile i (SwiGLU: tiles [0, NT/2) gate rows j0.., tiles [NT/2, NT) the up rows F + j0..)
    auto tile_row0 = [&](int i) {
        return EPI == EPI_SWIGLU_Q4 ? (i < NT / 2 ? 0 : F) + (blockIdx.x * (NT / 2) + i % (NT / 2)) * 8
                                    : (blockIdx.x * NT + i) * 8;
    };
    const int row_end = EPI == EPI_SWIGLU_Q4 ? F : N;  // rows of a tile past this are absent
    int row0[NT];
    bool row_ok[NT];
#pragma unroll
    for (int i = 0; i < NT; i++) {
        row0[i] = tile_row0(i);
        row_ok[i] = (EPI == EPI_SWIGLU_Q4 ? row0[i] % F : row0[i]) + g < row_end;
    }
    const bool a_ok0 = g < M, a_ok8 = g + 8 < M;
    const uint8_t * ap0 = a + (size_t) (a_ok0 ? g : 0) * kb;
    const uint8_t * ap8 = a + (size_t) (a_ok8 ? g + 8 : 0) * kb;
    const uint8_t * wp[NT];
#pragma unroll
    for (int i = 0; i < NT; i++) wp[i] = w + (size_t) (row_ok[i] ? row0[i] + g : 0) * kb;

    acc_t c[NT][4] = {};
    const int nchunk = (kb + 63) / 64;
    const uint4 z = make_uint4(0, 0, 0, 0);
    for (int c0 = warp; c0 < nchunk; c0 += WARPS * U) {
        // all loads of the batch first (unconditional, from clamped addresses: no branches, so they issue
        // back to back), then the math. Past the end of K the values are zeroed; rows past M or N are
        // read from row 0 and only feed outputs that are never written.
        uint4 ra0[U], ra8[U], rb[U][NT];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int off = (c0 + u * WARPS) * 64 + 16 * t;
            const int o = min(off, kb - 16);
            ra0[u] = ld_cached(ap0 + o);
            ra8[u] = ld_cached(ap8 + o);
#pragma unroll
            for (int i = 0; i < NT; i++) rb[u][i] = ld_stream(wp[i] + o);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const bool in = (c0 + u * WARPS) * 64 + 16 * t < kb;
            if (!in) {
                ra0[u] = ra8[u] = z;
#pragma unroll
                for (int i = 0; i < NT; i++) rb[u][i] = z;
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
#pragma unroll
            for (int s = 0; s < Fmt::steps; s++) {
                uint32_t af[4];
                Fmt::a_frag(ra0[u], ra8[u], s, af);
#pragma unroll
                for (int i = 0; i < NT; i++) {
                    uint32_t bf[2];
                    Fmt::b_frag(rb[u][i], s, bf);
                    Fmt::mma(c[i], af, bf);
                }
            }
        }
    }

    __shared__ acc_t red[WARPS][NT][4][32];
#pragma unroll
    for (int i = 0; i < NT; i++)
#pragma unroll
        for (int r = 0; r < 4; r++) red[warp][i][r][lane] = c[i][r];
    __syncthreads();

    // thread p sums one register pair (cols 2t, 2t+1 of row g or g+8) of one tile over the warps
    const int p = threadIdx.x;
    const int n_tiles_out = EPI == EPI_SWIGLU_Q4 ? NT / 2 : NT;
    if (p >= n_tiles_out * 64) return;
    const int i = p >> 6, l = (p >> 1) & 31, h = p & 1;
    const int m = (l >> 2) + 8 * h, n = tile_row0(i) + 2 * (l & 3);
    if (m >= M) return;
    auto sum = [&](int tile, int r) {
        acc_t s = 0;
#pragma unroll
        for (int v = 0; v < WARPS; v++) s += red[v][tile][r][l];
        return s;
    };
    auto value = [&](acc_t s, int col) {  // float(acc) · scale[col], the one fp32 multiply
        float f;
        if constexpr (Fmt::shift > 0) f = (float) (s >> Fmt::shift); else f = (float) s;
        return scale ? f * scale[col] : f;
    };
    const acc_t s0 = sum(i, 2 * h), s1 = sum(i, 2 * h + 1);
    if (EPI == EPI_F32) {
        float * yo = (float *) y + (size_t) m * N;
        if (n < N) yo[n] = value(s0, n);
        if (n + 1 < N) yo[n + 1] = value(s1, n + 1);
    } else if (EPI == EPI_Q4) {
        if (n < N) {
            const int q0 = max(-8, min(7, __float2int_rn(value(s0, n))));
            const int q1 = max(-8, min(7, __float2int_rn(value(s1, n + 1))));
            ((uint8_t *) y)[(size_t) m * (N / 2) + n / 2] = (uint8_t) ((q0 & 15) | ((q1 & 15) << 4));
        }
    } else {
        const int j = n;  // gate column; its up row is F + j
        if (j < F) {
            const acc_t u0 = sum(i + NT / 2, 2 * h), u1 = sum(i + NT / 2, 2 * h + 1);
            const float g0 = value(s0, j), g1 = value(s1, j + 1);
            // h = silu(g)·u = g / (1 + exp(-g)) · u
            const float h0 = g0 / (1.0f + expf(-g0)) * value(u0, F + j);
            const float h1 = g1 / (1.0f + expf(-g1)) * value(u1, F + j + 1);
            const int q0 = max(-8, min(7, __float2int_rn(h0))), q1 = max(-8, min(7, __float2int_rn(h1)));
            ((uint8_t *) y)[(size_t) m * (F / 2) + j / 2] = (uint8_t) ((q0 & 15) | ((q1 & 15) << 4));
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// f16 v1: one warp per row, fp32 activations, FFMA; lane reads 8 weights (16 bytes) per step.

__global__ void f16_v1(const float * __restrict__ x, const __half * __restrict__ w, float * __restrict__ y, int M,
                       int N, int K) {
    const int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (n >= N) return;
    float acc[16] = {};
    for (int k = lane * 8; k < K; k += 256) {
        const uint4 q = ld_stream(w + (size_t) n * K + k);
        const __half2 * h2 = (const __half2 *) &q;
        float wf[8];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 f = __half22float2(h2[i]);
            wf[2 * i] = f.x, wf[2 * i + 1] = f.y;
        }
#pragma unroll
        for (int m = 0; m < 16; m++) {
            if (m < M) {
                const float4 x0 = __ldg((const float4 *) (x + (size_t) m * K + k));
                const float4 x1 = __ldg((const float4 *) (x + (size_t) m * K + k + 4));
                acc[m] += x0.x * wf[0] + x0.y * wf[1] + x0.z * wf[2] + x0.w * wf[3] + x1.x * wf[4] + x1.y * wf[5] +
                          x1.z * wf[6] + x1.w * wf[7];
            }
        }
    }
#pragma unroll
    for (int m = 0; m < 16; m++) {
        if (m < M) {
            float s = acc[m];
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == 0) y[(size_t) m * N + n] = s;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// host

struct Dev {
    void * p = nullptr;
    explicit Dev(size_t bytes) { CUDA_CHECK(cudaMalloc(&p, bytes)); }
    ~Dev() { cudaFree(p); }
    template <class T> T * as() const { return (T *) p; }
};

static float g_read_gbs = 0.0f;
static int g_failures = 0, g_passes = 0;

static void report(const char * what, bool ok) {
    (ok ? g_passes : g_failures)++;
    printf("  %-58s %s\n", what, ok ? "ok" : "FAILED");
}

template <class Fmt, int NT, int EPI>
static void launch_v2(const void * a, const void * w, const float * scale, void * y, int M, int N, int kb,
                      cudaStream_t st) {
    const int rows_per_block = EPI == EPI_SWIGLU_Q4 ? NT / 2 * 8 : NT * 8;
    const int rows = EPI == EPI_SWIGLU_Q4 ? N / 2 : N;
    gemv_v2<Fmt, NT, EPI><<<(rows + rows_per_block - 1) / rows_per_block, 256, 0, st>>>(
        (const uint8_t *) a, (const uint8_t *) w, scale, y, M, N, kb);
}

// integer-exact check of every w4a4 version and epilogue at one shape
static void check_w4a4(int N, int K, uint64_t seed) {
    const int MMAX = 16, kb = K / 2;
    Rng rng(seed);
    std::vector<uint8_t> a((size_t) MMAX * kb), w((size_t) N * kb);
    for (auto & v : a) v = (uint8_t) rng.next();
    for (auto & v : w) v = (uint8_t) rng.next();
    std::vector<float> scale(N), rscale(N);
    const float sd = std::sqrt((float) K) * 21.5f;  // std of acc for uniform codes
    for (int n = 0; n < N; n++) scale[n] = (0.5f + rng.uniform()) * 1.5f / sd, rscale[n] = (0.5f + rng.uniform()) * 4.0f / sd;
    std::vector<int32_t> acc;
    ref_w4a4_acc(a.data(), w.data(), MMAX, N, K, acc);

    Dev da(a.size()), dw(w.size()), ds(N * 4), drs(N * 4), dy((size_t) MMAX * N * 4);
    CUDA_CHECK(cudaMemcpy(da.p, a.data(), a.size(), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dw.p, w.data(), w.size(), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(ds.p, scale.data(), N * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(drs.p, rscale.data(), N * 4, cudaMemcpyHostToDevice));

    for (int M : {1, 3, 8, 9, 16}) {
        // each launch twice, the output poisoned with two patterns: a byte left unwritten cannot match both
        auto run_f32 = [&](const char * name, const std::function<void()> & launch) {
            bool ok = true;
            for (int poison : {0x5A, 0xA5}) {
                CUDA_CHECK(cudaMemset(dy.p, poison, (size_t) M * N * 4));
                launch();
                CUDA_CHECK(cudaGetLastError());
                std::vector<float> y((size_t) M * N);
                CUDA_CHECK(cudaMemcpy(y.data(), dy.p, y.size() * 4, cudaMemcpyDeviceToHost));
                for (int m = 0; m < M; m++)
                    for (int n = 0; n < N; n++) {
                        const float r = (float) acc[(size_t) m * N + n] * scale[n];
                        ok &= memcmp(&r, &y[(size_t) m * N + n], 4) == 0;
                    }
            }
            char buf[128];
            snprintf(buf, sizeof buf, "%s N=%d K=%d M=%d bit-exact", name, N, K, M);
            report(buf, ok);
        };
        run_f32("w4a4 v1", [&] { w4a4_v1<<<(N * 32 + 255) / 256, 256>>>(da.as<uint8_t>(), dw.as<uint8_t>(), ds.as<float>(), dy.as<float>(), M, N, kb); });
        run_f32("w4a4 v2 NT=1", [&] { launch_v2<FmtI4, 1, EPI_F32>(da.p, dw.p, ds.as<float>(), dy.p, M, N, kb, 0); });
        run_f32("w4a4 v2 NT=2", [&] { launch_v2<FmtI4, 2, EPI_F32>(da.p, dw.p, ds.as<float>(), dy.p, M, N, kb, 0); });
        run_f32("w4a4 v2 NT=4", [&] { launch_v2<FmtI4, 4, EPI_F32>(da.p, dw.p, ds.as<float>(), dy.p, M, N, kb, 0); });

        // requantization: every code identical
        {
            bool ok = true;
            for (int poison : {0x5A, 0xA5}) {
                CUDA_CHECK(cudaMemset(dy.p, poison, (size_t) M * N / 2));
                launch_v2<FmtI4, 2, EPI_Q4>(da.p, dw.p, drs.as<float>(), dy.p, M, N, kb, 0);
                CUDA_CHECK(cudaGetLastError());
                std::vector<uint8_t> y((size_t) M * N / 2);
                CUDA_CHECK(cudaMemcpy(y.data(), dy.p, y.size(), cudaMemcpyDeviceToHost));
                for (int m = 0; m < M; m++)
                    for (int n = 0; n < N; n++) {
                        const int r = q4((float) acc[(size_t) m * N + n] * rscale[n]);
                        ok &= nibble(y.data() + (size_t) m * N / 2, n) == r;
                    }
            }
            char buf[128];
            snprintf(buf, sizeof buf, "w4a4 v2 requant N=%d K=%d M=%d codes identical", N, K, M);
            report(buf, ok);
        }
        // SwiGLU: silu's exp may differ in the last bit between libm and CUDA; codes must agree >= 99.9%
        if (N % 16 == 0) {
            const int F = N / 2;
            bool ok = true;
            size_t same = 0, total = 0;
            for (int poison : {0x5A, 0xA5}) {
                CUDA_CHECK(cudaMemset(dy.p, poison, (size_t) M * F / 2));
                launch_v2<FmtI4, 2, EPI_SWIGLU_Q4>(da.p, dw.p, ds.as<float>(), dy.p, M, N, kb, 0);
                CUDA_CHECK(cudaGetLastError());
                std::vector<uint8_t> y((size_t) M * F / 2);
                CUDA_CHECK(cudaMemcpy(y.data(), dy.p, y.size(), cudaMemcpyDeviceToHost));
                for (int m = 0; m < M; m++)
                    for (int j = 0; j < F; j++) {
                        const float gv = (float) acc[(size_t) m * N + j] * scale[j];
                        const float uv = (float) acc[(size_t) m * N + F + j] * scale[F + j];
                        const int r = q4(silu(gv) * uv), q = nibble(y.data() + (size_t) m * F / 2, j);
                        same += q == r, total++;
                        ok &= std::abs(q - r) <= 1;
                    }
            }
            ok &= same >= total * 0.999;
            char buf[128];
            snprintf(buf, sizeof buf, "w4a4 v2 swiglu N=%d K=%d M=%d (%.4f%% same)", N, K, M, 100.0 * same / total);
            report(buf, ok);
        }
    }
}

// f16: relative error ‖y − ref‖ / ‖ref‖ against a float64 reference (v1: fp32 x; v2: x rounded to fp16)
static void check_f16(int N, int K, uint64_t seed) {
    const int MMAX = 16;
    Rng rng(seed);
    std::vector<float> x((size_t) MMAX * K), xr(x.size());
    std::vector<__half> xh(x.size()), w((size_t) N * K);
    for (size_t i = 0; i < x.size(); i++) {
        x[i] = rng.uniform() * 2 - 1;
        xh[i] = __float2half(x[i]);
        xr[i] = __half2float(xh[i]);
    }
    std::vector<float> wf(w.size());
    for (size_t i = 0; i < w.size(); i++) w[i] = __float2half((rng.uniform() * 2 - 1) * 0.05f), wf[i] = __half2float(w[i]);
    Dev dx(x.size() * 4), dxh(x.size() * 2), dw(w.size() * 2), dy((size_t) MMAX * N * 4);
    CUDA_CHECK(cudaMemcpy(dx.p, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dxh.p, xh.data(), xh.size() * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dw.p, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    for (int M : {1, 5, 16}) {
        for (int v = 1; v <= 2; v++) {
            const std::vector<float> & xin = v == 1 ? x : xr;
            std::vector<double> ref((size_t) M * N);
            parallel_for(N, [&](int64_t b, int64_t e) {
                for (int64_t n = b; n < e; n++)
                    for (int m = 0; m < M; m++) {
                        double s = 0;
                        for (int k = 0; k < K; k++) s += (double) xin[(size_t) m * K + k] * wf[n * K + k];
                        ref[(size_t) m * N + n] = s;
                    }
            });
            CUDA_CHECK(cudaMemset(dy.p, 0xFF, (size_t) M * N * 4));  // NaN
            if (v == 1) f16_v1<<<(N * 32 + 255) / 256, 256>>>(dx.as<float>(), dw.as<__half>(), dy.as<float>(), M, N, K);
            else launch_v2<FmtF16, 2, EPI_F32>(dxh.p, dw.p, nullptr, dy.p, M, N, 2 * K, 0);
            CUDA_CHECK(cudaGetLastError());
            std::vector<float> y((size_t) M * N);
            CUDA_CHECK(cudaMemcpy(y.data(), dy.p, y.size() * 4, cudaMemcpyDeviceToHost));
            double num = 0, den = 0;
            bool finite = true;
            for (size_t i = 0; i < y.size(); i++) {
                finite &= std::isfinite(y[i]);
                num += (y[i] - ref[i]) * (y[i] - ref[i]), den += ref[i] * ref[i];
            }
            const double rel = std::sqrt(num / den);
            char buf[128];
            snprintf(buf, sizeof buf, "f16 v%d N=%d K=%d M=%d rel.err %.2e", v, N, K, M, rel);
            report(buf, finite && rel < 1e-4);
        }
    }
}

struct Shape {
    const char * name;
    int N, K;
};
static const Shape kShapes[] = {
    {"q|o 4096x4096", 4096, 4096},
    {"gate+up 22016x4096", 22016, 4096},
    {"down 4096x11008", 4096, 11008},
    {"lm_head 32000x4096", 32000, 4096},
};

static void bench_w4a4() {
    printf("\nw4a4 decode GEMV: µs per call (CUDA graph of 20, median of 15), GB/s = (weights + acts + out) / t\n");
    printf("%-22s %3s %18s %18s %18s %18s %18s %18s\n", "shape", "M", "v1 dp4a", "v2 NT=1", "v2 NT=2", "v2 NT=4",
           "v2 NT=2 requant", "v2 NT=2 swiglu");
    for (const Shape & s : kShapes) {
        const int kb = s.K / 2;
        const size_t wbytes = (size_t) s.N * kb;
        const int R = rotation_count(wbytes);
        Dev w(wbytes * R), a((size_t) 16 * kb), sc(s.N * 4), y((size_t) 16 * s.N * 4);
        CUDA_CHECK(cudaMemset(w.p, 0x37, wbytes * R));
        CUDA_CHECK(cudaMemset(a.p, 0x59, (size_t) 16 * kb));
        std::vector<float> one(s.N, 1e-3f);
        CUDA_CHECK(cudaMemcpy(sc.p, one.data(), s.N * 4, cudaMemcpyHostToDevice));
        auto wp = [&](int i) { return (const void *) (w.as<uint8_t>() + (i % R) * wbytes); };
        for (int M : {1, 2, 4, 8, 16}) {
            printf("%-22s %3d", s.name, M);
            const size_t io = wbytes + (size_t) M * kb + (size_t) M * s.N * 4;
            auto show = [&](float us, size_t bytes) {
                printf("  %6.2f %5.0f %3.0f%%", us, bytes / us * 1e-3, 100.0 * bytes / us * 1e-3 / g_read_gbs);
            };
            show(time_us([&](int i, cudaStream_t st) {
                w4a4_v1<<<(s.N * 32 + 255) / 256, 256, 0, st>>>(a.as<uint8_t>(), (const uint8_t *) wp(i), sc.as<float>(), y.as<float>(), M, s.N, kb);
            }), io);
            show(time_us([&](int i, cudaStream_t st) { launch_v2<FmtI4, 1, EPI_F32>(a.p, wp(i), sc.as<float>(), y.p, M, s.N, kb, st); }), io);
            show(time_us([&](int i, cudaStream_t st) { launch_v2<FmtI4, 2, EPI_F32>(a.p, wp(i), sc.as<float>(), y.p, M, s.N, kb, st); }), io);
            show(time_us([&](int i, cudaStream_t st) { launch_v2<FmtI4, 4, EPI_F32>(a.p, wp(i), sc.as<float>(), y.p, M, s.N, kb, st); }), io);
            show(time_us([&](int i, cudaStream_t st) { launch_v2<FmtI4, 2, EPI_Q4>(a.p, wp(i), sc.as<float>(), y.p, M, s.N, kb, st); }),
                 wbytes + (size_t) M * kb + (size_t) M * s.N / 2);
            show(time_us([&](int i, cudaStream_t st) { launch_v2<FmtI4, 2, EPI_SWIGLU_Q4>(a.p, wp(i), sc.as<float>(), y.p, M, s.N, kb, st); }),
                 wbytes + (size_t) M * kb + (size_t) M * s.N / 4);
            printf("\n");
            CUDA_CHECK(cudaGetLastError());
        }
    }
}

static void bench_f16() {
    printf("\nf16 decode GEMV: µs per call, GB/s, %% of the read ceiling\n");
    printf("%-22s %3s %18s %18s %18s\n", "shape", "M", "v1 fp32 x", "v2 mma NT=1", "v2 mma NT=2");
    for (const Shape & s : kShapes) {
        const size_t wbytes = (size_t) s.N * s.K * 2;
        const int R = rotation_count(wbytes);
        Dev w(wbytes * R), x((size_t) 16 * s.K * 4), y((size_t) 16 * s.N * 4);
        CUDA_CHECK(cudaMemset(w.p, 0x2C, wbytes * R));  // 0x2C2C: a small normal fp16
        CUDA_CHECK(cudaMemset(x.p, 0x3C, (size_t) 16 * s.K * 4));
        auto wp = [&](int i) { return (const void *) (w.as<uint8_t>() + (i % R) * wbytes); };
        for (int M : {1, 4, 16}) {
            printf("%-22s %3d", s.name, M);
            auto show = [&](float us, size_t bytes) {
                printf("  %6.2f %5.0f %3.0f%%", us, bytes / us * 1e-3, 100.0 * bytes / us * 1e-3 / g_read_gbs);
            };
            show(time_us([&](int i, cudaStream_t st) {
                f16_v1<<<(s.N * 32 + 255) / 256, 256, 0, st>>>(x.as<float>(), (const __half *) wp(i), y.as<float>(), M, s.N, s.K);
            }), wbytes + (size_t) M * s.K * 4 + (size_t) M * s.N * 4);
            show(time_us([&](int i, cudaStream_t st) { launch_v2<FmtF16, 1, EPI_F32>(x.p, wp(i), nullptr, y.p, M, s.N, 2 * s.K, st); }),
                 wbytes + (size_t) M * s.K * 2 + (size_t) M * s.N * 4);
            show(time_us([&](int i, cudaStream_t st) { launch_v2<FmtF16, 2, EPI_F32>(x.p, wp(i), nullptr, y.p, M, s.N, 2 * s.K, st); }),
                 wbytes + (size_t) M * s.K * 2 + (size_t) M * s.N * 4);
            printf("\n");
            CUDA_CHECK(cudaGetLastError());
        }
    }
}

int main(int argc, char ** argv) {
    const bool quick = argc > 1 && strcmp(argv[1], "--check") == 0;
    print_device();
    float copy_gbs;
    measure_bandwidth(g_read_gbs, copy_gbs);
    printf("streaming read %.0f GB/s, device copy %.0f GB/s (read + write)\n\n", g_read_gbs, copy_gbs);

    printf("checks (outputs poisoned before each launch):\n");
    check_w4a4(72, 64, 1);       // one tile, one chunk of 32 bytes
    check_w4a4(200, 192, 2);     // rows past the last full tile, K % 128 == 64
    check_w4a4(1040, 4160, 3);
    check_w4a4(4096, 11008, 4);  // the down projection
    check_f16(200, 192, 5);
    check_f16(4096, 4096, 6);
    if (!quick) {
        bench_w4a4();
        bench_f16();
    }
    printf("\n%d passed, %d failed\n", g_passes, g_failures);
    return g_failures ? 1 : 0;
}
