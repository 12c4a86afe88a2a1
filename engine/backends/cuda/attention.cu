// Attention over the KV cache (docs/numerics.md), token t of query head h against cache rows [0, pos[t]]:
//   s_j = (Σ_d q[d]·k_j[d]) · (1/sqrt(hd)),  p = softmax(s),  o[d] = Σ_j p_j·v_j[d]
// with q = fp16(q) and fp32 arithmetic. The cache holds fp16 values, or int8 codes with per-channel steps
// (k_j[d] = code·s_k[d], v_j[d] = code·s_v[d]); the kernels are templated on the element type and read the
// int8 codes as they are, with the steps folded where the arithmetic allows: s_k into q (Σ_d (q[d]·s_k[d])·code)
// and s_v after the p·v sum (o[d] = s_v[d]·Σ_j p_j·code_j[d]). Two kernels:
//  - split (decode, n_tokens <= ATT_SPLIT_MAX_T): flash-decoding. The keys of each (token, head) are cut
//    into n_split ranges, one block each, so a decode step fills the GPU (n_head blocks alone leave most
//    SMs idle and walk the cache serially). The ranges are computed from pos on the device, so a captured
//    decode step (CUDA graph) stays valid at every position. A block keeps an online softmax (max m, sum l,
//    unnormalized o) and writes it to a workspace; the last block of a (token, head) to finish, found with
//    an atomic ticket, merges them: M = max m_s, o = Σ e^(m_s−M)·o_s / Σ e^(m_s−M)·l_s. Scores: one thread
//    per key (its 16-byte loads walk the key's row); p·V: threads over (key group, 8 dims).
//  - prefill (more tokens, head_dim 64 or 128): tiled, flash-attention style, on fp16 tensor cores
//    (mma.m16n8k16, fp32 accumulation). A block of 4 warps owns 64 queries of one head, each warp 16; key
//    tiles of 64 rows are staged in shared memory by cp.async, two stages deep. S = Q·Kᵀ is exact products
//    of fp16 values summed in fp32; P stays fp32 for the softmax statistics and is fed to P·V as two fp16
//    halves P = hi + lo (hi = fp16(P), lo = fp16(P − hi)), so rounding P to fp16 costs no accuracy.
//    int8 caches: the tiles are staged as int8 and widened to fp16 in shared memory (codes are exact in
//    fp16); Q·diag(s_k) is fed as two fp16 halves the same way, each row first scaled by a power of two into
//    [2^14, 2^15) so the low half stays a normal fp16 (undone, exactly, with the 1/sqrt(hd) factor).
// Other head sizes run the split kernel with one range per (token, head).
#include "attention.cuh"
#include "cuda-common.cuh"
#include "kv8.cuh"
#include "mma.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace mq {

constexpr int ATT_THREADS = 128, ATT_MAX_HD = 256, ATT_SPLIT_MAX_T = 8;
// the workspace starts with a fixed block of tickets, so the partials of a launch of one shape never land
// on the tickets of another (the tickets must stay zero between launches)
constexpr int ATT_TICKETS = ATT_SPLIT_MAX_T * 256;
// a range of the split kernel holds at least this many keys (shorter ones cost more in the merge than they
// save), and there are at most ATT_THREADS ranges (one per thread of the merging block)
constexpr int ATT_MIN_RANGE = 64;

// sum (is_max false) or max over the block; red holds one value per warp
static __device__ float block_reduce(float v, bool is_max, float * red) {
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    __syncthreads();  // red may still be read from the previous reduction
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
    for (int i = 1; i < ATT_THREADS / 32; i++) r = is_max ? fmaxf(r, red[i]) : r + red[i];
    return r;
}

template <typename T> constexpr bool KV_I8 = std::is_same<T, int8_t>::value;

// grid (n_split, n_head, n_tokens). part: per (token, head, range) o[hd], m, l; tickets: per (token, head),
// zero between launches (the merging block resets its own). A single range writes out directly. int8 caches:
// ks, vs are the steps [n_head_kv * hd]; q holds fp16(q)·s_k and each range's o is multiplied by s_v.
template <typename T>
static __global__ void __launch_bounds__(ATT_THREADS) attention_split_kernel(
    const float * __restrict__ qkv, int32_t row_stride, int32_t n_head, int32_t n_head_kv, int32_t hd,
    const int32_t * __restrict__ pos, const T * __restrict__ kc, const T * __restrict__ vc,
    const float * __restrict__ ks, const float * __restrict__ vs, float * __restrict__ part,
    uint32_t * __restrict__ tickets, float * __restrict__ out) {
    constexpr bool I8 = KV_I8<T>;
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    __shared__ float q[ATT_MAX_HD];
    __shared__ float p[ATT_THREADS];
    __shared__ float red[ATT_THREADS / 32];
    __shared__ float osum[ATT_THREADS * 8];
    __shared__ bool last;
    const int32_t split = blockIdx.x, n_split = gridDim.x, h = blockIdx.y, t = blockIdx.z;
    const int32_t kvh = h / (n_head / n_head_kv), kv_dim = n_head_kv * hd;
    const int tid = threadIdx.x;
    const float scale = 1.0f / sqrtf((float) hd);
    const float * qrow = qkv + (size_t) t * row_stride + (size_t) h * hd;
    for (int d = tid; d < hd; d += ATT_THREADS) {
        q[d] = __half2float(__float2half_rn(qrow[d]));
        if constexpr (I8) q[d] *= ks[kvh * hd + d];
    }

    // ranges of at least ATT_MIN_RANGE keys: n_used <= n_split of them hold keys, the blocks past them exit
    const int32_t n_kv = pos[t] + 1, per = max(ATT_MIN_RANGE, (n_kv + n_split - 1) / n_split);
    const int32_t n_used = min(n_split, (n_kv + per - 1) / per);
    if (split >= n_used) return;
    const int32_t j0 = split * per, j1 = min(n_kv, j0 + per);
    // p·V layout: thread = (key group kg, dims 8·cg .. 8·cg + 7)
    const int n_cg = hd / 8, n_kg = ATT_THREADS / n_cg, cg = tid % n_cg, kg = tid / n_cg;
    const bool pv_thread = kg < n_kg;  // hd = 8·n_cg may not divide 128: the rest idle in p·V
    const T * kbase = kc + (size_t) kvh * hd;
    const T * vbase = vc + (size_t) kvh * hd + 8 * cg;
    float m_run = -INFINITY, l_run = 0.0f, acc[8] = {};
    __syncthreads();
    for (int32_t jt = j0; jt < j1; jt += ATT_THREADS) {
        const int32_t j = jt + tid, nk = min(ATT_THREADS, j1 - jt);
        float s = -INFINITY;
        if (j < j1) {
            // 8 loads issued before their math (GPU issue is in order: a load used at once stalls the next)
            const T * krow = kbase + (size_t) j * kv_dim;
            float dot = 0.0f;
            for (int d0 = 0; d0 < hd; d0 += 64) {
                Kv8<T> kr[8];
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    if (d0 + 8 * i < hd) kr[i].load(krow + d0 + 8 * i);
                    else kr[i].zero();
                }
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    if (d0 + 8 * i >= hd) break;
                    float k8[8];
                    kr[i].widen(k8);
#pragma unroll
                    for (int e = 0; e < 8; e++) dot += q[d0 + 8 * i + e] * k8[e];
                }
            }
            s = dot * scale;
        }
        const float m_new = fmaxf(m_run, block_reduce(s, true, red));
        const float e = j < j1 ? expf(s - m_new) : 0.0f;
        p[tid] = e;
        const float sum = block_reduce(e, false, red);  // its barriers also publish p
        const float alpha = expf(m_run - m_new);       // 0 on the first tile (m_run = -inf)
        l_run = l_run * alpha + sum;
        m_run = m_new;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] *= alpha;
        if (pv_thread) {
            for (int jb = kg; jb < nk; jb += 8 * n_kg) {  // 8 V rows in flight per thread
                Kv8<T> vr[8];
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const int jj = jb + i * n_kg;
                    if (jj < nk) vr[i].load(vbase + (size_t) (jt + jj) * kv_dim);
                    else vr[i].zero();
                }
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const int jj = jb + i * n_kg;
                    if (jj >= nk) break;
                    float v8[8];
                    vr[i].widen(v8);
                    const float pj = p[jj];
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[e] += pj * v8[e];
                }
            }
        }
        __syncthreads();  // p is rewritten by the next tile
    }
    // o of this range: the key groups' partial sums
    if (pv_thread) {
#pragma unroll
        for (int i = 0; i < 8; i++) osum[kg * hd + 8 * cg + i] = acc[i];
    }
    __syncthreads();
    const size_t th = (size_t) t * n_head + h;
    // Σ_j p_j·v_j[d] of this range: the key groups' partial sums (int8: times the step s_v[d])
    auto range_o = [&](int d) {
        float o = 0.0f;
        for (int g = 0; g < n_kg; g++) o += osum[g * hd + d];
        if constexpr (I8) o *= vs[kvh * hd + d];
        return o;
    };
    if (n_used == 1) {
        const float inv = 1.0f / l_run;
        for (int d = tid; d < hd; d += ATT_THREADS) out[th * hd + d] = range_o(d) * inv;
        return;
    }
    float * mine = part + (th * n_split + split) * (hd + 2);
    for (int d = tid; d < hd; d += ATT_THREADS) mine[d] = range_o(d);
    if (tid == 0) mine[hd] = m_run, mine[hd + 1] = l_run;
    __threadfence();  // the partial is visible to the merging block before the ticket is taken
    __syncthreads();
    if (tid == 0) {
        last = atomicAdd(&tickets[th], 1u) == (uint32_t) n_used - 1;
        if (last) tickets[th] = 0;  // every block of this (token, head) has taken its ticket
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // merge: thread s < n_used (<= ATT_THREADS) takes range s's statistics, so the block reads them at once
    const float * all = part + th * n_split * (hd + 2);
    const float ms = tid < n_used ? __ldcg(all + tid * (hd + 2) + hd) : -INFINITY;
    const float ls = tid < n_used ? __ldcg(all + tid * (hd + 2) + hd + 1) : 0.0f;
    const float m_max = block_reduce(ms, true, red);
    const float w = tid < n_used ? expf(ms - m_max) : 0.0f;
    p[tid] = w;
    const float inv = 1.0f / block_reduce(w * ls, false, red);  // its barriers also publish p
    for (int d = tid; d < hd; d += ATT_THREADS) {
        float o = 0.0f;
        for (int s0 = 0; s0 < n_used; s0 += 8) {  // 8 loads in flight
            float v[8];
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = s0 + i < n_used ? __ldcg(all + (s0 + i) * (hd + 2) + d) : 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i++) o += s0 + i < n_used ? p[s0 + i] * v[i] : 0.0f;
        }
        out[th * hd + d] = o * inv;
    }
}

__device__ __forceinline__ uint32_t half2_bits(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);  // a in the low half (the lower k or column)
    return *(const uint32_t *) &h;
}

// (a, b) as two fp16 pairs hi + lo: hi = fp16(x), lo = fp16(x − hi) (x − hi is exact in fp32), so an mma
// over hi and lo sees x to about 22 bits
__device__ __forceinline__ void half2_split(float a, float b, uint32_t & hi, uint32_t & lo) {
    const __half2 h = __floats2half2_rn(a, b);
    const float2 hf = __half22float2(h);
    const __half2 l = __floats2half2_rn(a - hf.x, b - hf.y);
    hi = *(const uint32_t *) &h;
    lo = *(const uint32_t *) &l;
}

__device__ __forceinline__ void mma_f16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// four 8x8 fp16 matrices from shared memory (PTX 9.7.14.5.15 ldmatrix); lanes 8i..8i+7 give the row
// addresses of matrix i. Without .trans lane 4g + t receives (row g, columns 2t, 2t+1) of each; with .trans
// (rows 2t, 2t+1, column g).
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x4(const void * smem, uint32_t r[4]) {
    const uint32_t a = (uint32_t) __cvta_generic_to_shared(smem);
    if constexpr (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    }
}

constexpr int ATT_BQ = 64, ATT_BK = 64;
// shared memory: 2 stages of a K and a V tile, rows of HD halves padded by 16 bytes so the 8 row addresses
// of an ldmatrix fall in different banks; int8 caches: 2 stages of the K and V tiles as loaded (rows of HD
// bytes), then one fp16 K and V tile pair they are widened into
template <int HD, typename T> constexpr int att_prefill_smem() {
    return KV_I8<T> ? 2 * 2 * ATT_BK * HD + 2 * ATT_BK * (HD + 8) * 2 : 2 * 2 * ATT_BK * (HD + 8) * 2;
}

// grid (n_head, ceil(n_tokens / 64)), 4 warps; warp w owns query rows 16w .. 16w + 15 of the block. Fragment
// names as in mma.cuh: lane = 4g + t; accumulator c0, c1 = (row g, columns 2t, 2t+1), c2, c3 = row g + 8.
// int8 caches: ks, vs are the steps [n_head_kv * HD].
template <int HD, typename T>
static __global__ void __launch_bounds__(ATT_THREADS) attention_prefill_kernel(
    const float * __restrict__ qkv, int32_t row_stride, int32_t n_tokens, int32_t n_head, int32_t n_head_kv,
    const int32_t * __restrict__ pos, const T * __restrict__ kc, const T * __restrict__ vc,
    const float * __restrict__ ks_step, const float * __restrict__ vs_step, float * __restrict__ out) {
    pdl_trigger();
    constexpr bool I8 = KV_I8<T>;
    constexpr int LD = HD + 8, KSTEPS = HD / 16, NT_S = ATT_BK / 8, NT_O = HD / 8;
    constexpr int TILE = ATT_BK * LD;  // halves
    // a staged tile as loaded: fp16 rows of LD halves (the tile itself), or int8 rows of HD codes
    constexpr int PITCH = I8 ? HD : LD, RAW = ATT_BK * PITCH;
    extern __shared__ __align__(16) uint8_t smem[];
    T * raw = (T *) smem;  // [stage][K tile, V tile]
    __half * tiles = I8 ? (__half *) (smem + 2 * 2 * RAW) : (__half *) smem;  // int8: the widened K, V pair
    __shared__ int32_t pos_max;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    // the heads side by side, the query blocks last first: the blocks with the most keys (causal) start first
    // and the grid ends on short ones
    const int32_t h = blockIdx.x, kvh = h / (n_head / n_head_kv), kv_dim = n_head_kv * HD;
    const int32_t t0 = (gridDim.y - 1 - blockIdx.y) * ATT_BQ;
    const int32_t r0 = t0 + warp * 16 + g, r1 = r0 + 8;
    const int32_t p0 = pos[min(r0, n_tokens - 1)], p1 = pos[min(r1, n_tokens - 1)];
    if (tid == 0) pos_max = 0;
    __syncthreads();
    if (tid < ATT_BQ) atomicMax(&pos_max, pos[min(t0 + tid, n_tokens - 1)]);
    __syncthreads();
    const int32_t n_keys = pos_max + 1, n_tiles = (n_keys + ATT_BK - 1) / ATT_BK;

    // stage a tile: rows past n_keys are zero-filled (V rows there meet p = 0; garbage could be NaN)
    auto load = [&](int stage, int tile) {
        constexpr int E = 16 / sizeof(T);  // elements per 16-byte copy
        T * ks = raw + stage * 2 * RAW;
        T * vs = ks + RAW;
        for (int i = tid; i < ATT_BK * HD / E; i += ATT_THREADS) {
            const int r = i / (HD / E), c = E * (i % (HD / E));
            const int32_t j = tile * ATT_BK + r;
            const bool ok = j < n_keys;
            const size_t off = (size_t) (ok ? j : 0) * kv_dim + (size_t) kvh * HD + c;
            cp_async16(ks + r * PITCH + c, kc + off, ok ? 16 : 0);
            cp_async16(vs + r * PITCH + c, vc + off, ok ? 16 : 0);
        }
    };
    load(0, 0);
    cp_async_commit();

    // Q as A fragments: (row g, k 2t..2t+1), (row g+8, ..), (row g, k 8+2t..), (row g+8, ..) per 16 dims.
    // int8: q' = fp16(q)·s_k[d] in fp32, each row scaled by 2^e into [2^14, 2^15) and split into fp16 halves
    // qa + ql; fs0, fs1 (rows g, g + 8) turn the scores back: S·2^-e·(1/sqrt(HD)).
    uint32_t qa[KSTEPS][4];
    uint32_t ql[I8 ? KSTEPS : 1][4];
    const float scale = 1.0f / sqrtf((float) HD);
    float fs0 = scale, fs1 = scale;
    {
        const float * q0 = qkv + (size_t) min(r0, n_tokens - 1) * row_stride + (size_t) h * HD + 2 * t;
        const float * q1 = qkv + (size_t) min(r1, n_tokens - 1) * row_stride + (size_t) h * HD + 2 * t;
        if constexpr (!I8) {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk++) {
                const float2 a = *(const float2 *) (q0 + 16 * kk), b = *(const float2 *) (q1 + 16 * kk);
                const float2 c = *(const float2 *) (q0 + 16 * kk + 8), d = *(const float2 *) (q1 + 16 * kk + 8);
                qa[kk][0] = half2_bits(a.x, a.y), qa[kk][1] = half2_bits(b.x, b.y);
                qa[kk][2] = half2_bits(c.x, c.y), qa[kk][3] = half2_bits(d.x, d.y);
            }
        } else {
            const float * sk = ks_step + (size_t) kvh * HD + 2 * t;
            float v[KSTEPS][8];  // per 16 dims: row g (2t, 2t+1), row g+8 (same), row g (8+2t, ..), row g+8
            float m0 = 0.0f, m1 = 0.0f;
            auto q16 = [](float x) { return __half2float(__float2half_rn(x)); };
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk++) {
                const float2 a = *(const float2 *) (q0 + 16 * kk), b = *(const float2 *) (q1 + 16 * kk);
                const float2 c = *(const float2 *) (q0 + 16 * kk + 8), d = *(const float2 *) (q1 + 16 * kk + 8);
                const float2 sa = *(const float2 *) (sk + 16 * kk), sc = *(const float2 *) (sk + 16 * kk + 8);
                v[kk][0] = q16(a.x) * sa.x, v[kk][1] = q16(a.y) * sa.y;
                v[kk][2] = q16(b.x) * sa.x, v[kk][3] = q16(b.y) * sa.y;
                v[kk][4] = q16(c.x) * sc.x, v[kk][5] = q16(c.y) * sc.y;
                v[kk][6] = q16(d.x) * sc.x, v[kk][7] = q16(d.y) * sc.y;
                m0 = fmaxf(m0, fmaxf(fmaxf(fabsf(v[kk][0]), fabsf(v[kk][1])), fmaxf(fabsf(v[kk][4]), fabsf(v[kk][5]))));
                m1 = fmaxf(m1, fmaxf(fmaxf(fabsf(v[kk][2]), fabsf(v[kk][3])), fmaxf(fabsf(v[kk][6]), fabsf(v[kk][7]))));
            }
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {  // the 4 threads of a quad share a row
                m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, off));
                m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, off));
            }
            int e0, e1;  // m = f·2^e with f in [0.5, 1): m·2^(15-e) in [2^14, 2^15)
            frexpf(m0, &e0);
            frexpf(m1, &e1);
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int e = i & 1 ? 15 - e1 : 15 - e0;  // fragment registers alternate rows g, g + 8
                    half2_split(ldexpf(v[kk][2 * i], e), ldexpf(v[kk][2 * i + 1], e), qa[kk][i], ql[kk][i]);
                }
            }
            fs0 = ldexpf(scale, e0 - 15);
            fs1 = ldexpf(scale, e1 - 15);
        }
    }
    float o[NT_O][4] = {};
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // rows g and g + 8 (l: this thread's columns)

    for (int it = 0; it < n_tiles; it++) {
        if (it + 1 < n_tiles) load((it + 1) & 1, it + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // tile it has landed for every thread
        const __half * ks;
        if constexpr (I8) {
            // widen the stage's codes into the fp16 tiles (exact: |code| <= 127), 8 a thread at a time
            const int8_t * src = raw + (it & 1) * 2 * RAW;
            for (int i = tid; i < 2 * ATT_BK * HD / 8; i += ATT_THREADS) {
                const int m = i / (ATT_BK * HD / 8), rest = i % (ATT_BK * HD / 8);
                const int r = rest / (HD / 8), c = 8 * (rest % (HD / 8));
                const uint2 w = *(const uint2 *) (src + m * RAW + r * HD + c);
                const int8_t * b = (const int8_t *) &w;
                uint4 hv;
                uint32_t * hw = (uint32_t *) &hv;
#pragma unroll
                for (int e = 0; e < 4; e++) hw[e] = half2_bits((float) b[2 * e], (float) b[2 * e + 1]);
                *(uint4 *) (tiles + m * TILE + r * LD + c) = hv;
            }
            __syncthreads();
            ks = tiles;
        } else {
            ks = tiles + (it & 1) * 2 * TILE;
        }
        const __half * vs = ks + TILE;

        // S = Q·Kᵀ: B fragment (k = dim, n = key) of keys 8nt.. is row-major K, read by ldmatrix without
        // .trans: matrices (dims 16kk, 16kk + 8, 16kk + 16, 16kk + 24) give b0, b1 of steps kk and kk + 1
        float s[NT_S][4] = {};
#pragma unroll
        for (int nt = 0; nt < NT_S; nt++) {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk += 2) {
                uint32_t b[4];
                ldmatrix_x4<false>(ks + (nt * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8, b);
                mma_f16(s[nt], qa[kk], b[0], b[1]);
                mma_f16(s[nt], qa[kk + 1], b[2], b[3]);
                if constexpr (I8) {
                    mma_f16(s[nt], ql[kk], b[0], b[1]);
                    mma_f16(s[nt], ql[kk + 1], b[2], b[3]);
                }
            }
        }
        // causal mask and online softmax; the 4 threads of a quad share a row
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT_S; nt++) {
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int32_t j = it * ATT_BK + nt * 8 + 2 * t + c;
                s[nt][c] = j <= p0 ? s[nt][c] * fs0 : -INFINITY;
                s[nt][2 + c] = j <= p1 ? s[nt][2 + c] * fs1 : -INFINITY;
                mx0 = fmaxf(mx0, s[nt][c]);
                mx1 = fmaxf(mx1, s[nt][2 + c]);
            }
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        // key 0 is in the first tile and visible to every row, so the maxima are finite from there on
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float a0 = expf(m0 - n0), a1 = expf(m1 - n1);
        m0 = n0, m1 = n1;
        l0 *= a0, l1 *= a1;
#pragma unroll
        for (int nt = 0; nt < NT_O; nt++) o[nt][0] *= a0, o[nt][1] *= a0, o[nt][2] *= a1, o[nt][3] *= a1;
#pragma unroll
        for (int nt = 0; nt < NT_S; nt++) {
#pragma unroll
            for (int c = 0; c < 2; c++) {
                s[nt][c] = expf(s[nt][c] - n0);
                s[nt][2 + c] = expf(s[nt][2 + c] - n1);
                l0 += s[nt][c];
                l1 += s[nt][2 + c];
            }
        }
        // O += P·V over 16 keys a step: the A fragment of P is the S accumulators of key tiles 2kk, 2kk + 1;
        // the B fragment (k = key, n = dim) of row-major V comes from ldmatrix .trans, matrices (keys +0,
        // +8) x (dims 8nt, 8nt + 8) give b0, b1 of dim tiles nt and nt + 1
#pragma unroll
        for (int kk = 0; kk < ATT_BK / 16; kk++) {
            uint32_t ph[4], pl[4];
            const float * f[4] = {&s[2 * kk][0], &s[2 * kk][2], &s[2 * kk + 1][0], &s[2 * kk + 1][2]};
#pragma unroll
            for (int i = 0; i < 4; i++) half2_split(f[i][0], f[i][1], ph[i], pl[i]);
#pragma unroll
            for (int nt = 0; nt < NT_O; nt += 2) {
                uint32_t b[4];
                ldmatrix_x4<true>(vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nt * 8 + (lane >> 4) * 8, b);
                mma_f16(o[nt], ph, b[0], b[1]);
                mma_f16(o[nt], pl, b[0], b[1]);
                mma_f16(o[nt + 1], ph, b[2], b[3]);
                mma_f16(o[nt + 1], pl, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is loaded again
    }
    cp_async_wait<0>();
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    const float i0 = 1.0f / l0, i1 = 1.0f / l1;
#pragma unroll
    for (int nt = 0; nt < NT_O; nt++) {
        const int d = h * HD + nt * 8 + 2 * t;
        if constexpr (I8) {  // o[d] = s_v[d]·Σ_j p_j·code_j[d]
            const float2 sv = *(const float2 *) (vs_step + (size_t) kvh * HD + nt * 8 + 2 * t);
            o[nt][0] *= sv.x, o[nt][1] *= sv.y, o[nt][2] *= sv.x, o[nt][3] *= sv.y;
        }
        if (r0 < n_tokens) *(float2 *) (out + (size_t) r0 * n_head * HD + d) = make_float2(o[nt][0] * i0, o[nt][1] * i0);
        if (r1 < n_tokens) *(float2 *) (out + (size_t) r1 * n_head * HD + d) = make_float2(o[nt][2] * i1, o[nt][3] * i1);
    }
}

// ranges per (token, head) of the split kernel: up to about 4 blocks per SM over the whole launch
static int32_t att_splits(int32_t n_tokens, int32_t n_head, int32_t n_ctx) {
    if (n_tokens > ATT_SPLIT_MAX_T || (int64_t) n_tokens * n_head > ATT_TICKETS) return 1;
    const int sms = cuda_sm_count();
    const int64_t want = ceil_div(4 * (int64_t) sms, (int64_t) n_head * n_tokens);
    return (int32_t) std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(n_ctx, ATT_MIN_RANGE), (int64_t) ATT_THREADS}));
}

size_t cuda_attention_workspace(int32_t n_tokens, int32_t n_head, int32_t head_dim, int32_t n_ctx) {
    const int32_t ns = att_splits(n_tokens, n_head, n_ctx);
    if (ns == 1) return 0;
    return ATT_TICKETS * sizeof(uint32_t) + (size_t) n_tokens * n_head * ns * (head_dim + 2) * sizeof(float);
}

template <int HD, typename T>
static void launch_prefill(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                           const int32_t * pos, const T * kc, const T * vc, const float * ks, const float * vs,
                           float * out, cudaStream_t st) {
    static std::atomic<uint64_t> smem_set{0};
    cuda_once_per_device(smem_set, [] {
        cuda_check(cudaFuncSetAttribute(attention_prefill_kernel<HD, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        att_prefill_smem<HD, T>()),
                   "cudaFuncSetAttribute(attention_prefill_kernel)");
    });
    const dim3 grid((unsigned) n_head, (unsigned) ceil_div(n_tokens, ATT_BQ));
    attention_prefill_kernel<HD, T><<<grid, ATT_THREADS, att_prefill_smem<HD, T>(), st>>>(
        qkv, row_stride, n_tokens, n_head, n_head_kv, pos, kc, vc, ks, vs, out);
    cuda_check_launch("attention_prefill_kernel");
}

// the launches for one cache element type (ks, vs: the int8 steps, null for fp16)
template <typename T>
static void attention_launch(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                             int32_t head_dim, int32_t n_ctx, const int32_t * pos, const T * kc, const T * vc,
                             const float * ks, const float * vs, void * workspace, float * out, cudaStream_t st) {
    if (n_tokens > ATT_SPLIT_MAX_T && head_dim == 64) {
        launch_prefill<64>(qkv, n_tokens, row_stride, n_head, n_head_kv, pos, kc, vc, ks, vs, out, st);
        return;
    }
    if (n_tokens > ATT_SPLIT_MAX_T && head_dim == 128) {
        launch_prefill<128>(qkv, n_tokens, row_stride, n_head, n_head_kv, pos, kc, vc, ks, vs, out, st);
        return;
    }
    const int32_t ns = att_splits(n_tokens, n_head, n_ctx);
    if (ns > 1 && !workspace) throw Error("CUDA attention: the split kernel needs its workspace");
    uint32_t * tickets = (uint32_t *) workspace;
    float * part = ns > 1 ? (float *) (tickets + ATT_TICKETS) : nullptr;
    launch_pdl(attention_split_kernel<T>, dim3(ns, n_head, n_tokens), dim3(ATT_THREADS), 0, st,
               "attention_split_kernel", qkv, row_stride, n_head, n_head_kv, head_dim, pos, kc, vc, ks, vs, part,
               tickets, out);
}

void cuda_attention(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                    int32_t head_dim, int32_t n_ctx, const int32_t * pos, const void * k_cache, const void * v_cache,
                    const float * k_scale, const float * v_scale, void * workspace, float * out, cudaStream_t st) {
    if (head_dim > ATT_MAX_HD || head_dim % 8 != 0 || n_head_kv <= 0 || n_head % n_head_kv != 0) {
        throw Error("CUDA attention: head_dim " + std::to_string(head_dim) + " (a multiple of 8, at most " +
                    std::to_string(ATT_MAX_HD) + ") or heads " + std::to_string(n_head) + "/" +
                    std::to_string(n_head_kv) + " (a multiple) not supported");
    }
    if (n_tokens <= 0) return;
    if (k_scale) {
        if (!v_scale) throw Error("CUDA attention: the int8 KV cache needs the steps of k and of v");
        attention_launch(qkv, n_tokens, row_stride, n_head, n_head_kv, head_dim, n_ctx, pos, (const int8_t *) k_cache,
                         (const int8_t *) v_cache, k_scale, v_scale, workspace, out, st);
    } else {
        attention_launch(qkv, n_tokens, row_stride, n_head, n_head_kv, head_dim, n_ctx, pos, (const __half *) k_cache,
                         (const __half *) v_cache, nullptr, nullptr, workspace, out, st);
    }
}

}  // namespace mq
