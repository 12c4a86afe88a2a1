// The tiled tensor-core GEMM shared by the linear ops for prefill (M > 8):
//   y[m][n] = epilogue((float(Σ_k A[m][k]·B[n][k]) · scale[n] + add[m][n]) · row_scale[m]), A [M][K]
//   activations, B [N][K] weights, row-major along K; scale, add and row_scale optional.
// A 128x128 output tile per block of 8 warps (2 x 4, warp tile 64x32). K advances in chunks of 64 bytes
// per row (128 int4 or 32 fp16 values) staged in shared memory by cp.async, 4 stages deep, zero-filled
// past M, N and K; fragments are read with 16-byte shared loads (a quarter-warp reads 128 contiguous
// bytes: no bank conflicts) and fed to the MMA as mma.cuh describes. FmtA8W4 (int8 A, int4 B) stages
// 128 bytes of A per 64 of B (gemm_a8w4_main). Measured where it runs, in bench/kernels/linear.cu.
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
// dynamic shared memory of gemm_mma_kernel<Fmt>: the stages of A and B chunks
template <class Fmt> constexpr int gemm_smem() { return GEMM_STAGES * (GEMM_BM * Fmt::a_bytes + GEMM_BN * 64); }
constexpr int GEMM_SMEM = GEMM_STAGES * (GEMM_BM + GEMM_BN) * 64;  // every format with 64-byte A chunks

// w4a8g's integer group scales (FmtA8W4G): gscale U8 [N, ng], group k a group (a multiple of 64)
struct GemmGroups {
    const uint8_t * gscale = nullptr;
    int ng = 0, group = 0;
};

// The main loop of FmtA8W4 / FmtA8W4G (mma.cuh): a stage holds 128 A rows of 128 bytes and 128 B rows of 64 bytes
// (128 k each). A's 16-byte pieces p of row r are stored at p ^ 4·(r & 1) (a quarter-warp reads rows g and g + 1:
// their pieces t land in opposite bank halves); B is copied 8 bytes at a time into the thread order of the
// fragments (piece e of the row's chunk at byte 16e for e < 4, 16(e - 4) + 8 after), so a B fragment is one
// conflict-free 16-byte read, as for the other formats. Grouped: each 64-k half of a chunk is summed apart and
// added times gscale[n, k / group] (shifted back first: the products are 16·a·q); where the group is a multiple
// of 128 k the whole chunk is one sum.
template <class Fmt>
__device__ __forceinline__ void gemm_a8w4_main(const uint8_t * __restrict__ A, const uint8_t * __restrict__ B, int M, int N,
                                               int kb, int m0, int n0, const GemmGroups & gg, uint4 * smem,
                                               int32_t (&c)[4][4][4]) {
    constexpr int BM = GEMM_BM, STAGES = GEMM_STAGES;
    constexpr int A_U4 = BM * 8, STAGE_U4 = A_U4 + GEMM_BN * 4;  // uint4 per stage: A, then B
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    const int nk = (kb + 63) / 64, ka = 2 * kb;  // chunks; A row bytes
    const uint8_t * srca[4];
    const uint8_t * srcb[4];
    bool oka[4], okb[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int row = (tid + 256 * i) >> 3;  // piece (tid + 256 i) & 7 == tid & 7 of that row
        oka[i] = m0 + row < M, okb[i] = n0 + row < N;
        srca[i] = A + (size_t) (oka[i] ? m0 + row : 0) * ka;
        srcb[i] = B + (size_t) (okb[i] ? n0 + row : 0) * kb;
    }
    const int p = tid & 7;
    auto load = [&](int stage, int kt) {
        uint4 * sa = smem + stage * STAGE_U4;
        uint8_t * sb = (uint8_t *) (sa + A_U4);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = (tid + 256 * i) >> 3;
            const int oa = kt * 128 + 16 * p, ob = kt * 64 + 8 * p;
            const bool a_ok = oka[i] && oa < ka, b_ok = okb[i] && ob < kb;
            cp_async16(&sa[row * 8 + (p ^ ((row & 1) << 2))], srca[i] + (a_ok ? oa : 0), a_ok ? 16 : 0);
            cp_async8(sb + row * 64 + (p < 4 ? 16 * p : 16 * (p - 4) + 8), srcb[i] + (b_ok ? ob : 0), b_ok ? 8 : 0);
        }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nk) load(s, s);
        cp_async_commit();
    }
    // this thread's output columns n0 + wn·32 + nt·8 + 2t + j (clamped: columns past N are never stored)
    const uint8_t * gsp[4][2];
    if constexpr (Fmt::grouped) {
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) gsp[nt][j] = gg.gscale + (size_t) min(n0 + wn * 32 + nt * 8 + 2 * t + j, N - 1) * gg.ng;
    }
    for (int kt = 0; kt < nk; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < nk) load((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        cp_async_commit();

        const uint4 * sa = smem + (kt % STAGES) * STAGE_U4;
        const uint4 * sb = sa + A_U4;
        uint32_t bf[4][4][2];  // [step][n tile]
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            const uint4 rb = sb[(wn * 32 + nt * 8 + g) * 4 + t];
#pragma unroll
            for (int q = 0; q < 4; q++) Fmt::b_frag(rb, q, bf[q][nt]);
        }
        // grouped: the scales of the chunk's two halves
        int32_t gs[2][4][2];
        if constexpr (Fmt::grouped) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int grp = min((kt * 128 + 64 * h) / gg.group, gg.ng - 1);
#pragma unroll
                for (int nt = 0; nt < 4; nt++) gs[h][nt][0] = gsp[nt][0][grp], gs[h][nt][1] = gsp[nt][1][grp];
            }
        }
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {
            const int r = wm * 64 + mt * 16 + g, sw = (r & 1) << 2;  // rows r and r + 8: the same parity
            uint4 ra0[2], ra8[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                ra0[h] = sa[r * 8 + ((4 * h + t) ^ sw)];
                ra8[h] = sa[(r + 8) * 8 + ((4 * h + t) ^ sw)];
            }
            int32_t ch[4][4] = {};
#pragma unroll
            for (int q = 0; q < 4; q++) {
                uint32_t af[4];
                Fmt::a_frag(ra0, ra8, q, af);
#pragma unroll
                for (int nt = 0; nt < 4; nt++) Fmt::mma(Fmt::grouped ? ch[nt] : c[mt][nt], af, bf[q][nt]);
                if constexpr (Fmt::grouped) {
                    // the end of a group's sum: the whole chunk where chunks lie in one group (group % 128 == 0),
                    // else each half
                    if (q == 3 || (q == 1 && gg.group % 128 != 0)) {
                        const int h = q >> 1;
#pragma unroll
                        for (int nt = 0; nt < 4; nt++)
#pragma unroll
                            for (int e = 0; e < 4; e++) {
                                c[mt][nt][e] += gs[h][nt][e & 1] * (ch[nt][e] >> 4);
                                ch[nt][e] = 0;
                            }
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
}

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

// The main loop of the formats with 64-byte A chunks (FmtI4, FmtS4, FmtI8, FmtF16): a stage holds the chunks of
// 128 A rows and 128 B rows
template <class Fmt>
__device__ __forceinline__ void gemm_main(const uint8_t * __restrict__ A, const uint8_t * __restrict__ B, int M, int N,
                                          int kb, int m0, int n0, uint4 * smem, typename Fmt::acc_t (&c)[4][4][4]) {
    constexpr int BM = GEMM_BM, ROWS = GEMM_BM + GEMM_BN, STAGES = GEMM_STAGES;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
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
}

template <class Fmt>
__global__ void __launch_bounds__(256) gemm_mma_kernel(const uint8_t * __restrict__ A, const uint8_t * __restrict__ B,
                                                       const float * __restrict__ scale, const float * __restrict__ add,
                                                       const float * __restrict__ row_scale, void * __restrict__ y, int M,
                                                       int N, int kb, int epilogue, GemmLora lo = GemmLora(),
                                                       GemmGroups gg = GemmGroups()) {
    constexpr int BM = GEMM_BM;
    using acc_t = typename Fmt::acc_t;
    extern __shared__ uint4 smem[];  // the stages (gemm_smem<Fmt>), then the low-rank rows
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * GEMM_BN;

    acc_t c[4][4][4] = {};
    if constexpr (Fmt::a_bytes == 128) {
        gemm_a8w4_main<Fmt>(A, B, M, N, kb, m0, n0, gg, smem, c);
    } else {
        gemm_main<Fmt>(A, B, M, N, kb, m0, n0, smem, c);
    }

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
