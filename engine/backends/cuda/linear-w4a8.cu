// Schemes w4a8 and w4a8g on tensor cores (linear-w4a8.cuh; docs/numerics.md, "Dynamic int8 activations"): int8
// activation codes (quantized per token by linear-int8.cu) times the file's packed int4 weights, on INT8 tensor
// cores with the FmtA8W4 fragments of mma.cuh: the int4 weights are widened in registers (16·q lanes, as FmtI4),
// the activations sorted into even and odd k by byte_perm, and the int32 sum (16 times the true one) shifted back.
// w4a8g sums each 64 k apart and adds it times its group scale gscale[n, k / group] (an exact integer either way:
// the same acc as the CPU's). The epilogue is the CPU's: y = (float(acc) * scale[n]) * step[m].
//  - decode (m <= 16): GEMV; a block of 8 warps owns 16 weight rows and the warps split K, each thread keeps 2
//    chunks x 2 tiles of weights (two 8-byte pieces a chunk: the fragments' k order) and the matching activation
//    pieces in flight; partial sums meet in shared memory (integer sums: exact in any order). Launched with PDL.
//  - prefill (m > 16): the tiled GEMM of gemm-mma.cuh (gemm_a8w4_main).
#include "linear-w4a8.cuh"
#include "cuda-common.cuh"
#include "gemm-mma.cuh"
#include "mma.cuh"
#include "splitk.cuh"

#include <atomic>
#include <string>

namespace mq {

namespace {

constexpr int A8_WARPS = 8, A8_NT = 2, A8_U = 2, A8_MAX_M = 16;

// HI8: M > 8 (else the A rows g + 8 are never written: row g's registers stand in)
template <class Fmt, bool HI8>
__global__ void __launch_bounds__(256, 3) gemv_w4a8_kernel(const int8_t * __restrict__ a, const uint8_t * __restrict__ w,
                                                           const uint8_t * __restrict__ gscale, int ng, int group,
                                                           const float * __restrict__ scale,
                                                           const float * __restrict__ row_scale, float * __restrict__ y,
                                                           int M, int N, int kb, int accumulate, int prefetch) {
    pdl_trigger();
    constexpr int NT = A8_NT, U = A8_U;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bx = blockIdx.x;
    const size_t ka = 2 * (size_t) kb;  // bytes of an activation row (one code a byte)
    // rows past M or N are read from a valid row and only feed outputs that are never written
    const uint8_t * ap0 = (const uint8_t *) a + (size_t) min(g, M - 1) * ka;
    const uint8_t * ap8 = (const uint8_t *) a + (size_t) min(g + 8, M - 1) * ka;
    const uint8_t * wp[NT];
#pragma unroll
    for (int i = 0; i < NT; i++) wp[i] = w + (size_t) min((bx * NT + i) * 8 + g, N - 1) * kb;
    // w4a8g: the group scales of this thread's accumulator columns (bx·NT + i)·8 + 2t + j
    const uint8_t * gsp[NT][2];
    if constexpr (Fmt::grouped) {
#pragma unroll
        for (int i = 0; i < NT; i++)
#pragma unroll
            for (int j = 0; j < 2; j++) gsp[i][j] = gscale + (size_t) min((bx * NT + i) * 8 + 2 * t + j, N - 1) * ng;
    }
    if (prefetch) {  // the first batch's weight lines (8·NT rows x up to A8_WARPS·U·64 bytes)
        constexpr int LINES = A8_WARPS * U * 64 / 128;
        for (int q = threadIdx.x; q < NT * 8 * LINES; q += blockDim.x) {
            const int r = q / LINES, o = (q % LINES) * 128;
            if (o < kb) prefetch_l2(w + (size_t) min(bx * NT * 8 + r, N - 1) * kb + o);
        }
    }
    pdl_wait();  // the codes and y are written by earlier kernels

    int32_t c[NT][4] = {};
    const int nchunk = (kb + 63) / 64;
    const uint4 z = make_uint4(0, 0, 0, 0);
    for (int c0 = warp; c0 < nchunk; c0 += A8_WARPS * U) {
        uint4 ra0[U][2], ra8[U][2], rb[U][NT];
#pragma unroll
        for (int u = 0; u < U; u++) {  // the batch's loads first (clamped offsets, no branches)
            const int o = (c0 + u * A8_WARPS) * 64;           // the chunk's first byte in a weight row
            const int o0 = min(o, kb - 32), o1 = min(o + 32, kb - 32);  // its two halves (kb % 32 == 0)
            ra0[u][0] = ld_cached(ap0 + 2 * o0 + 16 * t);
            ra0[u][1] = ld_cached(ap0 + 2 * o1 + 16 * t);
            if constexpr (HI8) {
                ra8[u][0] = ld_cached(ap8 + 2 * o0 + 16 * t);
                ra8[u][1] = ld_cached(ap8 + 2 * o1 + 16 * t);
            }
#pragma unroll
            for (int i = 0; i < NT; i++) {
                const uint2 b0 = ld_stream8(wp[i] + o0 + 8 * t), b1 = ld_stream8(wp[i] + o1 + 8 * t);
                rb[u][i] = make_uint4(b0.x, b0.y, b1.x, b1.y);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int o = (c0 + u * A8_WARPS) * 64;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (o + 32 * h >= kb) ra0[u][h] = z;  // past the end of K: the products are 0
                if constexpr (HI8) {
                    if (o + 32 * h >= kb) ra8[u][h] = z;
                } else {
                    ra8[u][h] = ra0[u][h];
                }
            }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int32_t ch[NT][4] = {};
#pragma unroll
                for (int q = 0; q < 2; q++) {
                    uint32_t af[4];
                    Fmt::a_frag(ra0[u], ra8[u], 2 * h + q, af);
#pragma unroll
                    for (int i = 0; i < NT; i++) {
                        uint32_t bf[2];
                        Fmt::b_frag(rb[u][i], 2 * h + q, bf);
                        Fmt::mma(Fmt::grouped ? ch[i] : c[i], af, bf);
                    }
                }
                if constexpr (Fmt::grouped) {  // this half's sum, shifted back, times its group scale
                    const int grp = min(2 * (o + 32 * h) / group, ng - 1);
#pragma unroll
                    for (int i = 0; i < NT; i++) {
                        const int32_t g0 = gsp[i][0][grp], g1 = gsp[i][1][grp];
#pragma unroll
                        for (int e = 0; e < 4; e++) c[i][e] += (e & 1 ? g1 : g0) * (ch[i][e] >> 4);
                    }
                }
            }
        }
    }

    __shared__ SplitK<int32_t, A8_WARPS, NT> red;
    splitk_store<int32_t, A8_WARPS, NT>(red, c, warp, lane);
    // thread p: tile p / 64, lane (p / 2) % 32, register pair p % 2 (row g or g + 8, columns 2t, 2t + 1)
    const int p = threadIdx.x;
    if (p < NT * 64) {
        const int i = p >> 6, l = (p >> 1) & 31, h = p & 1;
        const int m = (l >> 2) + 8 * h, n = (bx * NT + i) * 8 + 2 * (l & 3);
        if (m < M && n < N) {
            float * yo = y + (size_t) m * N + n;
            const float rs = row_scale[m];
            // (float(acc) * scale[n]) * step[m], each product rounded on its own (__fmul_rn), as the CPU backend
            const float v0 = __fmul_rn(gemm_value<Fmt>(splitk_sum<int32_t, A8_WARPS, NT>(red, i, 2 * h, l), scale, n), rs);
            if (accumulate) yo[0] += v0; else yo[0] = v0;
            if (n + 1 < N) {
                const float v1 =
                    __fmul_rn(gemm_value<Fmt>(splitk_sum<int32_t, A8_WARPS, NT>(red, i, 2 * h + 1, l), scale, n + 1), rs);
                if (accumulate) yo[1] += v1; else yo[1] = v1;
            }
        }
    }
}

template <class Fmt>
void launch_w4a8(const void * qweight, const uint8_t * gscale, int ng, int group, const float * scale,
                 const float * row_scale, int64_t n, int kb, const int8_t * a, int32_t m, float * y, bool accumulate,
                 cudaStream_t st) {
    if (m <= A8_MAX_M) {
        const auto f = m > 8 ? gemv_w4a8_kernel<Fmt, true> : gemv_w4a8_kernel<Fmt, false>;
        launch_pdl(f, dim3((unsigned) ceil_div(n, 8 * A8_NT)), dim3(256), 0, st, "gemv_w4a8_kernel", a,
                   (const uint8_t *) qweight, gscale, ng, group, scale, row_scale, y, (int) m, (int) n, kb,
                   accumulate ? 1 : 0, cuda_pdl_mode() == 2 ? 1 : 0);
        return;
    }
    static std::atomic<uint64_t> smem_set{0};
    cuda_once_per_device(smem_set, [] {
        cuda_check(cudaFuncSetAttribute(gemm_mma_kernel<Fmt>, cudaFuncAttributeMaxDynamicSharedMemorySize, gemm_smem<Fmt>()),
                   "cudaFuncSetAttribute(gemm_mma_kernel<w4a8>)");
    });
    GemmGroups gg;
    gg.gscale = gscale, gg.ng = ng, gg.group = group;
    const dim3 grid((unsigned) ceil_div(n, GEMM_BN), (unsigned) ceil_div(m, GEMM_BM));
    gemm_mma_kernel<Fmt><<<grid, 256, gemm_smem<Fmt>(), st>>>((const uint8_t *) a, (const uint8_t *) qweight, scale, nullptr,
                                                              row_scale, y, m, (int) n, kb,
                                                              accumulate ? GEMM_ACCUMULATE : GEMM_STORE, GemmLora(), gg);
    cuda_check_launch("gemm_mma_kernel<w4a8>");
}

}  // namespace

void cuda_linear_w4a8(const void * qweight, const uint8_t * gscale, int64_t group, const float * scale,
                      const float * row_scale, int64_t n, int64_t kp, const int8_t * a, int32_t m, float * y,
                      bool accumulate, cudaStream_t st) {
    if (kp % 64 != 0 || kp <= 0 || kp > 131072 || n <= 0 || (gscale && (group <= 0 || group % 64 != 0 || kp % group != 0))) {
        throw Error("CUDA w4a8 linear: K = " + std::to_string(kp) + " must be a positive multiple of 64 up to 131072 "
                    "(the int32 range of the 16x-scaled products), N = " + std::to_string(n) + " positive, the group (" +
                    std::to_string(group) + ") a multiple of 64 dividing K");
    }
    if (m <= 0) return;
    const int kb = (int) (kp / 2);
    if (gscale) {
        launch_w4a8<FmtA8W4G>(qweight, gscale, (int) (kp / group), (int) group, scale, row_scale, n, kb, a, m, y, accumulate, st);
    } else {
        launch_w4a8<FmtA8W4>(qweight, nullptr, 0, 0, scale, row_scale, n, kb, a, m, y, accumulate, st);
    }
}

}  // namespace mq
