// The w4a4 linear on tensor cores, two ways (mma.cuh): on sm_90 (no INT4 tensor cores) the int4 codes of both
// operands are unpacked in registers to int8 lanes holding 16·x (FmtI4), multiplied with mma.m16n8k32 s8, and
// the int32 sum (256 times the true one) is shifted back; on sm_80/86/89 the packed words feed the native
// mma.m16n8k64 s4 as they are (FmtS4). Either way the exact int32 sum gets one fp32 multiply by scale[n]:
// bit-identical to the CPU and numpy integer reference. Kernels measured in bench/kernels/linear.cu:
//  - decode (m <= 16): GEMV; a block of 8 warps owns 16 weight rows and the warps split K, each thread
//    keeps 2 chunks x (2 weight + 1-2 activation) 16-byte loads in flight (78 registers: 3 blocks per
//    SM); partial sums meet in shared memory (integer sums: exact in any order). Launched with PDL
//    (cuda-common.cuh): the blocks prefetch their first weights into L2 while the kernel before runs.
//    It also takes the activations as int8 codes, one per byte (the static W4A4 ops' output), and packs
//    them in registers: a decode step then needs no pack pass (one launch fewer per linear; the
//    activations are a few KB next to MBs of weights);
//  - prefill (m > 16): the tiled GEMM of gemm-mma.cuh; from m = 64, cuBLAS's int8 GEMM on the codes as they are
//    and the weights widened to int8 (gemm-cublas-i8.cuh), where cuBLAS is found.
#include "linear-w4a4.cuh"
#include "cuda-common.cuh"
#include "gemm-cublas-i8.cuh"
#include "splitk.cuh"
#include "cuda-backend.cuh"
#include "quantize.cuh"
#include "gemm-mma.cuh"

#include <cuda_fp16.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace mq {

constexpr int W4_WARPS = 8, W4_MAX_M = W4A4_GEMV_MAX_M;

// The fused low-rank branch (LoraGemv in linear-w4a4.cuh). The grid's first `rank` blocks do no GEMV work: block i
// computes row i, l[t, i] = Σ_s a[i, s] · codes[t, s] in float64 (exact, so the threads may split the sum in any
// order), then sync[0] += 1. Being first, they are dispatched before any block that waits for them in lora_wait;
// having no weights to stream, they finish while the GEMV blocks stream theirs. Their row of a is fetched into L2
// before the wait for the kernel before (a is a weight; the codes are that kernel's output).
__device__ __forceinline__ void lora_down_row(const LoraGemv & lo, int i, const int8_t * __restrict__ codes, int M, int kp) {
    __shared__ double part[W4_WARPS];
    const __half * A = (const __half *) lo.a;
    for (int o = 128 * threadIdx.x; o < 2 * kp; o += 128 * blockDim.x) prefetch_l2((const uint8_t *) (A + (size_t) i * kp) + o);
    pdl_wait();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int t = 0; t < M; t++) {
        double s = 0.0;
#pragma unroll 4  // (the loads of 4 steps issued together; the sum's order is the same)
        for (int k = 8 * threadIdx.x; k < kp; k += 8 * blockDim.x) {  // kp % 64 == 0: 8 codes a load
            const uint4 av = ld_cached(A + (size_t) i * kp + k);
            const uint2 cv = *(const uint2 *) (codes + (size_t) t * kp + k);
            const __half * ah = (const __half *) &av;
            const int8_t * ch = (const int8_t *) &cv;
#pragma unroll
            for (int e = 0; e < 8; e++) s += (double) __half2float(ah[e]) * (double) ch[e];
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) part[warp] = s;
        __syncthreads();
        if (threadIdx.x == 0) {
            double r = 0.0;
            for (int w = 0; w < W4_WARPS; w++) r += part[w];
            lo.l[(size_t) t * lo.rank + i] = r;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        __threadfence();  // l before the count
        atomicAdd(&lo.sync[0], 1ull);
    }
}

// A GEMV block's view of the branch: B's rows for its outputs, staged in shared memory by cp.async as the block
// starts (no registers held over the main loop), and l, staged once its launch's rows are written. Ranks above
// LORA_SMEM_RANK (or not a multiple of 8) read both from global memory in the epilogue instead.
constexpr int LORA_SMEM_RANK = 32;
template <int NT> struct LoraStage {
    __half b[NT * 8][LORA_SMEM_RANK];
    double l[W4_MAX_M][LORA_SMEM_RANK];
    unsigned long long launch;  // thread 0's
};
__device__ __forceinline__ bool lora_staged(const LoraGemv & lo) { return lo.rank <= LORA_SMEM_RANK && lo.rank % 8 == 0; }

// first thing in GEMV block bx of `blocks` (all threads): the launch number and the launch counts
// (LoraGemv::sync), and B's rows row_of(r), r < NT·8, into st.b
template <int NT, class RowOf>
__device__ __forceinline__ void lora_start(const LoraGemv & lo, LoraStage<NT> & st, int bx, int blocks, int n,
                                           RowOf row_of) {
    for (int s = bx + blocks * (int) threadIdx.x; s < (n + 7) / 8; s += blocks * (int) blockDim.x) {
        if (s == bx) st.launch = atomicAdd(&lo.sync[1 + s], 1ull);  // (thread 0)
        else atomicAdd(&lo.sync[1 + s], 1ull);
    }
    if (!lora_staged(lo)) return;
    const int per_row = lo.rank / 8;  // 16-byte pieces
    for (int q = threadIdx.x; q < NT * 8 * per_row; q += blockDim.x) {
        const int r = q / per_row, piece = q % per_row;
        cp_async16(&st.b[r][8 * piece], (const __half *) lo.b + (size_t) row_of(r) * lo.rank + 8 * piece, 16);
    }
    cp_async_commit();
}

// before the epilogue (all threads): B's copies landed; thread 0 waits for its launch's rows of l (an acquire load:
// l's writes, made before their count, are visible to the block after the barrier), then l is staged
template <int NT> __device__ __forceinline__ void lora_wait(const LoraGemv & lo, LoraStage<NT> & st, int M) {
    cp_async_wait<0>();
    if (threadIdx.x == 0) {
        const unsigned long long target = (st.launch + 1) * (unsigned long long) lo.rank;
        for (;;) {
            unsigned long long v;
            asm volatile("ld.acquire.gpu.global.u64 %0, [%1];\n" : "=l"(v) : "l"(lo.sync) : "memory");
            if ((long long) (v - target) >= 0) break;
            __nanosleep(32);
        }
    }
    __syncthreads();
    if (lora_staged(lo)) {
        for (int q = threadIdx.x; q < M * lo.rank; q += blockDim.x) st.l[q / lo.rank][q % lo.rank] = __ldcg(lo.l + q);
        __syncthreads();
    }
}

// lora[m, n] = fp32(Σ_i b[n, i] · l[m, i]), float64 fused multiply-adds in i order from 0, as the CPU backend;
// r: n's row among the block's staged rows of B
template <int NT> __device__ __forceinline__ float lora_up_value(const LoraGemv & lo, const LoraStage<NT> & st, int m,
                                                                 int n, int r) {
    double s = 0.0;
    if (lora_staged(lo)) {
        for (int i = 0; i < lo.rank; i++) s = fma((double) __half2float(st.b[r][i]), st.l[m][i], s);
        return (float) s;
    }
    const __half * b = (const __half *) lo.b + (size_t) n * lo.rank;
    const double * l = lo.l + (size_t) m * lo.rank;
    for (int i = 0; i < lo.rank; i++) s = fma((double) __half2float(b[i]), __ldcg(l + i), s);
    return (float) s;
}

// 32 int4 codes one per byte (k order) -> the 16 packed bytes of the file's layout (even k in the low nibble)
__device__ __forceinline__ uint4 pack_codes32(const uint4 & x0, const uint4 & x1) {
    auto pack8 = [](uint32_t lo, uint32_t hi) {  // bytes k .. k+7 -> 8 nibbles
        const uint32_t even = __byte_perm(lo, hi, 0x6420), odd = __byte_perm(lo, hi, 0x7531);
        return (even & 0x0F0F0F0Fu) | ((odd & 0x0F0F0F0Fu) << 4);
    };
    return make_uint4(pack8(x0.x, x0.y), pack8(x0.z, x0.w), pack8(x1.x, x1.y), pack8(x1.z, x1.w));
}

// CODES8: a holds int8 codes [M][2·kb] instead of packed int4 [M][kb]; NT tiles of 8 weight rows per block, U
// chunks per warp in flight; HI8: M > 8 (else the A rows g + 8 are never written: row g's registers stand in).
// SWIGLU (the gate/up linear of a static W4A4 block, NT = 2): block b reads gate rows 8b..8b+7 as its first tile
// and the matching up rows F+8b.. as its second, and its epilogue writes down_proj's input codes instead of y:
// z_j = swiglu(g_j, u_j) into the slots of channel j (SwigluOut), as swiglu_quant does.
template <class Fmt, bool CODES8, int NT, int U, bool HI8, bool SWIGLU>
static __global__ void __launch_bounds__(256, 3) gemv_w4a4_kernel(const uint8_t * __restrict__ a, const uint8_t * __restrict__ w,
                                                                  const float * __restrict__ scale, const float * __restrict__ add,
                                                                  const float * __restrict__ row_scale, float * __restrict__ y,
                                                                  int M, int N, int kb, int accumulate, int prefetch,
                                                                  SwigluOut so, LoraGemv lo) {
    pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // the low-rank blocks first (CODES8 only), then the GEMV blocks bx = 0, 1, ..
    const int lora_blocks = CODES8 && lo.rank > 0 ? lo.rank : 0;
    if ((int) blockIdx.x < lora_blocks) {
        lora_down_row(lo, blockIdx.x, (const int8_t *) a, M, 2 * kb);  // (its pdl_wait inside)
        return;
    }
    const int bx = (int) blockIdx.x - lora_blocks;
    // weight row r of tile i of this block
    auto tile_row = [&](int i, int r) {
        return SWIGLU ? (i ? so.n_ff : 0) + bx * 8 + r : (bx * NT + i) * 8 + r;
    };
    __shared__ LoraStage<NT> ls;
    if (lora_blocks) {
        lora_start(lo, ls, bx, (int) gridDim.x - lora_blocks, N, [&](int r) { return min(tile_row(r / 8, r % 8), N - 1); });
    }
    // rows past M or N are read from a valid row and only feed outputs that are never written
    const size_t a_row = CODES8 ? 2 * (size_t) kb : (size_t) kb;
    const uint8_t * ap0 = a + (size_t) min(g, M - 1) * a_row;
    const uint8_t * ap8 = a + (size_t) min(g + 8, M - 1) * a_row;
    const uint8_t * wp[NT];
#pragma unroll
    for (int i = 0; i < NT; i++) wp[i] = w + (size_t) min(tile_row(i, g), N - 1) * kb;

    if (prefetch) {  // the first batch's weight lines (8·NT rows x up to W4_WARPS·U·64 bytes)
        constexpr int LINES = W4_WARPS * U * 64 / 128;
        for (int q = threadIdx.x; q < NT * 8 * LINES; q += blockDim.x) {
            const int r = q / LINES, o = (q % LINES) * 128;
            const int n = min(tile_row(r / 8, r % 8), N - 1);
            if (o < kb) prefetch_l2(w + (size_t) n * kb + o);
        }
    }
    // K in rounds of ROUND chunks of 64 bytes (warp w, batch slot u: chunk w + W4_WARPS·u of the round). A last
    // partial round of at most W4_WARPS chunks (a split input's extra slots: K = 4224 is 32 chunks and one) is no
    // round of its own: its weights go to shared memory by cp.async as the block starts, before the wait for the
    // kernel before, and warp j multiplies tail chunk j after the main loop, so the tail costs no memory round trip.
    constexpr int ROUND = W4_WARPS * U;
    const int nchunk = (kb + 63) / 64, rest = nchunk % ROUND;
    const int tail = rest <= W4_WARPS ? rest : 0, nmain = nchunk - tail;
    __shared__ uint4 tw[W4_WARPS][NT][8][4];  // [tail chunk][tile][row][16-byte piece]
    for (int q = threadIdx.x; q < tail * NT * 32; q += blockDim.x) {
        const int j = q / (NT * 32), i = (q / 32) % NT, r = (q / 4) % 8, piece = q % 4;
        const int o = (nmain + j) * 64 + 16 * piece;
        cp_async16(&tw[j][i][r][piece], w + (size_t) min(tile_row(i, r), N - 1) * kb + min(o, kb - 16), o < kb ? 16 : 0);
    }
    cp_async_commit();
    pdl_wait();  // the activations and y are written by earlier kernels

    // the activation registers of byte offset o of K (clamped: a chunk past the end is zeroed by its caller)
    auto load_a = [&](int o, uint4 & r0, uint4 & r8) {
        if constexpr (CODES8) {
            r0 = pack_codes32(ld_cached(ap0 + 2 * o), ld_cached(ap0 + 2 * o + 16));
            if constexpr (HI8) r8 = pack_codes32(ld_cached(ap8 + 2 * o), ld_cached(ap8 + 2 * o + 16));
        } else {
            r0 = ld_cached(ap0 + o);
            if constexpr (HI8) r8 = ld_cached(ap8 + o);
        }
        if constexpr (!HI8) r8 = r0;
    };
    int32_t c[NT][4] = {};
    auto mma_chunk = [&](const uint4 & r0, const uint4 & r8, const uint4 (&wb)[NT]) {
#pragma unroll
        for (int s = 0; s < Fmt::steps; s++) {
            uint32_t af[4];
            Fmt::a_frag(r0, r8, s, af);
#pragma unroll
            for (int i = 0; i < NT; i++) {
                uint32_t bf[2];
                Fmt::b_frag(wb[i], s, bf);
                Fmt::mma(c[i], af, bf);
            }
        }
    };
    const uint4 z = make_uint4(0, 0, 0, 0);
    for (int c0 = warp; c0 < nmain; c0 += ROUND) {
        uint4 ra0[U], ra8[U], rb[U][NT];
#pragma unroll
        for (int u = 0; u < U; u++) {  // the batch's loads first (clamped offsets, no branches)
            const int o = min((c0 + u * W4_WARPS) * 64 + 16 * t, kb - 16);
            load_a(o, ra0[u], ra8[u]);
#pragma unroll
            for (int i = 0; i < NT; i++) rb[u][i] = ld_stream(wp[i] + o);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if ((c0 + u * W4_WARPS) * 64 + 16 * t >= kb) {  // past the end of K
                ra0[u] = ra8[u] = z;
            }
            mma_chunk(ra0[u], ra8[u], rb[u]);
        }
    }
    if (tail) {  // (block-uniform)
        uint4 ra0 = z, ra8 = z;
        const int o = (nmain + warp) * 64 + 16 * t;
        if (warp < tail) load_a(min(o, kb - 16), ra0, ra8);
        cp_async_wait<0>();
        __syncthreads();
        if (warp < tail) {
            if (o >= kb) ra0 = ra8 = z;
            uint4 wb[NT];
#pragma unroll
            for (int i = 0; i < NT; i++) wb[i] = tw[warp][i][g][t];
            mma_chunk(ra0, ra8, wb);
        }
    }

    __shared__ SplitK<int32_t, W4_WARPS, NT> red;
    splitk_store<int32_t, W4_WARPS, NT>(red, c, warp, lane);
    if (lora_blocks) lora_wait(lo, ls, M);
    // thread p: tile p / 64, lane (p / 2) % 32, register pair p % 2 (row g or g + 8, columns 2t, 2t + 1)
    const int p = threadIdx.x;
    if constexpr (SWIGLU) {
        __shared__ float gu[2][8][W4_MAX_M];  // [gate | up][channel of the block][token]
        if (p < 2 * 64) {
            const int i = p >> 6, l = (p >> 1) & 31, h = p & 1;
            const int m = (l >> 2) + 8 * h, c = 2 * (l & 3), n = tile_row(i, c);
            if (m < M) {
                const int32_t s0 = splitk_sum<int32_t, W4_WARPS, NT>(red, i, 2 * h, l);
                const int32_t s1 = splitk_sum<int32_t, W4_WARPS, NT>(red, i, 2 * h + 1, l);
                const float * ad = add ? add + (size_t) m * N + n : nullptr;
                const float l0 = lora_blocks ? lora_up_value(lo, ls, m, n, 8 * i + c) : ad ? ad[0] : 0.0f;
                const float l1 = lora_blocks ? lora_up_value(lo, ls, m, n + 1, 8 * i + c + 1) : ad ? ad[1] : 0.0f;
                gu[i][c][m] = gemm_value<Fmt>(s0, scale, n) + l0;
                gu[i][c + 1][m] = gemm_value<Fmt>(s1, scale, n + 1) + l1;
            }
        }
        __syncthreads();
        if (p < 8 * M) {
            const int j = p & 7, m = p >> 3, ch = bx * 8 + j;
            const float z = swiglu_value(gu[0][j][m], gu[1][j][m]);
            int8_t * o = so.out + (size_t) m * so.kp;
            for (int e = so.start[ch]; e < so.start[ch + 1]; e++) {
                const int4 en = so.slots[e];  // (slot, part, parts; parts 0: a padding slot, code 0)
                o[en.x] = en.z ? slot_code(z, en.y, en.z) : 0;
            }
        }
        return;
    }
    if (p < NT * 64) {
        const int i = p >> 6, l = (p >> 1) & 31, h = p & 1;
        const int m = (l >> 2) + 8 * h, n = (bx * NT + i) * 8 + 2 * (l & 3);
        if (m < M && n < N) {
            const int32_t s0 = splitk_sum<int32_t, W4_WARPS, NT>(red, i, 2 * h, l);
            const int32_t s1 = splitk_sum<int32_t, W4_WARPS, NT>(red, i, 2 * h + 1, l);
            float * yo = y + (size_t) m * N + n;
            const float * ad = add ? add + (size_t) m * N + n : nullptr;
            // v·1.0f is exact: no effect without a row scale; __fmul_rn rounds the product before the accumulate
            // (no fused multiply-add), as the CPU backend does
            const float rs = row_scale ? row_scale[m] : 1.0f;
            const int r = 8 * i + 2 * (l & 3);  // n's row among the block's rows
            const float l0 = lora_blocks ? lora_up_value(lo, ls, m, n, r) : ad ? ad[0] : 0.0f;
            const float v0 = __fmul_rn(gemm_value<Fmt>(s0, scale, n) + l0, rs);
            if (accumulate) yo[0] += v0; else yo[0] = v0;
            if (n + 1 < N) {
                const float l1 = lora_blocks ? lora_up_value(lo, ls, m, n + 1, r + 1) : ad ? ad[1] : 0.0f;
                const float v1 = __fmul_rn(gemm_value<Fmt>(s1, scale, n + 1) + l1, rs);
                if (accumulate) yo[1] += v1; else yo[1] = v1;
            }
        }
    }
}

using gemv_fn = void (*)(const uint8_t *, const uint8_t *, const float *, const float *, const float *, float *, int,
                         int, int, int, int, SwigluOut, LoraGemv);
template <class Fmt, int NT, int U, bool SWIGLU = false> static gemv_fn gemv_pick_fmt(bool codes8, bool hi8) {
    return codes8 ? (hi8 ? gemv_w4a4_kernel<Fmt, true, NT, U, true, SWIGLU> : gemv_w4a4_kernel<Fmt, true, NT, U, false, SWIGLU>)
                  : (hi8 ? gemv_w4a4_kernel<Fmt, false, NT, U, true, SWIGLU> : gemv_w4a4_kernel<Fmt, false, NT, U, false, SWIGLU>);
}
template <int NT, int U> static gemv_fn gemv_pick(W4A4Mma mma, bool codes8, bool hi8) {
    return mma == W4A4Mma::S4 ? gemv_pick_fmt<FmtS4, NT, U>(codes8, hi8) : gemv_pick_fmt<FmtI4, NT, U>(codes8, hi8);
}

// the GEMV's shape, MERGEQUANT_W4A4_GEMV = NTxU (a tuning knob). Llama-2-7B w4a4 decode on the H100 (PDL on):
// 22 (default) 414 tok/s, 12 410, 42 400, 14 394, 44 388, 24 381 (the old shape), 13 378, 28 328, 18 321: the
// fewer registers, the more blocks per SM (U = 2: 68 registers, 3 blocks of 256 threads) and the better the stream
// (bench/RESULTS.md). Choosing U by K so that a split-slot input (K = 4224: 33 chunks of 64 bytes, a third round
// of loads at U = 2) takes two rounds was slower on the H200 (bench/kernels/linear.cu, 2026-12-03: 4096 x 4224
// 5.16 us at U = 2, 6.00 at U = 3; 4096 x 4096 4.55 vs 5.95): one U for every K.
static int gemv_variant() {
    static const int v = [] {
        const char * env = std::getenv("MERGEQUANT_W4A4_GEMV");
        return env && *env ? std::atoi(env) : 22;
    }();
    return v;
}

template <typename... Args>
static void launch_gemv(W4A4Mma mma, bool codes8, bool hi8, unsigned n, int lora_blocks, cudaStream_t st, Args... args) {
    gemv_fn f;
    int nt;
    switch (gemv_variant()) {
        case 14: f = gemv_pick<1, 4>(mma, codes8, hi8), nt = 1; break;
        case 12: f = gemv_pick<1, 2>(mma, codes8, hi8), nt = 1; break;
        case 13: f = gemv_pick<1, 3>(mma, codes8, hi8), nt = 1; break;
        case 24: f = gemv_pick<2, 4>(mma, codes8, hi8), nt = 2; break;
        default: f = gemv_pick<2, 2>(mma, codes8, hi8), nt = 2; break;
    }
    launch_pdl(f, dim3((unsigned) (ceil_div(n, 8 * nt) + lora_blocks)), dim3(256), 0, st, "gemv_w4a4_kernel", args...);
}

W4A4Mma cuda_w4a4_mma_default() {
    static const W4A4Mma v = [] {
        const char * env = std::getenv("MERGEQUANT_W4A4_MMA");
        if (env && *env) {
            const std::string e = env;
            if (e == "s4") return W4A4Mma::S4;
            if (e == "i8") return W4A4Mma::I8;
            throw Error("MERGEQUANT_W4A4_MMA='" + e + "': expected 's4' (native int4 MMA) or 'i8' (int4 unpacked to int8)");
        }
        int dev = 0, major = 0;
        cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
        cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
        return major >= 9 ? W4A4Mma::I8 : W4A4Mma::S4;
    }();
    return v;
}

template <class Fmt> static void launch_gemm(const void * a, const void * qweight, const float * scale, const float * add,
                                             const float * row_scale, float * y, int32_t m, int64_t n, int kb,
                                             bool accumulate, cudaStream_t st, const GemmLora & gl = GemmLora()) {
    static std::atomic<uint64_t> smem_set{0};
    cuda_once_per_device(smem_set, [] {
        cuda_check(cudaFuncSetAttribute(gemm_mma_kernel<Fmt>, cudaFuncAttributeMaxDynamicSharedMemorySize, GEMM_SMEM),
                   "cudaFuncSetAttribute(gemm_mma_kernel<w4a4>)");
    });
    const dim3 grid((unsigned) ceil_div(n, GEMM_BN), (unsigned) ceil_div(m, GEMM_BM));
    gemm_mma_kernel<Fmt><<<grid, 256, GEMM_SMEM, st>>>((const uint8_t *) a, (const uint8_t *) qweight, scale, add, row_scale, y,
                                                       m, (int) n, kb, accumulate ? GEMM_ACCUMULATE : GEMM_STORE, gl);
    cuda_check_launch("gemm_mma_kernel<w4a4>");
}

void cuda_linear_w4a4(const void * qweight, const float * scale, const float * add, const float * row_scale, int64_t n,
                      int64_t kp, const void * a, bool codes8, int32_t m, float * y, bool accumulate, W4A4Mma mma,
                      cudaStream_t st, const LoraGemv & lo, const GemmLora & gl) {
    // FmtI4 sums 256·a·w: K must stay below 131072 for int32
    if (kp % 64 != 0 || kp <= 0 || (mma == W4A4Mma::I8 && kp >= 131072) || n <= 0) {
        throw Error("CUDA w4a4 linear: K = " + std::to_string(kp) + " must be a positive multiple of 64 below 131072 "
                    "(int32 range of the 16x-scaled products), N = " + std::to_string(n) + " positive");
    }
    if (lo.rank > 0 && (!codes8 || add || m > W4_MAX_M || !lo.a || !lo.b || !lo.l || !lo.sync)) {
        throw Error("CUDA w4a4 linear: the fused low-rank branch takes int8 codes at m <= " + std::to_string(W4_MAX_M) +
                    " with its tensors and workspace, and no other add (m = " + std::to_string(m) + ")");
    }
    if (gl.rank > 0 && (add || gl.rank > GEMM_LORA_MAX_RANK || !gl.b || !gl.l)) {
        throw Error("CUDA w4a4 linear: the GEMM's low-rank epilogue takes rank <= " + std::to_string(GEMM_LORA_MAX_RANK) +
                    " with lora_b and l, and no other add (rank = " + std::to_string(gl.rank) + ")");
    }
    if (m <= 0) return;
    const int kb = (int) (kp / 2);
    if (m <= W4_MAX_M) {
        launch_gemv(mma, codes8, m > 8, (unsigned) n, codes8 ? lo.rank : 0, st, (const uint8_t *) a, (const uint8_t *) qweight, scale, add,
                    row_scale, y, m, (int) n, kb, accumulate ? 1 : 0, cuda_pdl_mode() == 2 ? 1 : 0, SwigluOut(), lo);
        return;
    }
    if (codes8) {
        throw Error("CUDA w4a4 linear: int8 codes are taken at m <= " + std::to_string(W4_MAX_M) + " only (m = " +
                    std::to_string(m) + "); pack them first");
    }
    if (mma == W4A4Mma::S4) {
        launch_gemm<FmtS4>(a, qweight, scale, add, row_scale, y, m, n, kb, accumulate, st, gl);
    } else {
        launch_gemm<FmtI4>(a, qweight, scale, add, row_scale, y, m, n, kb, accumulate, st, gl);
    }
}

void cuda_linear_i8(const void * qweight, const float * scale, const float * row_scale, int64_t n, int64_t k,
                    const int8_t * a, int32_t m, float * y, bool accumulate, cudaStream_t st) {
    if (k % 16 != 0 || k <= 0 || k > (int64_t(1) << 17) || n <= 0) {
        throw Error("CUDA int8 linear: K = " + std::to_string(k) + " must be a positive multiple of 16 up to 131072, N = " +
                    std::to_string(n) + " positive");
    }
    if (m <= 0) return;
    if (m <= W4_MAX_M) {
        const gemv_fn f = m > 8 ? gemv_w4a4_kernel<FmtI8, false, 2, 2, true, false> : gemv_w4a4_kernel<FmtI8, false, 2, 2, false, false>;
        launch_pdl(f, dim3((unsigned) ceil_div(n, 16)), dim3(256), 0, st, "gemv_w4a4_kernel<i8>", (const uint8_t *) a,
                   (const uint8_t *) qweight, scale, (const float *) nullptr, row_scale, y, m, (int) n, (int) k,
                   accumulate ? 1 : 0, cuda_pdl_mode() == 2 ? 1 : 0, SwigluOut(), LoraGemv());
        return;
    }
    launch_gemm<FmtI8>(a, qweight, scale, nullptr, row_scale, y, m, n, (int) k, accumulate, st);
}

void cuda_linear_w4a4_swiglu(const void * qweight, const float * scale, const float * add, int64_t kp, const int8_t * codes,
                             int32_t m, const SwigluOut & so, W4A4Mma mma, cudaStream_t st, const LoraGemv & lo) {
    if (kp % 64 != 0 || kp <= 0 || kp >= 131072 || so.n_ff <= 0 || so.n_ff % 8 != 0 || m > W4_MAX_M) {
        throw Error("CUDA w4a4 gate/up + SwiGLU: K = " + std::to_string(kp) + " (a positive multiple of 64 below 131072), "
                    "n_ff = " + std::to_string(so.n_ff) + " (a positive multiple of 8), m = " + std::to_string(m) +
                    " (at most " + std::to_string(W4_MAX_M) + ")");
    }
    if (lo.rank > 0 && (add || !lo.a || !lo.b || !lo.l || !lo.sync)) {
        throw Error("CUDA w4a4 gate/up + SwiGLU: the fused low-rank branch needs its tensors and workspace, and no other add");
    }
    if (m <= 0) return;
    const bool hi8 = m > 8;
    const gemv_fn f = mma == W4A4Mma::S4 ? gemv_pick_fmt<FmtS4, 2, 2, true>(true, hi8) : gemv_pick_fmt<FmtI4, 2, 2, true>(true, hi8);
    launch_pdl(f, dim3((unsigned) (so.n_ff / 8 + lo.rank)), dim3(256), 0, st, "gemv_w4a4_kernel<swiglu>", (const uint8_t *) codes,
               (const uint8_t *) qweight, scale, add, (const float *) nullptr, (float *) nullptr, m, 2 * so.n_ff,
               (int) (kp / 2), 0, cuda_pdl_mode() == 2 ? 1 : 0, so, lo);
}


// --- schemes w4a4d and w4a4 on the CUDA backend (their entries in cuda-backend.cu's table) ---------------------

// w4a4d: per-token codes and steps, then the w4a4 GEMV/GEMM with the step in its epilogue:
// y = (float(acc) · scale[n]) · step[t]
static void run_w4a4d(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    BackendCuda & b = cuda_of(be);
    const CudaLinear4 & p = cuda_linear4(lin);
    const size_t packed_bytes = ((size_t) m * lin.kp / 2 + 255) / 256 * 256;
    uint8_t * packed = (uint8_t *) b.scratch_for(packed_bytes + (size_t) m * sizeof(float));
    float * step = (float *) (packed + packed_bytes);
    cuda_quantize_dynamic(x, m, (int32_t) lin.k, lin.kp, packed, step, b.stream());
    cuda_linear_w4a4(p.qweight, p.scale, nullptr, step, lin.n, lin.kp, packed, false, m, y, accumulate, b.w4a4_mma(),
                     b.stream());
}

static void int_gemm_w4(Backend & be, const Linear & lin, const int8_t * a, int32_t m, int32_t * acc) {
    BackendCuda & b = cuda_of(be);
    const CudaLinear4 & p = cuda_linear4(lin);
    uint8_t * packed = (uint8_t *) b.scratch_for((size_t) m * lin.kp / 2);
    cuda_pack_codes(a, m, lin.kp, packed, b.stream());
    cuda_int_gemm(p.qweight, lin.n, lin.kp, packed, m, acc, b.stream());
}

// scratch of `bytes` (a multiple of 256) followed by the low-rank branch of lin on codes a, computed into it
// (lora = nullptr without one)
static void * scratch_with_lora(BackendCuda & b, const Linear & lin, const int8_t * a, int32_t m, size_t bytes,
                                float *& lora) {
    const size_t lora_bytes = lin.rank > 0 ? (size_t) m * (lin.rank * sizeof(double) + lin.n * sizeof(float)) : 0;
    uint8_t * buf = (uint8_t *) b.scratch_for(bytes + lora_bytes);
    lora = nullptr;
    if (lin.rank > 0) {
        const CudaLinear4 & p = cuda_linear4(lin);
        double * l = (double *) (buf + bytes);
        lora = (float *) (l + (size_t) m * lin.rank);
        cuda_lora(p.lora_a, p.lora_b, lin.rank, lin.n, lin.kp, a, m, l, lora, b.stream());
    }
    return buf;
}

// the decode low-rank branch of lin for the GEMV (LoraGemv; rank 0: none)
static LoraGemv lora_gemv_of(const Linear & lin) {
    LoraGemv lo;
    if (lin.rank <= 0) return lo;
    const CudaLinear4 & p = cuda_linear4(lin);
    lo.a = p.lora_a, lo.b = p.lora_b, lo.l = p.lora_l, lo.sync = p.lora_sync, lo.rank = (int32_t) lin.rank;
    return lo;
}

// prefill on cuBLAS (gemm-cublas-i8.cuh): the int8 codes as they are (no pack pass), the low-rank branch's l made
// first and B·l in the epilogue (ranks above CUBLAS_I8_MAX_RANK: the branch computed whole into `add`); false
// where cuBLAS declines the shape
static bool run_w4a4_cublas(BackendCuda & b, const Linear & lin, const CudaLinear4 & p, const int8_t * a, int32_t m,
                            float * y, bool accumulate) {
    const size_t work = cuda_cublas_i8_work_bytes(m, lin.n, lin.kp, I8Weights::I4);
    I8Epilogue ep;
    ep.scale = p.scale, ep.accumulate = accumulate;
    uint8_t * buf;
    if (lin.rank > CUBLAS_I8_MAX_RANK) {
        float * lora = nullptr;
        buf = (uint8_t *) scratch_with_lora(b, lin, a, m, work, lora);
        ep.add = lora;
    } else {
        const size_t l_bytes = ((size_t) m * lin.rank * sizeof(double) + 255) / 256 * 256;
        uint8_t * s = (uint8_t *) b.scratch_for(l_bytes + work);
        if (lin.rank > 0) {
            ep.lo.b = p.lora_b, ep.lo.l = (const double *) s, ep.lo.rank = (int32_t) lin.rank;
            cuda_lora_down(p.lora_a, lin.rank, lin.kp, a, m, (double *) s, b.stream());
        }
        buf = s + l_bytes;
    }
    return cuda_gemm_i8_cublas(p.qweight, I8Weights::I4, nullptr, 0, lin.n, lin.kp, a, m, ep, y, buf, work, b.stream());
}

// the GEMV (decode) reads the int8 codes as they are and computes the low-rank branch inside (LoraGemv); the
// GEMM reads packed codes, made by a pack pass (m·kp bytes, small next to the weights), and adds the branch
// computed before it (cuda_lora) in its epilogue
static void run_w4a4(Backend & be, const Linear & lin, const int8_t * a, int32_t m, float * y, bool accumulate) {
    BackendCuda & b = cuda_of(be);
    const CudaLinear4 & p = cuda_linear4(lin);
    if (m <= W4A4_GEMV_MAX_M) {
        cuda_linear_w4a4(p.qweight, p.scale, nullptr, nullptr, lin.n, lin.kp, a, true, m, y, accumulate, b.w4a4_mma(),
                         b.stream(), lora_gemv_of(lin));
        return;
    }
    if (cuda_cublas_i8_enabled(m) && run_w4a4_cublas(b, lin, p, a, m, y, accumulate)) return;
    const size_t packed_bytes = ((size_t) m * lin.kp / 2 + 255) / 256 * 256;
    if (lin.rank > 0 && lin.rank <= GEMM_LORA_MAX_RANK) {  // l first, B·l in the GEMM's epilogue
        uint8_t * packed = (uint8_t *) b.scratch_for(packed_bytes + (size_t) m * lin.rank * sizeof(double));
        GemmLora gl;
        gl.b = p.lora_b, gl.l = (const double *) (packed + packed_bytes), gl.rank = (int) lin.rank;
        cuda_lora_down(p.lora_a, lin.rank, lin.kp, a, m, (double *) gl.l, b.stream());
        cuda_pack_codes(a, m, lin.kp, packed, b.stream());
        cuda_linear_w4a4(p.qweight, p.scale, nullptr, nullptr, lin.n, lin.kp, packed, false, m, y, accumulate,
                         b.w4a4_mma(), b.stream(), LoraGemv(), gl);
        return;
    }
    float * lora = nullptr;
    uint8_t * packed = (uint8_t *) scratch_with_lora(b, lin, a, m, packed_bytes, lora);
    cuda_pack_codes(a, m, lin.kp, packed, b.stream());
    cuda_linear_w4a4(p.qweight, p.scale, lora, nullptr, lin.n, lin.kp, packed, false, m, y, accumulate, b.w4a4_mma(),
                     b.stream());
}

// down_proj's in_map by source channel for the fused SwiGLU epilogue (SwigluOut); padding slots go with the
// last channel, parts 0
static void build_swiglu_map(BackendCuda & b, const Linear & down, int32_t n_ff, CudaLinear4 & dp) {
    if (!down.in_map) throw Error("linear '" + down.name + "': the fused SwiGLU needs its in_map");
    const int32_t * im = down.in_map->as<int32_t>();
    std::vector<std::vector<int4>> by(n_ff);
    for (int64_t s = 0; s < down.kp; s++) {
        const int32_t j = im[3 * s], k = im[3 * s + 1], parts = im[3 * s + 2];
        if (j >= n_ff) throw Error("linear '" + down.name + "': in_map slot " + std::to_string(s) + " reads channel " +
                                   std::to_string(j) + " of " + std::to_string(n_ff));
        by[j >= 0 ? j : n_ff - 1].push_back(make_int4((int) s, j >= 0 ? k : 0, j >= 0 ? parts : 0, 0));
    }
    std::vector<int32_t> start(n_ff + 1, 0);
    std::vector<int4> slots;
    for (int32_t j = 0; j < n_ff; j++) {
        slots.insert(slots.end(), by[j].begin(), by[j].end());
        start[j + 1] = (int32_t) slots.size();
    }
    dp.swiglu_start = (int32_t *) b.upload_copy(start.data(), start.size() * sizeof(int32_t));
    dp.swiglu_slots = (int4 *) b.upload_copy(slots.data(), slots.size() * sizeof(int4));
}

// at decode sizes the gate/up GEMV's epilogue computes SwiGLU and writes down_proj's codes (no gu round trip,
// one launch fewer); prefill sizes take the two ops
void cuda_op_linear_codes_swiglu_quant(Backend & be, const Linear & gate_up, const int8_t * a, int32_t m,
                                       const Linear & down, int32_t n_ff, float * gu, int8_t * out) {
    BackendCuda & b = cuda_of(be);
    if (m > W4A4_GEMV_MAX_M || n_ff % 8 != 0 || gate_up.n != 2 * (int64_t) n_ff) {
        b.linear_codes_then_swiglu_quant(gate_up, a, m, down, n_ff, gu, out);
        return;
    }
    const CudaLinear4 & p = cuda_linear4(gate_up);
    CudaLinear4 & dp = const_cast<CudaLinear4 &>(cuda_linear4(down));  // the map is made once, at the first (eager) call
    if (!dp.swiglu_start) build_swiglu_map(b, down, n_ff, dp);

    SwigluOut so;
    so.start = dp.swiglu_start, so.slots = dp.swiglu_slots, so.out = out, so.kp = down.kp, so.n_ff = n_ff;
    cuda_linear_w4a4_swiglu(p.qweight, p.scale, nullptr, gate_up.kp, a, m, so, b.w4a4_mma(), b.stream(),
                            lora_gemv_of(gate_up));
}

const LinearKernels cuda_linear_w4a4d_kernels = {"w4a4d", 0, 0, cuda_prepare_linear4, cuda_release_linear4, run_w4a4d,
                                                 nullptr, int_gemm_w4};
const LinearKernels cuda_linear_w4a4_kernels = {"w4a4", 0, 0, cuda_prepare_linear4, cuda_release_linear4, nullptr,
                                                run_w4a4, int_gemm_w4};

}  // namespace mq
