// Schemes w4a8 and w4a8g on tensor cores (linear-w4a8.cuh; docs/numerics.md, "Dynamic int8 activations"): int8
// activation codes (quantized per token by linear-int8.cu) times the file's packed int4 weights, on INT8 tensor
// cores with the FmtA8W4 fragments of mma.cuh: the int4 weights are widened in registers (16·q lanes, as FmtI4),
// the activations sorted into even and odd k by byte_perm, and the int32 sum (16 times the true one) shifted back.
// w4a8g sums each 64 k apart and adds it times its group scale gscale[n, k / group] (an exact integer either way:
// the same acc as the CPU's). The epilogue is the CPU's: y = (float(acc) * scale[n]) * step[m].
//  - decode (m <= 16): GEMV; a block of 8 warps owns 16 weight rows and the warps split K, each thread keeps 2
//    chunks x 2 tiles of weights (a 16-byte piece a chunk, or two 8-byte ones where groups of 64 k must end on a
//    step: the fragments' k order) and the matching activation pieces in flight; partial sums meet in shared
//    memory (integer sums: exact in any order). Launched with PDL.
//  - prefill (m > 16): the tiled GEMM of gemm-mma.cuh (gemm_a8w4_main); from m = 64 linear-int8.cu takes cuBLAS's
//    int8 GEMM instead where cuBLAS is found (gemm-cublas-i8.cuh).
#include "linear-w4a8.cuh"
#include "cuda-common.cuh"
#include "gemm-mma.cuh"
#include "mma.cuh"
#include "splitk.cuh"

#include <atomic>
#include <cstdlib>
#include <string>

namespace mq {

namespace {

constexpr int A8_WARPS = 8, A8_NT = 2, A8_U = 2, A8_MAX_M = W4A8_GEMV_MAX_M;
constexpr int A8_THREADS = A8_WARPS * 32;

// a holds int8 codes [M, kp] and row_scale their steps (per token). HI8: M > 8 (else the A rows g + 8 are never
// written: row g's registers stand in). CONTIG: the thread's k of a chunk (w4a8_gemv_contiguous). Dynamic shared
// memory: the block's 16 rows of group scales (grouped: 16·ng). bias (or nullptr) is added last, as the CPU does:
// y = v + bias[n], accumulate y = y + (v + bias[n]).
template <class Fmt, bool HI8, bool CONTIG>
__global__ void __launch_bounds__(A8_THREADS, 3) gemv_w4a8_kernel(const uint8_t * __restrict__ a,
                                                                  const uint8_t * __restrict__ w,
                                                                  const uint8_t * __restrict__ gscale, int ng, int group,
                                                                  const float * __restrict__ scale,
                                                                  const float * __restrict__ row_scale,
                                                                  const float * __restrict__ bias, float * __restrict__ y,
                                                                  int M, int N, int kb, int accumulate, int prefetch) {
    pdl_trigger();
    constexpr int NT = A8_NT, U = A8_U;
    const int ka = 2 * kb;  // kp: bytes of an activation row (one code a byte)
    extern __shared__ uint4 a8_smem[];
    uint8_t * gs_s = (uint8_t *) a8_smem;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bx = blockIdx.x;
    const uint8_t * wp[NT];
#pragma unroll
    for (int i = 0; i < NT; i++) wp[i] = w + (size_t) min((bx * NT + i) * 8 + g, N - 1) * kb;
    if (prefetch) {  // the first batch's weight lines (8·NT rows x up to A8_WARPS·U·64 bytes)
        constexpr int LINES = A8_WARPS * U * 64 / 128;
        for (int r = threadIdx.x; r < NT * 8 * LINES; r += blockDim.x) {
            const int row = r / LINES, o = (r % LINES) * 128;
            if (o < kb) prefetch_l2(w + (size_t) min(bx * NT * 8 + row, N - 1) * kb + o);
        }
    }
    if constexpr (Fmt::grouped) {  // the block's group scales (weights: no need to wait for the kernel before)
        for (int r = threadIdx.x; r < 8 * NT * ng; r += blockDim.x) {
            gs_s[r] = gscale[(size_t) min(bx * NT * 8 + r / ng, N - 1) * ng + r % ng];
        }
    }
    pdl_wait();  // the activations and y are written by earlier kernels
    if constexpr (Fmt::grouped) __syncthreads();  // the group scales are in
    const uint8_t * ap0 = a + (size_t) min(g, M - 1) * ka;
    const uint8_t * ap8 = a + (size_t) min(g + 8, M - 1) * ka;
    // w4a8g: the group scales of this thread's accumulator columns (bx·NT + i)·8 + 2t + j, in shared memory
    const uint8_t * gsp[NT][2];
    if constexpr (Fmt::grouped) {
#pragma unroll
        for (int i = 0; i < NT; i++)
#pragma unroll
            for (int j = 0; j < 2; j++) gsp[i][j] = gs_s + (i * 8 + 2 * t + j) * ng;
    }

    int32_t c[NT][4] = {};
    const int nchunk = (kb + 63) / 64;
    const uint4 z = make_uint4(0, 0, 0, 0);
    const bool whole_chunks = group % 128 == 0;  // w4a8g: a chunk (128 k) lies in one group
    for (int c0 = warp; c0 < nchunk; c0 += A8_WARPS * U) {
        uint4 ra0[U][2], ra8[U][2], rb[U][NT];
#pragma unroll
        for (int u = 0; u < U; u++) {  // the batch's loads first (clamped offsets, no branches)
            const int o = (c0 + u * A8_WARPS) * 64;  // the chunk's first byte in a weight row
            if constexpr (CONTIG) {  // the thread's 16 weight bytes at 16t (k 32t..32t+31), their 32 code bytes
                const int ob = min(o + 16 * t, kb - 16);
                ra0[u][0] = ld_cached(ap0 + 2 * ob), ra0[u][1] = ld_cached(ap0 + 2 * ob + 16);
                if constexpr (HI8) ra8[u][0] = ld_cached(ap8 + 2 * ob), ra8[u][1] = ld_cached(ap8 + 2 * ob + 16);
#pragma unroll
                for (int i = 0; i < NT; i++) rb[u][i] = ld_stream(wp[i] + ob);
            } else {  // the halves: 8 weight bytes at 8t and at 32 + 8t, 16 code bytes of each
                const int o0 = min(o, kb - 32), o1 = min(o + 32, kb - 32);  // kb % 32 == 0
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
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int o = (c0 + u * A8_WARPS) * 64;
#pragma unroll
            for (int h = 0; h < 2; h++) {  // past the end of K: the products are 0
                if (CONTIG ? o + 16 * t >= kb : o + 32 * h >= kb) ra0[u][h] = z;
                if constexpr (HI8) {
                    if (CONTIG ? o + 16 * t >= kb : o + 32 * h >= kb) ra8[u][h] = z;
                } else {
                    ra8[u][h] = ra0[u][h];
                }
            }
            int32_t ch[NT][4];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (h == 0 || !whole_chunks) {
#pragma unroll
                    for (int i = 0; i < NT; i++)
#pragma unroll
                        for (int e = 0; e < 4; e++) ch[i][e] = 0;
                }
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
                // the group's sum (this half, or the whole chunk where groups are whole chunks), shifted back, times
                // its group scale
                if (Fmt::grouped && (h == 1 || !whole_chunks)) {
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
        const int m = (l >> 2) + 8 * h, n0 = (bx * NT + i) * 8 + 2 * (l & 3);
        if (m < M) {
            const float rs = row_scale[m];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int n = n0 + j;
                if (n >= N) break;
                // (float(acc) * scale[n]) * step[m] (+ bias[n]), each operation rounded on its own, as the CPU backend
                float v = __fmul_rn(gemm_value<Fmt>(splitk_sum<int32_t, A8_WARPS, NT>(red, i, 2 * h + j, l), scale, n), rs);
                if (bias) v = __fadd_rn(v, bias[n]);
                float * yo = y + (size_t) m * N + n;
                *yo = accumulate ? __fadd_rn(*yo, v) : v;
            }
        }
    }
}

// The thread's k of a 128-k chunk (mma.cuh, FmtA8W4): 32t..32t+31 (CONTIG: one 16-byte weight load, w4a4's pattern)
// where a chunk lies in one group (w4a8; w4a8g with group % 128 == 0), else 16t.. and 64+16t.. (a group of 64 ends on
// a step). MERGEQUANT_W4A8_CONTIG=0 takes the second everywhere (for comparisons).
bool w4a8_gemv_contiguous(int group) {
    static const bool allowed = [] {
        const char * env = std::getenv("MERGEQUANT_W4A8_CONTIG");
        return !(env && std::string(env) == "0");
    }();
    return allowed && group % 128 == 0;
}

template <class Fmt, bool CONTIG> auto gemv_pick(int32_t m) {
    return m > 8 ? gemv_w4a8_kernel<Fmt, true, CONTIG> : gemv_w4a8_kernel<Fmt, false, CONTIG>;
}

template <class Fmt>
void launch_w4a8(const void * qweight, const uint8_t * gscale, int ng, int group, const float * scale,
                 const float * row_scale, const float * bias, int64_t n, int kb, const int8_t * a, int32_t m, float * y,
                 bool accumulate, cudaStream_t st) {
    if (m <= A8_MAX_M) {
        const size_t smem = (size_t) 16 * ng;  // the block's rows of group scales
        const auto f = w4a8_gemv_contiguous(Fmt::grouped ? group : 0) ? gemv_pick<Fmt, true>(m) : gemv_pick<Fmt, false>(m);
        launch_pdl(f, dim3((unsigned) ceil_div(n, 8 * A8_NT)), dim3(A8_THREADS), smem, st, "gemv_w4a8_kernel",
                   (const uint8_t *) a, (const uint8_t *) qweight, gscale, ng, group, scale, row_scale, bias, y, (int) m,
                   (int) n, kb, accumulate ? 1 : 0, cuda_pdl_mode() == 2 ? 1 : 0);
        return;
    }
    if (bias) throw Error("CUDA w4a8 linear: a bias is added by the GEMV (m <= 16) only");
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

void check_w4a8(const uint8_t * gscale, int64_t group, int64_t n, int64_t kp) {
    if (kp % 64 != 0 || kp <= 0 || kp > 131072 || n <= 0 || (gscale && (group <= 0 || group % 64 != 0 || kp % group != 0))) {
        throw Error("CUDA w4a8 linear: K = " + std::to_string(kp) + " must be a positive multiple of 64 up to 131072 "
                    "(the int32 range of the 16x-scaled products), N = " + std::to_string(n) + " positive, the group (" +
                    std::to_string(group) + ") a multiple of 64 dividing K");
    }
}

}  // namespace

void cuda_linear_w4a8(const void * qweight, const uint8_t * gscale, int64_t group, const float * scale,
                      const float * row_scale, const float * bias, int64_t n, int64_t kp, const int8_t * a, int32_t m,
                      float * y, bool accumulate, cudaStream_t st) {
    check_w4a8(gscale, group, n, kp);
    if (m <= 0) return;
    const int ng = gscale ? (int) (kp / group) : 0;
    const auto launch = gscale ? launch_w4a8<FmtA8W4G> : launch_w4a8<FmtA8W4>;
    launch(qweight, gscale, ng, (int) group, scale, row_scale, bias, n, (int) (kp / 2), a, m, y, accumulate, st);
}

}  // namespace mq
