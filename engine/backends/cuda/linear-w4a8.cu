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
//  - prefill (m > 16): the tiled GEMM of gemm-mma.cuh (gemm_a8w4_main).
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

constexpr int A8_WARPS = 8, A8_NT = 2, A8_U = 2, A8_MAX_M = 16;
constexpr int A8_THREADS = A8_WARPS * 32;

// 16 bytes of activation codes: made by a kernel before (through the read-only path, cached in L1) or by this
// grid's producer blocks (PRODUCED: a plain load, coherent after grid_wait)
template <bool PRODUCED> __device__ __forceinline__ uint4 ld_codes(const uint8_t * p) {
    if constexpr (PRODUCED) {
        uint4 v;
        asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
        return v;
    } else {
        return ld_cached(p);
    }
}

// Producer block r of the QUANT GEMV: row r of the fp32 input x [M, K] -> int8 codes [M, ka] (zeros from K to ka)
// and step[r], per token as docs/numerics.md says (amax, inv = qmax / amax, a = clamp(rint(x · inv)), step =
// amax / qmax: the same fp32 operations as quantize_i8_kernel of linear-int8.cu), float4 loads where the rows allow
__device__ __forceinline__ void quantize_row_i8(const float * __restrict__ x, int r, int K, int ka, int qmax,
                                                uint8_t * __restrict__ codes, float * __restrict__ step) {
    __shared__ float part[A8_WARPS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float * xr = x + (size_t) r * K;
    const bool vec = (K & 3) == 0 && ((uintptr_t) x & 15) == 0;  // rows of whole, aligned float4s
    constexpr int STRIDE = 4 * A8_THREADS, B = 4;                // floats per pass of the block; float4 loads in flight
    float mx = 0.0f;
    if (vec) {  // B independent 16-byte loads a thread, then their maxima
        for (int i0 = 4 * (int) threadIdx.x; i0 < K; i0 += B * STRIDE) {
            float4 v[B];
#pragma unroll
            for (int j = 0; j < B; j++) {
                const int i = i0 + j * STRIDE;
                v[j] = i < K ? *(const float4 *) (xr + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int j = 0; j < B; j++) {
                mx = fmaxf(mx, fmaxf(fmaxf(fabsf(v[j].x), fabsf(v[j].y)), fmaxf(fabsf(v[j].z), fabsf(v[j].w))));
            }
        }
    } else {
        for (int i = threadIdx.x; i < K; i += blockDim.x) mx = fmaxf(mx, fabsf(xr[i]));
    }
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) part[warp] = mx;
    __syncthreads();
    float amax = 0.0f;
#pragma unroll
    for (int v = 0; v < A8_WARPS; v++) amax = fmaxf(amax, part[v]);
    uint8_t * out = codes + (size_t) r * ka;
    const float inv = amax > 0.0f ? __fdiv_rn((float) qmax, amax) : 0.0f;  // amax 0: every code 0
    auto code = [&](float v) -> uint32_t {
        return (uint32_t) (uint8_t) (int8_t) round_clamp(__fmul_rn(v, inv), -qmax, qmax);
    };
    if (vec) {  // the second read hits L1; 4 codes a 32-bit store (ka % 64 == 0, K % 4 == 0)
        for (int i = 4 * (int) threadIdx.x; i < ka; i += STRIDE) {
            uint32_t q = 0;
            if (i < K) {
                const float4 v = *(const float4 *) (xr + i);
                q = code(v.x) | (code(v.y) << 8) | (code(v.z) << 16) | (code(v.w) << 24);
            }
            *(uint32_t *) (out + i) = q;
        }
    } else {
        for (int i = threadIdx.x; i < ka; i += blockDim.x) out[i] = (uint8_t) (i < K ? code(xr[i]) : 0u);
    }
    if (threadIdx.x == 0) step[r] = amax > 0.0f ? __fdiv_rn(amax, (float) qmax) : 0.0f;
}

// QUANT: a is the fp32 input x [M, K]; the grid's first M blocks quantize its rows into q.codes / q.step (producer
// blocks, grid_signal) while the GEMV blocks prefetch their weights, and the GEMV blocks wait for them (grid_wait)
// before their first activation load: no quantization launch before the GEMV, and each row is read once. Else a
// holds int8 codes [M, kp] and row_scale their steps. HI8: M > 8 (else the A rows g + 8 are never written: row g's
// registers stand in). Dynamic shared memory: the block's 16 rows of group scales (grouped: 16·ng).
// bias (or nullptr) is added last, as the CPU does: y = v + bias[n], accumulate y = y + (v + bias[n]).
template <class Fmt, bool HI8, bool QUANT, bool CONTIG>
__global__ void __launch_bounds__(A8_THREADS, 3) gemv_w4a8_kernel(const void * __restrict__ a, int K, int qmax,
                                                                  const uint8_t * __restrict__ w,
                                                                  const uint8_t * __restrict__ gscale, int ng, int group,
                                                                  const float * __restrict__ scale,
                                                                  const float * __restrict__ row_scale,
                                                                  const float * __restrict__ bias, float * __restrict__ y,
                                                                  int M, int N, int kb, int accumulate, int prefetch,
                                                                  W4A8Quant q) {
    pdl_trigger();
    constexpr int NT = A8_NT, U = A8_U;
    const int ka = 2 * kb;  // kp: bytes of an activation row (one code a byte)
    if constexpr (QUANT) {
        if ((int) blockIdx.x < M) {  // a producer block
            pdl_wait();               // x comes from the kernel before
            quantize_row_i8((const float *) a, blockIdx.x, K, ka, qmax, (uint8_t *) q.codes, q.step);
            grid_signal(q.sync);
            grid_finish(q.sync);
            return;
        }
    }
    extern __shared__ uint4 a8_smem[];
    uint8_t * gs_s = (uint8_t *) a8_smem;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bx = (int) blockIdx.x - (QUANT ? M : 0);
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
    if constexpr (QUANT) {
        grid_wait(q.sync, (unsigned) M);  // the codes are made (its barrier also covers the group scales)
    } else if constexpr (Fmt::grouped) {
        __syncthreads();  // the group scales are in
    }
// rows past M or N are read from a valid row and only feed outputs that are never written
    const uint8_t * abase = QUANT ? (const uint8_t *) q.codes : (const uint8_t *) a;
    const uint8_t * ap0 = abase + (size_t) min(g, M - 1) * ka;
    const uint8_t * ap8 = abase + (size_t) min(g + 8, M - 1) * ka;
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
                ra0[u][0] = ld_codes<QUANT>(ap0 + 2 * ob), ra0[u][1] = ld_codes<QUANT>(ap0 + 2 * ob + 16);
                if constexpr (HI8) ra8[u][0] = ld_codes<QUANT>(ap8 + 2 * ob), ra8[u][1] = ld_codes<QUANT>(ap8 + 2 * ob + 16);
#pragma unroll
                for (int i = 0; i < NT; i++) rb[u][i] = ld_stream(wp[i] + ob);
            } else {  // the halves: 8 weight bytes at 8t and at 32 + 8t, 16 code bytes of each
                const int o0 = min(o, kb - 32), o1 = min(o + 32, kb - 32);  // kb % 32 == 0
                ra0[u][0] = ld_codes<QUANT>(ap0 + 2 * o0 + 16 * t);
                ra0[u][1] = ld_codes<QUANT>(ap0 + 2 * o1 + 16 * t);
                if constexpr (HI8) {
                    ra8[u][0] = ld_codes<QUANT>(ap8 + 2 * o0 + 16 * t);
                    ra8[u][1] = ld_codes<QUANT>(ap8 + 2 * o1 + 16 * t);
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
            const float rs = QUANT ? *(volatile const float *) (q.step + m) : row_scale[m];
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
    if constexpr (QUANT) grid_finish(q.sync);  // every block counts: the last one leaves the counters zeroed
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

template <class Fmt, bool CONTIG> auto gemv_pick(bool quant, int32_t m) {
    return quant ? gemv_w4a8_kernel<Fmt, false, true, CONTIG>
                 : m > 8 ? gemv_w4a8_kernel<Fmt, true, false, CONTIG> : gemv_w4a8_kernel<Fmt, false, false, CONTIG>;
}

// a is int8 codes, or (q.codes set) the fp32 input that the GEMV's producer blocks quantize into q
template <class Fmt>
void launch_w4a8(const void * qweight, const uint8_t * gscale, int ng, int group, const float * scale,
                 const float * row_scale, const float * bias, int64_t n, int kb, const void * a, const W4A8Quant & q,
                 int k, int qmax, int32_t m, float * y, bool accumulate, cudaStream_t st) {
    if (m <= A8_MAX_M) {
        const bool quant = q.codes != nullptr;
        const size_t smem = (size_t) 16 * ng;  // the block's rows of group scales
        const auto f = w4a8_gemv_contiguous(Fmt::grouped ? group : 0) ? gemv_pick<Fmt, true>(quant, m)
                                                                     : gemv_pick<Fmt, false>(quant, m);
        const unsigned blocks = (unsigned) (ceil_div(n, 8 * A8_NT) + (quant ? m : 0));
        launch_pdl(f, dim3(blocks), dim3(A8_THREADS), smem, st, "gemv_w4a8_kernel", a, k, qmax, (const uint8_t *) qweight,
                   gscale, ng, group, scale, row_scale, bias, y, (int) m, (int) n, kb, accumulate ? 1 : 0,
                   cuda_pdl_mode() == 2 ? 1 : 0, q);
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

void check_w4a8(const uint8_t * gscale, int64_t group, int64_t n, int64_t kp) {
    if (kp % 64 != 0 || kp <= 0 || kp > 131072 || n <= 0 || (gscale && (group <= 0 || group % 64 != 0 || kp % group != 0))) {
        throw Error("CUDA w4a8 linear: K = " + std::to_string(kp) + " must be a positive multiple of 64 up to 131072 "
                    "(the int32 range of the 16x-scaled products), N = " + std::to_string(n) + " positive, the group (" +
                    std::to_string(group) + ") a multiple of 64 dividing K");
    }
}

}  // namespace

void cuda_linear_w4a8(const void * qweight, const uint8_t * gscale, int64_t group, const float * scale,
                      const float * row_scale, int64_t n, int64_t kp, const int8_t * a, int32_t m, float * y,
                      bool accumulate, cudaStream_t st) {
    check_w4a8(gscale, group, n, kp);
    if (m <= 0) return;
    const int ng = gscale ? (int) (kp / group) : 0;
    const auto launch = gscale ? launch_w4a8<FmtA8W4G> : launch_w4a8<FmtA8W4>;
    launch(qweight, gscale, ng, (int) group, scale, row_scale, nullptr, n, (int) (kp / 2), a, W4A8Quant(), 0, 0, m, y,
           accumulate, st);
}

bool cuda_linear_w4a8_takes_floats(int32_t m) {
    // MERGEQUANT_W4A8_FUSED_QUANT=0: the quantization pass before the GEMV instead (for comparisons)
    static const bool fused = [] {
        const char * env = std::getenv("MERGEQUANT_W4A8_FUSED_QUANT");
        return !(env && std::string(env) == "0");
    }();
    return fused && m >= 1 && m <= W4A8_QUANT_MAX_M;
}

void cuda_linear_w4a8_floats(const void * qweight, const uint8_t * gscale, int64_t group, const float * scale,
                             const float * bias, int64_t n, int64_t k, int64_t kp, int32_t qmax, const float * x,
                             int32_t m, const W4A8Quant & q, float * y, bool accumulate, cudaStream_t st) {
    check_w4a8(gscale, group, n, kp);
    if (!cuda_linear_w4a8_takes_floats(m) || k > kp || k <= 0 || !q.codes || !q.step || !q.sync) {
        throw Error("CUDA w4a8 linear: fp32 inputs are taken for 1 <= m <= " + std::to_string(W4A8_QUANT_MAX_M) +
                    " rows (m = " + std::to_string(m) + ", k = " + std::to_string(k) + ", kp = " + std::to_string(kp) +
                    ") with a workspace for their codes");
    }
    const int ng = gscale ? (int) (kp / group) : 0;
    const auto launch = gscale ? launch_w4a8<FmtA8W4G> : launch_w4a8<FmtA8W4>;
    launch(qweight, gscale, ng, (int) group, scale, nullptr, bias, n, (int) (kp / 2), x, q, (int) k, qmax, m, y,
           accumulate, st);
}

}  // namespace mq
