// Sampling on the device: one block of 1024 threads takes the decisions of mq::Sampler (mq-sampling.cpp) on
// the same logits and the same uniform draw, and only the token id comes back to the host.
//  1. repetition penalty into a scratch copy of the logits (fp32 ops as on the host);
//  2. greedy: block argmax, ties to the lower id;
//  3. else the C = min(K, 1024) best candidates (K = top_k, or the whole vocabulary) by a radix select on
//     order-preserving keys (4 passes of 8 bits, warp-aggregated shared histograms), gathered with the ties
//     at the threshold taken in id order, and sorted by (logit desc, id asc) in shared memory (bitonic);
//  4. the host's float64 arithmetic in the host's order: p_i = exp(l_i - l_0) (in parallel), the sum,
//     the cumulative top-p cut and the min-p cut (one thread: sequential, like the host), the weights at the
//     temperature (in parallel) and the draw (one thread).
// Where the cut may lie past the 1024 best (top-p or min-p over the whole vocabulary on a flat distribution)
// or 1024 < top_k < n_vocab, it writes -1 and the host samples. For K > 1024 the normalizer is a parallel
// sum (another order than the host's: the last bits of a double may differ, which decides nothing in practice).
#include "sampling.cuh"
#include "cuda-common.cuh"

#include "../../src/mq-sampling.h"

#include <climits>

namespace mq {

constexpr int ST = 1024;  // threads of the block
constexpr unsigned FULL = 0xffffffffu;

// larger logit -> larger key; -0 and +0 share one key (the host compares them equal)
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// a comes before b in the host's order: the larger logit, then the lower id
__device__ __forceinline__ bool before(float av, int32_t ai, float bv, int32_t bi) {
    return av > bv || (av == bv && ai < bi);
}

struct SampleShared {
    float val[SAMPLE_CAP];
    int32_t id[SAMPLE_CAP];
    double p[SAMPLE_CAP];
    uint32_t hist[256];
    uint32_t warp_off[32];
    double warp_sum[32];
    float best_v[32];
    int32_t best_i[32];
    uint32_t prefix, remaining, n_gt, n_found_gt, eq_base, tile_eq;
    double sum;
    int32_t keep;
    bool done;
};

static __global__ void __launch_bounds__(ST) sample_kernel(const float * __restrict__ logits, int32_t n, float temperature,
                                                           int32_t top_k, float top_p, float min_p, float penalty,
                                                           const int32_t * __restrict__ pen, int32_t n_pen, double u,
                                                           float * __restrict__ work, int32_t * __restrict__ out) {
    __shared__ SampleShared sh;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // 1. repetition penalty (CTRL / Hugging Face): positive logits divided by it, negative ones multiplied
    for (int i = tid; i < n; i += ST) work[i] = logits[i];
    __syncthreads();
    if (penalty != 1.0f) {
        for (int j = tid; j < n_pen; j += ST) {
            const int32_t id = pen[j];
            if (id >= 0 && id < n) {
                const float l = logits[id];
                work[id] = l > 0.0f ? __fdiv_rn(l, penalty) : __fmul_rn(l, penalty);
            }
        }
        __syncthreads();
    }

    // 2. greedy
    if (temperature == 0.0f) {
        float bv = -INFINITY;
        int32_t bi = INT_MAX;
        for (int i = tid; i < n; i += ST) {
            const float v = work[i];
            if (before(v, i, bv, bi)) bv = v, bi = i;
        }
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(FULL, bv, off);
            const int32_t oi = __shfl_xor_sync(FULL, bi, off);
            if (before(ov, oi, bv, bi)) bv = ov, bi = oi;
        }
        if (lane == 0) sh.best_v[warp] = bv, sh.best_i[warp] = bi;
        __syncthreads();
        if (warp == 0) {
            bv = sh.best_v[lane], bi = sh.best_i[lane];
            for (int off = 16; off > 0; off >>= 1) {
                const float ov = __shfl_xor_sync(FULL, bv, off);
                const int32_t oi = __shfl_xor_sync(FULL, bi, off);
                if (before(ov, oi, bv, bi)) bv = ov, bi = oi;
            }
            if (lane == 0) *out = bi;
        }
        return;
    }

    const bool all = top_k <= 0 || top_k >= n;
    if (!all && top_k > SAMPLE_CAP) {
        if (tid == 0) *out = -1;
        return;
    }
    const int32_t K = all ? n : top_k, C = min(K, SAMPLE_CAP);

    // 3a. radix select: the key T of the C-th best, n_gt keys above it, need_eq ties at T to take
    if (tid == 0) sh.prefix = 0, sh.remaining = (uint32_t) C, sh.n_gt = 0;
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += ST) sh.hist[b] = 0;
        __syncthreads();
        const uint32_t prefix = sh.prefix;
        for (int i0 = 0; i0 < n; i0 += ST) {  // the same trip count for every thread: whole warps below
            const int i = i0 + tid;
            const uint32_t k = i < n ? order_key(work[i]) : 0;
            const bool match = i < n && (k & mask) == prefix;
            const uint32_t d = (k >> shift) & 255u;
            const unsigned act = __ballot_sync(FULL, match);
            if (match) {
                const unsigned peers = __match_any_sync(act, d);  // lanes with the same digit: one atomic
                if (lane == __ffs(peers) - 1) atomicAdd(&sh.hist[d], (uint32_t) __popc(peers));
            }
        }
        __syncthreads();
        if (warp == 0) {
            // lane l holds digits 255-8l down to 248-8l; an inclusive scan from the top finds the C-th's digit
            uint32_t c8[8], tot = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) c8[j] = sh.hist[255 - 8 * lane - j], tot += c8[j];
            uint32_t incl = tot;
            for (int off = 1; off < 32; off <<= 1) {
                const uint32_t v = __shfl_up_sync(FULL, incl, off);
                if (lane >= off) incl += v;
            }
            const uint32_t rem = sh.remaining;
            const int first = __ffs(__ballot_sync(FULL, incl >= rem)) - 1;
            if (lane == first) {
                uint32_t above = incl - tot;
                int d = 0;
                for (int j = 0; j < 8; j++) {
                    if (above + c8[j] >= rem) {
                        d = 255 - 8 * lane - j;
                        break;
                    }
                    above += c8[j];
                }
                sh.remaining = rem - above, sh.n_gt += above, sh.prefix |= (uint32_t) d << shift;
            }
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    const uint32_t T = sh.prefix, n_gt = sh.n_gt, need_eq = sh.remaining;  // n_gt + need_eq == C

    // 3b. gather: keys above T in any order, the ties at T in id order (the host's tie rule)
    if (tid == 0) sh.n_found_gt = 0, sh.eq_base = 0;
    __syncthreads();
    for (int i0 = 0; i0 < n; i0 += ST) {
        const int i = i0 + tid;
        const float v = i < n ? work[i] : 0.0f;
        const uint32_t k = i < n ? order_key(v) : 0;
        const bool gt = i < n && k > T, eq = i < n && k == T;
        if (gt) {
            const uint32_t pos = atomicAdd(&sh.n_found_gt, 1u);
            sh.val[pos] = v, sh.id[pos] = i;
        }
        const unsigned m_eq = __ballot_sync(FULL, eq);
        if (lane == 0) sh.warp_off[warp] = (uint32_t) __popc(m_eq);
        __syncthreads();
        if (warp == 0) {  // exclusive scan of the warps' tie counts
            const uint32_t c = sh.warp_off[lane];
            uint32_t incl = c;
            for (int off = 1; off < 32; off <<= 1) {
                const uint32_t x = __shfl_up_sync(FULL, incl, off);
                if (lane >= off) incl += x;
            }
            sh.warp_off[lane] = incl - c;
            if (lane == 31) sh.tile_eq = incl;
        }
        __syncthreads();
        if (eq) {
            const uint32_t rank = sh.eq_base + sh.warp_off[warp] + (uint32_t) __popc(m_eq & ((1u << lane) - 1u));
            if (rank < need_eq) sh.val[n_gt + rank] = v, sh.id[n_gt + rank] = i;
        }
        __syncthreads();
        if (tid == 0) {
            sh.eq_base += sh.tile_eq;
            sh.done = sh.n_found_gt == n_gt && sh.eq_base >= need_eq;
        }
        __syncthreads();
        if (sh.done) break;  // one value for every thread (written again only after two more barriers)
    }

    // 3c. bitonic sort of the C candidates (padded to a power of two), best first
    int P = 1;
    while (P < C) P <<= 1;
    for (int i = C + tid; i < P; i += ST) sh.val[i] = -INFINITY, sh.id[i] = INT_MAX;
    __syncthreads();
    for (int k = 2; k <= P; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = tid; i < P; i += ST) {
                const int x = i ^ j;
                if (x > i) {
                    const float av = sh.val[i], bv = sh.val[x];
                    const int32_t ai = sh.id[i], bi = sh.id[x];
                    const bool up = (i & k) == 0;
                    if (up ? before(bv, bi, av, ai) : before(av, ai, bv, bi)) {
                        sh.val[i] = bv, sh.val[x] = av, sh.id[i] = bi, sh.id[x] = ai;
                    }
                }
            }
            __syncthreads();
        }
    }

    // 4. the host's float64 arithmetic: p_i = exp(l_i - l_0) at temperature 1 for the cuts
    const double l0 = sh.val[0];
    for (int i = tid; i < C; i += ST) sh.p[i] = exp((double) sh.val[i] - l0);
    if (K > C) {  // the normalizer over the whole vocabulary
        double s = 0.0;
        for (int i = tid; i < n; i += ST) s += exp((double) work[i] - l0);
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL, s, off);
        if (lane == 0) sh.warp_sum[warp] = s;
    }
    __syncthreads();
    if (tid == 0) {
        double sum = 0.0;
        if (K > C) {
            for (int w = 0; w < ST / 32; w++) sum += sh.warp_sum[w];
        } else {
            for (int i = 0; i < C; i++) sum += sh.p[i];
        }
        int32_t keep = K;  // K > C and no top-p cut among the C: somewhere past them
        if (top_p < 1.0f) {
            double cum = 0.0;
            for (int i = 0; i < C; i++) {
                cum += sh.p[i] / sum;
                if (cum >= (double) top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if (min_p > 0.0f) {  // p_k >= min_p · p_max, p_max = p_0 = 1
            int32_t k = 1;
            while (k < keep && k < C && sh.p[k] >= (double) min_p) k++;
            if (k < C || k >= keep) keep = k;  // else the min-p cut, too, lies past the C candidates
        }
        sh.keep = keep > C ? -1 : keep;
    }
    __syncthreads();
    const int32_t keep = sh.keep;
    if (keep < 0) {
        if (tid == 0) *out = -1;
        return;
    }
    for (int i = tid; i < keep; i += ST) sh.p[i] = exp(((double) sh.val[i] - l0) / (double) temperature);
    __syncthreads();
    if (tid == 0) {
        double total = 0.0;
        for (int i = 0; i < keep; i++) total += sh.p[i];
        double r = u * total;
        int32_t pick = sh.id[keep - 1];
        for (int i = 0; i < keep; i++) {
            r -= sh.p[i];
            if (r < 0.0) {
                pick = sh.id[i];
                break;
            }
        }
        *out = pick;
    }
}

void cuda_sample(const float * logits, int32_t n_vocab, const SamplingParams & sp, double u, const int32_t * penalty_ids,
                 int32_t n_penalty, float * work, int32_t * out, cudaStream_t st) {
    sample_kernel<<<1, ST, 0, st>>>(logits, n_vocab, sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.repetition_penalty,
                                    penalty_ids, n_penalty, u, work, out);
    cuda_check_launch("sample_kernel");
}

}  // namespace mq
