// The split-K GEMVs' meeting point (linear-f16.cu, linear-w4a16g.cu, linear-w4a4.cu): every warp of a block holds
// the MMA accumulators c[NT][4] of the same NT tiles of 8 weight rows over its share of K; they meet in shared
// memory and are summed over the warps in warp order 0, 1, ... (a fixed order: the result does not depend on
// scheduling; integer sums are exact in any order). Register r of lane l of an m16n8 accumulator holds row
// l / 4 + 8·(r / 2), column 2·(l % 4) + r % 2 of the tile.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mq {

template <typename T, int WARPS, int NT> using SplitK = T[WARPS][NT][4][32];

// warp `warp`'s accumulators into red, then a barrier
template <typename T, int WARPS, int NT>
__device__ __forceinline__ void splitk_store(SplitK<T, WARPS, NT> & red, const T (&c)[NT][4], int warp, int lane) {
#pragma unroll
    for (int i = 0; i < NT; i++)
#pragma unroll
        for (int r = 0; r < 4; r++) red[warp][i][r][lane] = c[i][r];
    __syncthreads();
}

// Σ over the warps of register r of lane l in tile i
template <typename T, int WARPS, int NT>
__device__ __forceinline__ T splitk_sum(const SplitK<T, WARPS, NT> & red, int i, int r, int l) {
    T s = 0;
#pragma unroll
    for (int v = 0; v < WARPS; v++) s += red[v][i][r][l];
    return s;
}

// The epilogue of the fp32-input GEMVs whose MMA rows g carry the hi part of token g and rows g + 8 its lo part
// (x = hi + lo, linear-f16.cu): thread p < NT·32 takes tile p / 32 and its lane's pair of columns and writes
// y = Σ_warps hi-row + Σ_warps lo-row (accumulate: y +=)
template <int WARPS, int NT>
__device__ __forceinline__ void splitk_store_hi_lo(const SplitK<float, WARPS, NT> & red, float * __restrict__ y, int M,
                                                   int N, int accumulate) {
    const int p = threadIdx.x;
    if (p >= NT * 32) return;
    const int i = p >> 5, l = p & 31;
    const int m = l >> 2, n = (blockIdx.x * NT + i) * 8 + 2 * (l & 3);
    if (m >= M || n >= N) return;
    const float h0 = splitk_sum<float, WARPS, NT>(red, i, 0, l), h1 = splitk_sum<float, WARPS, NT>(red, i, 1, l);
    const float l0 = splitk_sum<float, WARPS, NT>(red, i, 2, l), l1 = splitk_sum<float, WARPS, NT>(red, i, 3, l);
    float * yo = y + (size_t) m * N + n;
    if (accumulate) {
        yo[0] += h0 + l0;
        if (n + 1 < N) yo[1] += h1 + l1;
    } else {
        yo[0] = h0 + l0;
        if (n + 1 < N) yo[1] = h1 + l1;
    }
}

}  // namespace mq
