// The f16 linear on fp16 tensor cores: y = fp16(x) · Wᵀ with fp16 W and fp32 accumulation (docs/numerics.md: the
// input rounded to fp16, so each product is exact in fp32 and one fp16 GEMM gives the result up to summation order).
// w4a16g calls it on its weights' two fp16 parts (linear-w4a16g.cu).
//  - decode (m <= 8): a GEMV where MMA rows g carry token g (rows g + 8 are zero: a split of the input into two
//    fp16 parts took them before the input was fp16; they are idle otherwise); the weights, the bytes that
//    matter, are read once with 16-byte streaming loads, 8 warps splitting K, 4 chunks per thread in flight
//    (measured in bench/kernels/linear.cu).
//  - prefill (m > 8): fp16(x) written to the scratch buffer, then one GEMM: cuBLAS's (fp32 accumulation;
//    cublas.cuh) where the library is found, else the tiled GEMM of gemm-mma.cuh.
#include "linear-f16.cuh"
#include "cuda-common.cuh"
#include "splitk.cuh"
#include "cuda-backend.cuh"
#include "gemm-mma.cuh"
#include "cublas.cuh"

#include <cstdlib>

#include <cuda_fp16.h>

namespace mq {

constexpr int GEMV_WARPS = 8, GEMV_U = 4, GEMV_NT = 2, GEMV_MAX_M = 8;

__device__ __forceinline__ uint32_t pack_half2(__half a, __half b) {
    return (uint32_t) __half_as_ushort(a) | ((uint32_t) __half_as_ushort(b) << 16);
}

// 8 fp32 values -> fp16, as 4 words of 2 halves (k order)
__device__ __forceinline__ uint4 to_half8(const float4 & a, const float4 & b) {
    return make_uint4(pack_half2(__float2half_rn(a.x), __float2half_rn(a.y)), pack_half2(__float2half_rn(a.z), __float2half_rn(a.w)),
                      pack_half2(__float2half_rn(b.x), __float2half_rn(b.y)), pack_half2(__float2half_rn(b.z), __float2half_rn(b.w)));
}

// Block: 8 warps, GEMV_NT tiles of 8 weight rows; warp w takes the 64-byte chunks w, w + 8, ... of K.
template <int NT, int U>
static __global__ void __launch_bounds__(256, 1) gemv_f16_kernel(const float * __restrict__ x, const uint8_t * __restrict__ w,
                                                                 float * __restrict__ y, int M, int N, int K,
                                                                 int accumulate, int prefetch) {
    pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kb = 2 * K;
    // rows past M or N are read from a valid row and only feed outputs that are never written
    const float * xr = x + (size_t) min(g, M - 1) * K;
    const uint8_t * wp[NT];
#pragma unroll
    for (int i = 0; i < NT; i++) wp[i] = w + (size_t) min((blockIdx.x * NT + i) * 8 + g, N - 1) * kb;

    if (prefetch) {  // the first batch's weight lines (8·NT rows x up to 2 KB)
        for (int q = threadIdx.x; q < NT * 8 * 16; q += blockDim.x) {
            const int r = q >> 4, o = (q & 15) * 128;
            const int n = min((int) blockIdx.x * NT * 8 + r, N - 1);
            if (o < min(kb, GEMV_WARPS * U * 64)) prefetch_l2(w + (size_t) n * kb + o);
        }
    }
    pdl_wait();  // x and y are written by earlier kernels

    float c[NT][4] = {};
    const int nchunk = (kb + 63) / 64;
    const uint4 z = make_uint4(0, 0, 0, 0);
    for (int c0 = warp; c0 < nchunk; c0 += GEMV_WARPS * U) {
        // the batch's loads first (from clamped offsets, no branches), then the math
        float4 xa[U][2];
        uint4 rb[U][NT];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int o = min((c0 + u * GEMV_WARPS) * 64 + 16 * t, kb - 16);
            const uint4 x0 = ld_cached(xr + o / 2), x1 = ld_cached(xr + o / 2 + 4);
            xa[u][0] = make_float4(__uint_as_float(x0.x), __uint_as_float(x0.y), __uint_as_float(x0.z), __uint_as_float(x0.w));
            xa[u][1] = make_float4(__uint_as_float(x1.x), __uint_as_float(x1.y), __uint_as_float(x1.z), __uint_as_float(x1.w));
#pragma unroll
            for (int i = 0; i < NT; i++) rb[u][i] = ld_stream(wp[i] + o);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            uint4 hi = to_half8(xa[u][0], xa[u][1]);
            if ((c0 + u * GEMV_WARPS) * 64 + 16 * t >= kb) hi = z;  // past the end of K
#pragma unroll
            for (int s = 0; s < FmtF16::steps; s++) {
                uint32_t af[4];
                FmtF16::a_frag(hi, z, s, af);
#pragma unroll
                for (int i = 0; i < NT; i++) {
                    uint32_t bf[2];
                    FmtF16::b_frag(rb[u][i], s, bf);
                    FmtF16::mma(c[i], af, bf);
                }
            }
        }
    }

    __shared__ SplitK<float, GEMV_WARPS, NT> red;
    splitk_store<float, GEMV_WARPS, NT>(red, c, warp, lane);
    splitk_store_hi_lo<GEMV_WARPS, NT>(red, y, M, N, accumulate);
}

// h = fp16(x); four values a thread (total % 4 == 0: k % 8 == 0), read as one float4 where x is 16-byte aligned
static __global__ void to_half_kernel(const float * __restrict__ x, int64_t total, __half * __restrict__ h16) {
    const bool vec = ((uintptr_t) x & 15) == 0;
    for (int64_t i = 4 * (blockIdx.x * (int64_t) blockDim.x + threadIdx.x); i < total;
         i += 4 * (int64_t) gridDim.x * blockDim.x) {
        const float4 v = vec ? *(const float4 *) (x + i) : make_float4(x[i], x[i + 1], x[i + 2], x[i + 3]);
        const __half h[4] = {__float2half_rn(v.x), __float2half_rn(v.y), __float2half_rn(v.z), __float2half_rn(v.w)};
        *(uint2 *) (h16 + i) = make_uint2(pack_half2(h[0], h[1]), pack_half2(h[2], h[3]));
    }
}

size_t cuda_linear_f16_scratch(int32_t m, int64_t k) {
    return m <= GEMV_MAX_M ? 0 : (size_t) m * k * sizeof(__half);
}

void cuda_linear_f16(const void * w, int64_t n, int64_t k, const float * x, int32_t m, float * y, bool accumulate,
                     void * scratch, cudaStream_t st) {
    if (k % 8 != 0 || n <= 0 || k <= 0) {
        throw Error("CUDA f16 linear: K = " + std::to_string(k) + " must be a positive multiple of 8, N = " +
                    std::to_string(n) + " positive");
    }
    if (m <= 0) return;
    if (m <= GEMV_MAX_M) {
        static const int u = [] {  // MERGEQUANT_F16_GEMV = U, chunks in flight per warp (tuning knob)
            const char * env = std::getenv("MERGEQUANT_F16_GEMV");
            return env && std::atoi(env) == 2 ? 2 : GEMV_U;
        }();
        launch_pdl(u == 2 ? gemv_f16_kernel<GEMV_NT, 2> : gemv_f16_kernel<GEMV_NT, GEMV_U>,
                   dim3((unsigned) ceil_div(n, 8 * GEMV_NT)), dim3(256), 0, st, "gemv_f16_kernel", x,
                   (const uint8_t *) w, y, m, (int) n, (int) k, accumulate ? 1 : 0, cuda_pdl_mode() == 2 ? 1 : 0);
        return;
    }
    const int64_t total = (int64_t) m * k;
    __half * xh = (__half *) scratch;
    to_half_kernel<<<(unsigned) std::min<int64_t>(ceil_div(total, 1024), 65535), 256, 0, st>>>(x, total, xh);
    cuda_check_launch("to_half_kernel");
    if (cuda_cublas_gemm_f16((const __half *) w, n, k, xh, m, y, accumulate ? 1.0f : 0.0f, st)) return;
    static std::atomic<uint64_t> smem_set{0};
    cuda_once_per_device(smem_set, [] {
        cuda_check(cudaFuncSetAttribute(gemm_mma_kernel<FmtF16>, cudaFuncAttributeMaxDynamicSharedMemorySize, GEMM_SMEM),
                   "cudaFuncSetAttribute(gemm_mma_kernel<f16>)");
    });
    const dim3 grid((unsigned) ceil_div(n, GEMM_BN), (unsigned) ceil_div(m, GEMM_BM));
    gemm_mma_kernel<FmtF16><<<grid, 256, GEMM_SMEM, st>>>((const uint8_t *) xh, (const uint8_t *) w, nullptr, nullptr, nullptr, y, m, (int) n,
                                                          (int) (2 * k), accumulate ? GEMM_ACCUMULATE : GEMM_STORE);
    cuda_check_launch("gemm_mma_kernel<f16>");
}


// --- scheme f16 on the CUDA backend (its entry in cuda-backend.cu's table) -------------------------------------

static void prepare_f16(Backend & be, Linear & lin) {
    if (lin.tensors.size() != 1) throw Error("linear '" + lin.name + "': the f16 linear needs one weight tensor");
    lin.prepared = cuda_of(be).copy_tensor(lin.tensors[0]);
}

static void release_f16(Backend & be, Linear & lin) {
    if (lin.prepared) be.free(lin.prepared);
    lin.prepared = nullptr;
}

static void run_f16(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    BackendCuda & b = cuda_of(be);
    void * scratch = b.scratch_for(cuda_linear_f16_scratch(m, lin.k));
    cuda_linear_f16(lin.prepared, lin.n, lin.k, x, m, y, accumulate, scratch, b.stream());
}

// K % 8: the GEMV's 16-byte loads of fp16 rows
const LinearKernels cuda_linear_f16_kernels = {"f16", 8, 0, prepare_f16, release_f16, run_f16, nullptr, nullptr};

}  // namespace mq
