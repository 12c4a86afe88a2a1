// The w4a16g linear (weight-only int4, fp16 scale per group of 64 or 128 along K): y = fp16(x) · wᵀ with
// w[n, k] = q[n, k] · scale[n, k / group], the input rounded to fp16 as for the f16 linear, fp32 accumulation
// (docs/numerics.md).
//  - decode (m <= 8): a GEMV on fp16 tensor cores. Codes are exact in fp16: a word of 8 codes becomes 4
//    half2 with one LOP3 each, (nibble pair ^ 8) | 0x6400 reads as 1024 + q + 8, minus 1032 gives q.
//    fp16(x) is laid out once per call in the order the fragments take it (MMA rows g carry token g; rows g + 8
//    are zero). A quad of lanes covers 64 codes of a row, which lie in one group, so each MMA's fp32 sum belongs
//    to one group and is multiplied by its scale before joining the accumulator: Σ_g s_g · (Σ_{k in g} x_k · q_k).
//  - prefill (m > 8): w = q · s has at most 14 significant bits, so w = whi + wlo exactly with
//    whi = fp16(w), wlo = fp16(w − whi); both are written to scratch and the f16 linear runs on each with fp16
//    inputs (the second accumulating). Exact products, fp32 sums: the same result up to rounding and summation
//    order.
#include "linear-w4a16g.cuh"
#include "cuda-common.cuh"
#include "splitk.cuh"
#include "cuda-backend.cuh"
#include "linear-f16.cuh"
#include "mma.cuh"

#include <cuda_fp16.h>

namespace mq {

constexpr int W16_WARPS = 8, W16_U = 4, W16_NT = 2, W16_MAX_M = 8;

// x [m, k] -> per 8 values x[8b .. 8b+7]: the half2 (fp16(x[8b+e]), fp16(x[8b+e+4])) for e = 0..3 (the pairing of
// the nibbles that one LOP3 extracts from a code word), then four zero words: the GEMV's rows g + 8, which took
// an fp32 input's low fp16 parts before the input was fp16 (they stay in the layout; the MMA rows are idle anyway)
static __global__ void w4a16g_prep_x_kernel(const float * __restrict__ x, int64_t blocks, uint4 * __restrict__ out) {
    for (int64_t b = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; b < blocks; b += (int64_t) gridDim.x * blockDim.x) {
        const float4 v0 = *(const float4 *) (x + 8 * b), v1 = *(const float4 *) (x + 8 * b + 4);
        const float lo4[4] = {v0.x, v0.y, v0.z, v0.w}, hi4[4] = {v1.x, v1.y, v1.z, v1.w};
        uint32_t h[4], l[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {  // the lo parts are zero: the input is fp16(x) (docs/numerics.md)
            const __half a = __float2half_rn(lo4[e]), c = __float2half_rn(hi4[e]);
            h[e] = (uint32_t) __half_as_ushort(a) | ((uint32_t) __half_as_ushort(c) << 16);
            l[e] = 0;
        }
        out[2 * b] = make_uint4(h[0], h[1], h[2], h[3]);
        out[2 * b + 1] = make_uint4(l[0], l[1], l[2], l[3]);
    }
}

// nibbles e and e + 4 of a code word (already xor 0x88888888: offset binary) -> half2 (q_e, q_{e+4})
__device__ __forceinline__ uint32_t codes_half2(uint32_t wq, int e) {
    const uint32_t h = ((wq >> (4 * e)) & 0x000F000Fu) | 0x64006400u;
    const __half2 v = __hsub2(*(const __half2 *) &h, __floats2half2_rn(1032.0f, 1032.0f));
    return *(const uint32_t *) &v;
}

// Block: 8 warps, NT tiles of 8 weight rows; warp w takes the 64-code chunks w, w + 8, ... of K; lane t of
// a quad holds codes [16t, 16t + 16) of its row's chunk (8 bytes).
template <int NT>
static __global__ void __launch_bounds__(256, 1) gemv_w4a16g_kernel(const uint4 * __restrict__ xp, const uint8_t * __restrict__ w,
                                                                    const __half * __restrict__ scale, float * __restrict__ y,
                                                                    int M, int N, int K, int group, int accumulate) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kb = K / 2, n_groups = K / group, nchunk = K / 64;
    // rows past M or N are read from a valid row and only feed outputs that are never written
    const uint4 * xr = xp + (size_t) min(g, M - 1) * (K / 4);
    const uint8_t * wp[NT];
    const __half * sp[NT][2];  // scale rows of this lane's two accumulator columns
#pragma unroll
    for (int i = 0; i < NT; i++) {
        wp[i] = w + (size_t) min((blockIdx.x * NT + i) * 8 + g, N - 1) * kb;
        for (int j = 0; j < 2; j++) sp[i][j] = scale + (size_t) min((int) (blockIdx.x * NT + i) * 8 + 2 * t + j, N - 1) * n_groups;
    }

    float c[NT][4] = {};
    const uint4 z = make_uint4(0, 0, 0, 0);
    for (int c0 = warp; c0 < nchunk; c0 += W16_WARPS * W16_U) {
        // the batch's loads first (from clamped chunks, no branches), then the math
        uint4 xa[W16_U][4];
        uint2 rb[W16_U][NT];
        float s[W16_U][NT][2];
#pragma unroll
        for (int u = 0; u < W16_U; u++) {
            const int ch = min(c0 + u * W16_WARPS, nchunk - 1);
            const uint4 * xc = xr + 2 * (8 * ch + 2 * t);
#pragma unroll
            for (int j = 0; j < 4; j++) xa[u][j] = ld_cached(xc + j);
            const int grp = ch * 64 / group;
#pragma unroll
            for (int i = 0; i < NT; i++) {
                rb[u][i] = ld_stream8(wp[i] + 32 * ch + 8 * t);
                s[u][i][0] = __half2float(sp[i][0][grp]);
                s[u][i][1] = __half2float(sp[i][1][grp]);
            }
        }
#pragma unroll
        for (int u = 0; u < W16_U; u++) {
            if (c0 + u * W16_WARPS >= nchunk) {  // past the end of K
#pragma unroll
                for (int j = 0; j < 4; j++) xa[u][j] = z;
            }
#pragma unroll
            for (int i = 0; i < NT; i++) {
                float cg[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int wd = 0; wd < 2; wd++) {
                    const uint32_t wq = (wd ? rb[u][i].y : rb[u][i].x) ^ 0x88888888u;
                    const uint4 hi = xa[u][2 * wd], lo = xa[u][2 * wd + 1];
#pragma unroll
                    for (int p = 0; p < 2; p++) {
                        const uint32_t a[4] = {mma_word(hi, 2 * p), mma_word(lo, 2 * p), mma_word(hi, 2 * p + 1),
                                               mma_word(lo, 2 * p + 1)};
                        const uint32_t b[2] = {codes_half2(wq, 2 * p), codes_half2(wq, 2 * p + 1)};
                        FmtF16::mma(cg, a, b);
                    }
                }
                // c0, c2: column 2t (hi and lo rows), c1, c3: column 2t + 1
                c[i][0] += cg[0] * s[u][i][0];
                c[i][1] += cg[1] * s[u][i][1];
                c[i][2] += cg[2] * s[u][i][0];
                c[i][3] += cg[3] * s[u][i][1];
            }
        }
    }

    __shared__ SplitK<float, W16_WARPS, NT> red;
    splitk_store<float, W16_WARPS, NT>(red, c, warp, lane);
    splitk_store_hi_lo<W16_WARPS, NT>(red, y, M, N, accumulate);
}

// w[n, k] = q · s exactly as whi + wlo (fp16 each); one thread per packed byte (two codes), rows over y
static __global__ void w4a16g_dequant_kernel(const uint8_t * __restrict__ q, const __half * __restrict__ scale, int32_t n,
                                             int32_t k, int32_t group, __half2 * __restrict__ whi, __half2 * __restrict__ wlo) {
    const int32_t kb = k / 2;
    for (int32_t row = blockIdx.y; row < n; row += gridDim.y)
    for (int32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < kb; j += gridDim.x * blockDim.x) {
        const size_t i = (size_t) row * kb + j;
        const float s = __half2float(scale[(size_t) row * (k / group) + 2 * j / group]);
        const int32_t b = q[i], u0 = b & 15, u1 = b >> 4;
        const float w0 = (float) (u0 - 16 * (u0 >= 8)) * s, w1 = (float) (u1 - 16 * (u1 >= 8)) * s;
        const __half h0 = __float2half_rn(w0), h1 = __float2half_rn(w1);
        whi[i] = __halves2half2(h0, h1);
        wlo[i] = __halves2half2(__float2half_rn(w0 - __half2float(h0)), __float2half_rn(w1 - __half2float(h1)));
    }
}

size_t cuda_linear_w4a16g_scratch(int32_t m, int64_t n, int64_t k) {
    if (m <= W16_MAX_M) return (size_t) m * k * 4;  // x as hi/lo fp16
    return (size_t) 2 * n * k * sizeof(__half) + cuda_linear_f16_scratch(m, k);
}

void cuda_linear_w4a16g(const void * qweight, const void * scale, int64_t n, int64_t k, int64_t group, const float * x,
                        int32_t m, float * y, bool accumulate, void * scratch, cudaStream_t st) {
    if (k % 64 != 0 || group % 64 != 0 || k % group != 0 || n <= 0) {
        throw Error("CUDA w4a16g linear: K = " + std::to_string(k) + " must be a positive multiple of 64 and of the group " +
                    std::to_string(group) + " (a multiple of 64), N = " + std::to_string(n) + " positive");
    }
    if (m <= 0) return;
    if (m <= W16_MAX_M) {
        const int64_t blocks = (int64_t) m * k / 8;
        w4a16g_prep_x_kernel<<<(unsigned) std::min<int64_t>(ceil_div(blocks, 256), 65535), 256, 0, st>>>(x, blocks, (uint4 *) scratch);
        cuda_check_launch("w4a16g_prep_x_kernel");
        gemv_w4a16g_kernel<W16_NT><<<(unsigned) ceil_div(n, 8 * W16_NT), 256, 0, st>>>(
            (const uint4 *) scratch, (const uint8_t *) qweight, (const __half *) scale, y, m, (int) n, (int) k, (int) group,
            accumulate ? 1 : 0);
        cuda_check_launch("gemv_w4a16g_kernel");
        return;
    }
    __half * whi = (__half *) scratch;
    __half * wlo = whi + n * k;
    void * f16_scratch = wlo + n * k;
    const dim3 grid((unsigned) ceil_div(k / 2, 256), (unsigned) std::min<int64_t>(n, 65535));
    w4a16g_dequant_kernel<<<grid, 256, 0, st>>>((const uint8_t *) qweight, (const __half *) scale, (int32_t) n, (int32_t) k,
                                                (int32_t) group, (__half2 *) whi, (__half2 *) wlo);
    cuda_check_launch("w4a16g_dequant_kernel");
    cuda_linear_f16(whi, n, k, x, m, y, accumulate, f16_scratch, st);
    cuda_linear_f16(wlo, n, k, x, m, y, true, f16_scratch, st);
}


// --- scheme w4a16g on the CUDA backend (its entry in cuda-backend.cu's table) ----------------------------------

static void run_w4a16g(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    BackendCuda & b = cuda_of(be);
    const CudaLinear4 & p = cuda_linear4(lin);
    void * scratch = b.scratch_for(cuda_linear_w4a16g_scratch(m, lin.n, lin.k));
    cuda_linear_w4a16g(p.qweight, p.scale, lin.n, lin.k, lin.group, x, m, y, accumulate, scratch, b.stream());
}

// K and the group multiples of 64: the GEMV's 64-byte chunks of K never straddle a group
const LinearKernels cuda_linear_w4a16g_kernels = {"w4a16g", 64, 64, cuda_prepare_linear4, cuda_release_linear4,
                                                  run_w4a16g, nullptr, nullptr};

}  // namespace mq
