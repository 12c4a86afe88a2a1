/*
Prefill GEMM kernels (M = 512..2048 tokens) for the w4a4 and f16 linear schemes, on tensor cores.

  w4a4: y[m][n] = float(sum_k a[m][k]·w[n][k]) · scale[n]; A [M][K] and W [N][K] int4, two per byte along
        K, low nibble = even k (the decode GEMV's layout: no repacking between prefill and decode). On
        sm_90 the nibbles are unpacked in registers to int8 lanes holding 16·x and multiplied with
        mma.m16n8k32 s8 (INT8 tensor cores); the product sum is 256 times the true one, shifted back
        exactly. Fused requantization epilogue: q = clamp(rint(float(acc)·rscale[n]), -8, 7), packed.
        The native mma.m16n8k64 s4 path (fast on sm_80/86/89) is built and checked too; on sm_90 it runs
        in an emulation routine and is timed only to show that.
  f16:  y[m][n] = sum_k x[m][k]·w[n][k], fp16 x and W, fp32 accumulation (mma.m16n8k16).

Kernel: a 128x128 output tile per block of 8 warps (2 x 4, warp tile 64x32), K in chunks of 64 bytes per
row (128 int4 or 32 fp16 values) staged in shared memory by cp.async (zero-filled past M, N and K),
STAGES deep; fragments are read with 16-byte shared loads (a quarter-warp reads 128 contiguous bytes:
no bank conflicts) and used as frag.cuh describes.
  v1  2 stages (double buffering)
  v2  4 stages

Build and run: make -C bench/kernels && bench/kernels/build/gemm
*/
#include "frag.cuh"
#include "lab.cuh"

#include <cuda_fp16.h>

#include <cmath>

enum Epi { EPI_F32, EPI_Q4 };

__device__ __forceinline__ void cp_async16(void * smem, const void * gmem, int src_bytes) {
    const uint32_t s = (uint32_t) __cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <class Fmt, int STAGES, int EPI>
__global__ void __launch_bounds__(256) gemm_mma(const uint8_t * __restrict__ A, const uint8_t * __restrict__ B,
                                                const float * __restrict__ scale, void * __restrict__ y, int M,
                                                int N, int kb) {
    constexpr int BM = 128, BN = 128, ROWS = BM + BN;  // a stage: ROWS rows of 64 bytes (4 uint4)
    using acc_t = typename Fmt::acc_t;
    extern __shared__ uint4 smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int nk = (kb + 63) / 64;

    // each thread copies 4 of the stage's 1024 16-byte pieces: piece p = tid + 256 i is row p / 4, part p % 4
    const uint8_t * src[4];
    bool src_ok[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int row = (tid + 256 * i) >> 2;
        const int gr = row < BM ? m0 + row : n0 + row - BM;
        src_ok[i] = gr < (row < BM ? M : N);
        src[i] = (row < BM ? A : B) + (size_t) (src_ok[i] ? gr : 0) * kb;
    }
    auto load = [&](int stage, int kt) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int koff = kt * 64 + 16 * (tid & 3);
            const bool ok = src_ok[i] && koff < kb;
            cp_async16(&smem[(stage * ROWS) * 4 + tid + 256 * i], src[i] + (ok ? koff : 0), ok ? 16 : 0);
        }
    };

    acc_t c[4][4][4] = {};
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nk) load(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt landed for every thread; stage kt-1 is no longer read by anyone
        if (kt + STAGES - 1 < nk) load((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        cp_async_commit();

        const uint4 * st = smem + (kt % STAGES) * ROWS * 4;
        uint4 ra[4][2], rb[4];
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {
            ra[mt][0] = st[(wm * 64 + mt * 16 + g) * 4 + t];
            ra[mt][1] = st[(wm * 64 + mt * 16 + g + 8) * 4 + t];
        }
#pragma unroll
        for (int nt = 0; nt < 4; nt++) rb[nt] = st[(BM + wn * 32 + nt * 8 + g) * 4 + t];
#pragma unroll
        for (int s = 0; s < Fmt::steps; s++) {
            uint32_t af[4][4], bf[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; mt++) Fmt::a_frag(ra[mt][0], ra[mt][1], s, af[mt]);
#pragma unroll
            for (int nt = 0; nt < 4; nt++) Fmt::b_frag(rb[nt], s, bf[nt]);
#pragma unroll
            for (int mt = 0; mt < 4; mt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++) Fmt::mma(c[mt][nt], af[mt], bf[nt]);
        }
    }
    cp_async_wait<0>();

    auto value = [&](acc_t s, int col) {  // float(acc) · scale[col]: the one fp32 multiply
        float f;
        if constexpr (Fmt::shift > 0) f = (float) (s >> Fmt::shift); else f = (float) s;
        return scale ? f * scale[col] : f;
    };
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int m = m0 + wm * 64 + mt * 16 + g + 8 * h, n = n0 + wn * 32 + nt * 8 + 2 * t;
                if (m >= M || n >= N) continue;
                const acc_t s0 = c[mt][nt][2 * h], s1 = c[mt][nt][2 * h + 1];
                if (EPI == EPI_F32) {
                    *(float2 *) ((float *) y + (size_t) m * N + n) = make_float2(value(s0, n), value(s1, n + 1));
                } else {
                    const int q0 = max(-8, min(7, __float2int_rn(value(s0, n))));
                    const int q1 = max(-8, min(7, __float2int_rn(value(s1, n + 1))));
                    ((uint8_t *) y)[(size_t) m * (N / 2) + n / 2] = (uint8_t) ((q0 & 15) | ((q1 & 15) << 4));
                }
            }
}

template <class Fmt, int STAGES, int EPI>
static void gemm(const void * a, const void * w, const float * scale, void * y, int M, int N, int kb, cudaStream_t st) {
    const int smem = STAGES * 256 * 64;
    static bool attr = false;
    if (!attr) {
        CUDA_CHECK(cudaFuncSetAttribute(gemm_mma<Fmt, STAGES, EPI>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        attr = true;
    }
    gemm_mma<Fmt, STAGES, EPI><<<dim3((N + 127) / 128, (M + 127) / 128), 256, smem, st>>>(
        (const uint8_t *) a, (const uint8_t *) w, scale, y, M, N, kb);
}

// ---------------------------------------------------------------------------------------------------
// host: CPU references (every entry for small shapes, a sample of entries for the Llama shapes)

static inline int nibble(const uint8_t * row, int64_t k) {
    int v = (row[k >> 1] >> ((k & 1) * 4)) & 15;
    return v >= 8 ? v - 16 : v;
}
static int32_t ref_dot_i4(const uint8_t * a, const uint8_t * w, int K) {
    int32_t s = 0;
    for (int k = 0; k < K; k++) s += nibble(a, k) * nibble(w, k);
    return s;
}
static double ref_dot_f16(const __half * a, const __half * w, int K) {
    double s = 0;
    for (int k = 0; k < K; k++) s += (double) __half2float(a[k]) * __half2float(w[k]);
    return s;
}

struct Dev {
    void * p = nullptr;
    explicit Dev(size_t bytes) { CUDA_CHECK(cudaMalloc(&p, bytes)); }
    ~Dev() { cudaFree(p); }
    template <class T> T * as() const { return (T *) p; }
};

static int g_passes = 0, g_failures = 0;
static void report(const char * what, bool ok) {
    (ok ? g_passes : g_failures)++;
    printf("  %-66s %s\n", what, ok ? "ok" : "FAILED");
}

// (m, n) pairs to check: all of them when the product is small, else 2048 random ones plus the corners
static std::vector<std::pair<int, int>> check_points(int M, int N, Rng & rng) {
    std::vector<std::pair<int, int>> pts;
    if ((int64_t) M * N <= 200000) {
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) pts.push_back({m, n});
    } else {
        for (int i = 0; i < 2048; i++) pts.push_back({(int) (rng.next() % M), (int) (rng.next() % N)});
        pts.push_back({0, 0}), pts.push_back({M - 1, N - 1}), pts.push_back({M - 1, 0}), pts.push_back({0, N - 1});
    }
    return pts;
}

static void check_w4a4(int M, int N, int K, uint64_t seed) {
    const int kb = K / 2;
    Rng rng(seed);
    std::vector<uint8_t> a((size_t) M * kb), w((size_t) N * kb);
    for (auto & v : a) v = (uint8_t) rng.next();
    for (auto & v : w) v = (uint8_t) rng.next();
    std::vector<float> scale(N), rscale(N);
    const float sd = std::sqrt((float) K) * 21.5f;
    for (int n = 0; n < N; n++) scale[n] = (0.5f + rng.uniform()) / sd, rscale[n] = (0.5f + rng.uniform()) * 4.0f / sd;
    Dev da(a.size()), dw(w.size()), ds(N * 4), drs(N * 4), dy((size_t) M * N * 4);
    CUDA_CHECK(cudaMemcpy(da.p, a.data(), a.size(), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dw.p, w.data(), w.size(), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(ds.p, scale.data(), N * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(drs.p, rscale.data(), N * 4, cudaMemcpyHostToDevice));
    const auto pts = check_points(M, N, rng);
    std::vector<int32_t> acc(pts.size());
    parallel_for(pts.size(), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) acc[i] = ref_dot_i4(&a[(size_t) pts[i].first * kb], &w[(size_t) pts[i].second * kb], K);
    });
    auto run = [&](const char * name, bool requant, const std::function<void()> & launch) {
        bool ok = true;
        for (int poison : {0x5A, 0xA5}) {  // an unwritten byte cannot match both
            CUDA_CHECK(cudaMemset(dy.p, poison, (size_t) M * N * 4));
            launch();
            CUDA_CHECK(cudaGetLastError());
            if (!requant) {
                std::vector<float> y((size_t) M * N);
                CUDA_CHECK(cudaMemcpy(y.data(), dy.p, y.size() * 4, cudaMemcpyDeviceToHost));
                for (size_t i = 0; i < pts.size(); i++) {
                    const float r = (float) acc[i] * scale[pts[i].second];
                    ok &= memcmp(&r, &y[(size_t) pts[i].first * N + pts[i].second], 4) == 0;
                }
            } else {
                std::vector<uint8_t> y((size_t) M * N / 2);
                CUDA_CHECK(cudaMemcpy(y.data(), dy.p, y.size(), cudaMemcpyDeviceToHost));
                for (size_t i = 0; i < pts.size(); i++) {
                    const int r = std::min(7, std::max(-8, (int) std::nearbyint((float) acc[i] * rscale[pts[i].second])));
                    ok &= nibble(&y[(size_t) pts[i].first * N / 2], pts[i].second) == r;
                }
            }
        }
        char buf[160];
        snprintf(buf, sizeof buf, "%s M=%d N=%d K=%d (%zu entries) %s", name, M, N, K, pts.size(),
                 requant ? "codes identical" : "bit-exact");
        report(buf, ok);
    };
    run("w4a4 v1", false, [&] { gemm<FmtI4, 2, EPI_F32>(da.p, dw.p, ds.as<float>(), dy.p, M, N, kb, 0); });
    run("w4a4 v2", false, [&] { gemm<FmtI4, 4, EPI_F32>(da.p, dw.p, ds.as<float>(), dy.p, M, N, kb, 0); });
    run("w4a4 v2 requant", true, [&] { gemm<FmtI4, 4, EPI_Q4>(da.p, dw.p, drs.as<float>(), dy.p, M, N, kb, 0); });
    run("w4a4 native s4", false, [&] { gemm<FmtI4Native, 4, EPI_F32>(da.p, dw.p, ds.as<float>(), dy.p, M, N, kb, 0); });
}

static void check_f16(int M, int N, int K, uint64_t seed) {
    Rng rng(seed);
    std::vector<__half> a((size_t) M * K), w((size_t) N * K);
    for (auto & v : a) v = __float2half(rng.uniform() * 2 - 1);
    for (auto & v : w) v = __float2half((rng.uniform() * 2 - 1) * 0.05f);
    Dev da(a.size() * 2), dw(w.size() * 2), dy((size_t) M * N * 4);
    CUDA_CHECK(cudaMemcpy(da.p, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dw.p, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    const auto pts = check_points(M, N, rng);
    std::vector<double> ref(pts.size());
    parallel_for(pts.size(), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) ref[i] = ref_dot_f16(&a[(size_t) pts[i].first * K], &w[(size_t) pts[i].second * K], K);
    });
    for (int v = 1; v <= 2; v++) {
        CUDA_CHECK(cudaMemset(dy.p, 0xFF, (size_t) M * N * 4));  // NaN
        if (v == 1) gemm<FmtF16, 2, EPI_F32>(da.p, dw.p, nullptr, dy.p, M, N, 2 * K, 0);
        else gemm<FmtF16, 4, EPI_F32>(da.p, dw.p, nullptr, dy.p, M, N, 2 * K, 0);
        CUDA_CHECK(cudaGetLastError());
        std::vector<float> y((size_t) M * N);
        CUDA_CHECK(cudaMemcpy(y.data(), dy.p, y.size() * 4, cudaMemcpyDeviceToHost));
        double num = 0, den = 0;
        bool finite = true;
        for (float f : y) finite &= std::isfinite(f);
        for (size_t i = 0; i < pts.size(); i++) {
            const double d = y[(size_t) pts[i].first * N + pts[i].second] - ref[i];
            num += d * d, den += ref[i] * ref[i];
        }
        const double rel = std::sqrt(num / den);
        char buf[160];
        snprintf(buf, sizeof buf, "f16 v%d M=%d N=%d K=%d (%zu entries) rel.err %.2e", v, M, N, K, pts.size(), rel);
        report(buf, finite && rel < 1e-4);
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

static void bench() {
    printf("\nprefill GEMM: µs per call (graph of 5, median of 7) and TOPS (w4a4) / TFLOPS (f16) = 2MNK / t\n");
    printf("%-20s %5s %15s %15s %15s %15s %15s\n", "shape", "M", "w4a4 v1", "w4a4 v2", "v2 requant", "native s4",
           "f16 v2");
    for (const Shape & s : kShapes) {
        for (int M : {512, 1024, 2048}) {
            Dev a((size_t) M * s.K * 2), w((size_t) s.N * s.K * 2), sc(s.N * 4), y((size_t) M * s.N * 4);
            CUDA_CHECK(cudaMemset(a.p, 0x5B, (size_t) M * s.K * 2));  // non-zero codes; 0x5B5B is a normal fp16
            CUDA_CHECK(cudaMemset(w.p, 0x2D, (size_t) s.N * s.K * 2));
            std::vector<float> one(s.N, 1e-4f);
            CUDA_CHECK(cudaMemcpy(sc.p, one.data(), s.N * 4, cudaMemcpyHostToDevice));
            const double ops = 2.0 * M * s.N * s.K;
            const int kb4 = s.K / 2;
            printf("%-20s %5d", s.name, M);
            auto show = [&](float us) { printf("  %7.1f %6.0f", us, ops / us * 1e-6); };
            show(time_us([&](int, cudaStream_t st) { gemm<FmtI4, 2, EPI_F32>(a.p, w.p, sc.as<float>(), y.p, M, s.N, kb4, st); }, 5, 7));
            show(time_us([&](int, cudaStream_t st) { gemm<FmtI4, 4, EPI_F32>(a.p, w.p, sc.as<float>(), y.p, M, s.N, kb4, st); }, 5, 7));
            show(time_us([&](int, cudaStream_t st) { gemm<FmtI4, 4, EPI_Q4>(a.p, w.p, sc.as<float>(), y.p, M, s.N, kb4, st); }, 5, 7));
            if (M == 512) show(time_us([&](int, cudaStream_t st) { gemm<FmtI4Native, 4, EPI_F32>(a.p, w.p, sc.as<float>(), y.p, M, s.N, kb4, st); }, 2, 3));
            else printf("  %14s", "-");
            show(time_us([&](int, cudaStream_t st) { gemm<FmtF16, 4, EPI_F32>(a.p, w.p, nullptr, y.p, M, s.N, 2 * s.K, st); }, 5, 7));
            printf("\n");
            CUDA_CHECK(cudaGetLastError());
        }
    }
}

int main(int argc, char ** argv) {
    const bool quick = argc > 1 && strcmp(argv[1], "--check") == 0;
    print_device();
    printf("checks (outputs poisoned before each launch):\n");
    check_w4a4(1, 8, 64, 1);
    check_w4a4(200, 136, 192, 2);     // partial tiles in M and N, K % 128 == 64
    check_w4a4(300, 520, 4160, 3);
    check_w4a4(2048, 4096, 11008, 4);  // the down projection, sampled
    check_f16(200, 136, 200, 5);
    check_f16(1024, 4096, 4096, 6);
    if (!quick) bench();
    printf("\n%d passed, %d failed\n", g_passes, g_failures);
    return g_failures ? 1 : 0;
}
