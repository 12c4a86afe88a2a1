// The tiled tensor-core GEMM shared by the linear ops for prefill (M > 8):
//   y[m][n] = epilogue((float(Σ_k A[m][k]·B[n][k]) · scale[n] + add[m][n]) · row_scale[m]), A [M][K]
//   activations, B [N][K] weights, row-major along K; scale, add and row_scale optional.
// A 128x128 output tile per block of 8 warps (2 x 4, warp tile 64x32). K advances in chunks of 64 bytes
// per row (128 int4 or 32 fp16 values) staged in shared memory by cp.async, 4 stages deep, zero-filled
// past M, N and K; fragments are read with 16-byte shared loads (a quarter-warp reads 128 contiguous
// bytes: no bank conflicts) and fed to the MMA as mma.cuh describes. Measured where it runs, in bench/kernels/linear.cu.
#pragma once

#include "mma.cuh"
#include "linear-w4a4.cuh"  // GemmLora

#include <cuda_fp16.h>

namespace mq {

enum GemmEpilogue {
    GEMM_STORE,       // y = v
    GEMM_ACCUMULATE,  // y = y + v
    GEMM_REQUANT4,    // y (packed int4 [M][N/2]) = clamp(rint(v), -8, 7)
};

constexpr int GEMM_BM = 128, GEMM_BN = 128, GEMM_STAGES = 4;
constexpr int GEMM_SMEM = GEMM_STAGES * (GEMM_BM + GEMM_BN) * 64;

// v = float(acc) · scale[n] (scale == nullptr: float(acc)), the one fp32 multiply of the epilogue, rounded on its
// own (__fmul_rn: never contracted with the add that may follow into one fma, as on the CPU)
template <class Fmt>
__device__ __forceinline__ float gemm_value(typename Fmt::acc_t s, const float * scale, int n) {
    float f;
    if constexpr (Fmt::shift > 0) {
        f = (float) (s >> Fmt::shift);
    } else {
        f = (float) s;
    }
    return scale ? __fmul_rn(f, scale[n]) : f;
}

// The low-rank branch's up-projection in the epilogue (GemmLora, linear-w4a4.cuh): the tile's rows of l and b
// are staged in the shared memory the main loop no longer needs ([rank][128 + pad] doubles each), so
// rank <= GEMM_LORA_MAX_RANK.
constexpr int GEMM_LORA_LD = GEMM_BM + 2;  // doubles per staged rank row (+2: rows g and g + 8 in other banks)
constexpr int GEMM_LORA_MAX_RANK = GEMM_SMEM / (2 * GEMM_LORA_LD * (int) sizeof(double));

template <class Fmt>
__global__ void __launch_bounds__(256) gemm_mma_kernel(const uint8_t * __restrict__ A, const uint8_t * __restrict__ B,
                                                       const float * __restrict__ scale, const float * __restrict__ add,
                                                       const float * __restrict__ row_scale, void * __restrict__ y, int M,
                                                       int N, int kb, int epilogue, GemmLora lo = GemmLora()) {
    constexpr int BM = GEMM_BM, ROWS = GEMM_BM + GEMM_BN, STAGES = GEMM_STAGES;
    using acc_t = typename Fmt::acc_t;
    extern __shared__ uint4 smem[];  // [STAGES][ROWS][4]
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * GEMM_BN;
    const int nk = (kb + 63) / 64;

    // each thread copies 4 of a stage's 1024 16-byte pieces: piece tid + 256 i is row (tid + 256 i) / 4,
    // bytes 16·(tid % 4) of the row's chunk
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
        const int koff = kt * 64 + 16 * (tid & 3);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const bool ok = src_ok[i] && koff < kb;
            cp_async16(&smem[stage * ROWS * 4 + tid + 256 * i], src[i] + (ok ? koff : 0), ok ? 16 : 0);
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
        __syncthreads();  // stage kt has landed for all threads; nobody reads stage kt-1 any more
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

    // the low-rank rows of this tile: sl[i][r] = l[m0 + r, i], sb[i][c] = b[n0 + c, i] (0 past M, N)
    double * sl = (double *) smem;
    double * sb = sl + GEMM_LORA_MAX_RANK * GEMM_LORA_LD;
    if (lo.rank > 0) {
        __syncthreads();  // every warp is done with the last stage
        for (int q = tid; q < BM * lo.rank; q += 256) {
            const int r = q / lo.rank, i = q % lo.rank;
            sl[i * GEMM_LORA_LD + r] = m0 + r < M ? lo.l[(size_t) (m0 + r) * lo.rank + i] : 0.0;
            sb[i * GEMM_LORA_LD + r] = n0 + r < N ? (double) __half2float(((const __half *) lo.b)[(size_t) (n0 + r) * lo.rank + i]) : 0.0;
        }
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < 4; mt++) {
        // this thread's low-rank values of row tile mt: lv[h][nt][j] for rows g + 8h, columns 2t + j of tile nt
        double lv[2][4][2] = {};
        if (lo.rank > 0) {
            const int r = wm * 64 + mt * 16 + g;
            for (int i = 0; i < lo.rank; i++) {
                const double l0 = sl[i * GEMM_LORA_LD + r], l1 = sl[i * GEMM_LORA_LD + r + 8];
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    const double2 bb = *(const double2 *) &sb[i * GEMM_LORA_LD + wn * 32 + nt * 8 + 2 * t];
                    lv[0][nt][0] = fma(bb.x, l0, lv[0][nt][0]);
                    lv[0][nt][1] = fma(bb.y, l0, lv[0][nt][1]);
                    lv[1][nt][0] = fma(bb.x, l1, lv[1][nt][0]);
                    lv[1][nt][1] = fma(bb.y, l1, lv[1][nt][1]);
                }
            }
        }
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int m = m0 + wm * 64 + mt * 16 + g + 8 * h, n = n0 + wn * 32 + nt * 8 + 2 * t;
                if (m >= M || n >= N) continue;
                const bool has1 = n + 1 < N;
                float v0 = gemm_value<Fmt>(c[mt][nt][2 * h], scale, n);
                float v1 = has1 ? gemm_value<Fmt>(c[mt][nt][2 * h + 1], scale, n + 1) : 0.0f;
                if (lo.rank > 0) {  // v = float(acc) · scale + fp32(low-rank value), before accumulating
                    v0 += (float) lv[h][nt][0];
                    v1 += (float) lv[h][nt][1];
                } else if (add) {  // v = float(acc) · scale + add (a low-rank branch computed before), before accumulating
                    v0 += add[(size_t) m * N + n];
                    if (has1) v1 += add[(size_t) m * N + n + 1];
                }
                if (row_scale) {  // per-token dynamic step (w4a4d): v = (float(acc) · scale) · step[m], rounded
                    v0 = __fmul_rn(v0, row_scale[m]);  // before the accumulate (no fused multiply-add), as on the CPU
                    v1 = __fmul_rn(v1, row_scale[m]);
                }
                if (epilogue == GEMM_REQUANT4) {
                    const int q0 = max(-8, min(7, __float2int_rn(v0))), q1 = max(-8, min(7, __float2int_rn(v1)));
                    ((uint8_t *) y)[(size_t) m * (N / 2) + n / 2] = (uint8_t) ((q0 & 15) | ((q1 & 15) << 4));
                } else {
                    float * yo = (float *) y + (size_t) m * N + n;
                    if (epilogue == GEMM_ACCUMULATE) {
                        yo[0] += v0;
                        if (has1) yo[1] += v1;
                    } else {
                        yo[0] = v0;
                        if (has1) yo[1] = v1;
                    }
                }
            }
    }
}

}  // namespace mq
