// Attention output → o_proj's int4 codes, equal to the CPU backend's (attention-quant.cuh). Two kernels:
//  - round: a thread per channel rounds the fp32 o; a channel within the band of a rounding boundary puts its
//    (token, head) on a list, once (a mark per head);
//  - exact: a block per listed head recomputes the head's attention as the CPU does, in float64: qc =
//    fp32(fp16(q)·c), s_j = qc·k_j over the causal keys (a thread per key), the softmax over tiles of 128 keys
//    with a running maximum, o[d] = Σ p_j·v_j[d] / Σ p_j (a thread per channel), rounded once to fp32, then to
//    the codes of the whole head. (A running maximum in float64 changes only the last bits of a double, which
//    do not reach the fp32 o in practice.) The worst case, every head listed, costs one float64 attention.
//    The blocks stride over the list, so the launch has one shape for each token count (the decode step's
//    CUDA graph holds it); each block clears the marks of its heads, and the last block out zeroes the count
//    (no memset node between the kernels, which are chained with PDL).
#include "attention-quant.cuh"
#include "cuda-common.cuh"
#include "kv8.cuh"

#include <cuda_fp16.h>

#include <algorithm>

namespace mq {

constexpr int EXACT_THREADS = 128;  // keys of a tile, channels per pass
constexpr int EXACT_MAX_BLOCKS = 1056;
constexpr int EXACT_MAX_HD = 256;

// [count, blocks done | marks: cap | list: cap], cap heads from the buffer's size, so that the marks of one launch
// never lie where another launch (another m) wrote its list
size_t cuda_attention_quant_workspace(int32_t m, int32_t n_head) {
    return 256 + 2 * (size_t) m * n_head * sizeof(uint32_t);
}

static __global__ void attention_round_kernel(const float * __restrict__ o, int32_t q_dim, int32_t hd, int64_t kp,
                                              float band, int8_t * __restrict__ codes, uint32_t * __restrict__ count,
                                              uint32_t * __restrict__ marks, uint32_t * __restrict__ list) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const int32_t t = blockIdx.y, n_head = q_dim / hd;
    for (int64_t c = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; c < kp; c += (int64_t) gridDim.x * blockDim.x) {
        if (c >= q_dim) {
            codes[(size_t) t * kp + c] = 0;
            continue;
        }
        const float v = o[(size_t) t * q_dim + c];
        codes[(size_t) t * kp + c] = (int8_t) max(-8, min(7, __float2int_rn(v)));
        // distance to the nearest x.5; codes clamped far outside [-8.5, 7.5] cannot change
        if (fabsf(v - floorf(v) - 0.5f) < band * fmaxf(1.0f, fabsf(v)) && v > -9.0f && v < 8.0f) {
            const uint32_t head = (uint32_t) (t * n_head + c / hd);
            if (atomicExch(&marks[head], 1u) == 0u) list[atomicAdd(count, 1u)] = head;
        }
    }
}

__device__ __forceinline__ double block_reduce_f64(double v, bool is_max, double * red) {
    for (int off = 16; off > 0; off >>= 1) {
        const double o = __shfl_xor_sync(0xffffffffu, v, off);
        v = is_max ? fmax(v, o) : v + o;
    }
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    double r = red[0];
    for (int w = 1; w < EXACT_THREADS / 32; w++) r = is_max ? fmax(r, red[w]) : r + red[w];
    __syncthreads();  // red is reused by the next reduction
    return r;
}

// a cache element as the CPU reads it: fp16 widened, or an int8 code times its channel's step (one fp32 multiply)
// (element i of a row, channel ch of the head's steps s)
__device__ __forceinline__ float cache_value(const __half * c, size_t i, const float *, int) { return __half2float(c[i]); }
__device__ __forceinline__ float cache_value(const int8_t * c, size_t i, const float * s, int ch) {
    return __fmul_rn((float) c[i], s[ch]);
}

template <typename T>
static __global__ void __launch_bounds__(EXACT_THREADS) attention_exact_kernel(
    const float * __restrict__ qkv, int32_t row_stride, int32_t n_head, int32_t n_head_kv, int32_t hd,
    const int32_t * __restrict__ pos, const T * __restrict__ kc, const T * __restrict__ vc,
    const float * __restrict__ k_scale, const float * __restrict__ v_scale, int64_t kp,
    uint32_t * __restrict__ count, uint32_t * __restrict__ marks, const uint32_t * __restrict__ list,
    int8_t * __restrict__ codes) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the list comes from the kernel before
    __shared__ float qs[EXACT_MAX_HD];
    __shared__ double p[EXACT_THREADS];
    __shared__ double red[EXACT_THREADS / 32];
    const int tid = threadIdx.x;
    const int32_t kv_dim = n_head_kv * hd;
    const float c = (float) (1.0 / sqrt((double) hd));
    const uint32_t n = *count;
    for (uint32_t e = blockIdx.x; e < n; e += gridDim.x) {
        const uint32_t head = list[e];
        const int32_t t = (int32_t) (head / n_head), h = (int32_t) (head % n_head);
        const int32_t kvh = h / (n_head / n_head_kv), n_kv = pos[t] + 1;
        const float * q = qkv + (size_t) t * row_stride + (size_t) h * hd;
        for (int i = tid; i < hd; i += EXACT_THREADS) qs[i] = __fmul_rn(__half2float(__float2half_rn(q[i])), c);
        __syncthreads();
        const T * kb = kc + (size_t) kvh * hd;
        const T * vb = vc + (size_t) kvh * hd;
        const float * ks = k_scale ? k_scale + (size_t) kvh * hd : nullptr;
        const float * vs = v_scale ? v_scale + (size_t) kvh * hd : nullptr;
        double m_run = -INFINITY, l_run = 0.0, acc[EXACT_MAX_HD / EXACT_THREADS] = {};
        for (int32_t j0 = 0; j0 < n_kv; j0 += EXACT_THREADS) {
            const int32_t j = j0 + tid, nk = min(EXACT_THREADS, n_kv - j0);
            double s = -INFINITY;
            if (j < n_kv) {
                const T * kr = kb + (size_t) j * kv_dim;
                double part[4] = {0.0, 0.0, 0.0, 0.0};  // hd is a multiple of 8
                for (int i0 = 0; i0 < hd; i0 += 64) {  // 8 loads of 8 elements in flight, then their math
                    Kv8<T> r[8];
#pragma unroll
                    for (int c = 0; c < 8; c++) {
                        if (i0 + 8 * c < hd) r[c].load(kr + i0 + 8 * c); else r[c].zero();
                    }
#pragma unroll
                    for (int c = 0; c < 8; c++) {
                        if (i0 + 8 * c >= hd) break;
                        float f[8];
                        r[c].widen(f);
#pragma unroll
                        for (int e = 0; e < 8; e++) {
                            const int i = i0 + 8 * c + e;
                            // the cache value as the CPU reads it: fp16 widened, or code times its step
                            const float kv = ks ? __fmul_rn(f[e], ks[i]) : f[e];
                            part[e & 3] += (double) qs[i] * (double) kv;
                        }
                    }
                }
                s = (part[0] + part[1]) + (part[2] + part[3]);
            }
            const double m_new = fmax(m_run, block_reduce_f64(s, true, red));
            const double ej = j < n_kv ? exp(s - m_new) : 0.0;
            p[tid] = ej;
            const double sum = block_reduce_f64(ej, false, red);  // its barriers also publish p
            const double alpha = exp(m_run - m_new);                // 0 on the first tile (m_run = -inf)
            l_run = l_run * alpha + sum;
            m_run = m_new;
            for (int u = 0; u * EXACT_THREADS + tid < hd; u++) {
                const int d = u * EXACT_THREADS + tid;
                double a[4] = {acc[u] * alpha, 0.0, 0.0, 0.0};  // four chains in flight
#pragma unroll 4
                for (int jj = 0; jj < nk; jj++) {
                    a[jj & 3] += p[jj] * (double) cache_value(vb, (size_t) (j0 + jj) * kv_dim + d, vs, d);
                }
                acc[u] = (a[0] + a[1]) + (a[2] + a[3]);
            }
            __syncthreads();  // p is rewritten by the next tile
        }
        for (int u = 0; u * EXACT_THREADS + tid < hd; u++) {
            const int d = u * EXACT_THREADS + tid;
            const float o = (float) (acc[u] / l_run);
            codes[(size_t) t * kp + (size_t) h * hd + d] = (int8_t) max(-8, min(7, __float2int_rn(o)));
        }
        if (tid == 0) marks[head] = 0;
        __syncthreads();  // qs is rewritten for the next head
    }
    // the last block out zeroes the count (and its own ticket) for the next launch
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(count + 1, 1u) == gridDim.x - 1) {
            count[0] = 0;
            count[1] = 0;
        }
    }
}

void cuda_attention_quant(const float * out, const float * qkv, int32_t m, int32_t row_stride, int32_t n_head,
                          int32_t n_head_kv, int32_t head_dim, const int32_t * pos, const void * k_cache,
                          const void * v_cache, const float * k_scale, const float * v_scale, int64_t kp, void * workspace,
                          size_t workspace_bytes, int8_t * codes, cudaStream_t st) {
    if (m <= 0) return;
    if (head_dim > EXACT_MAX_HD || head_dim % 8 != 0) {
        throw Error("CUDA attention_quant: head_dim " + std::to_string(head_dim) + " must be a multiple of 8 up to " +
                    std::to_string(EXACT_MAX_HD));
    }
    const size_t cap = (workspace_bytes - 256) / (2 * sizeof(uint32_t));
    if (workspace_bytes < 256 || (size_t) m * n_head > cap) {
        throw Error("CUDA attention_quant: workspace of " + std::to_string(workspace_bytes) + " bytes for " +
                    std::to_string(m) + " x " + std::to_string(n_head) + " heads");
    }
    uint32_t * count = (uint32_t *) workspace;  // zeroed when allocated, left zero by each launch
    uint32_t * marks = (uint32_t *) ((uint8_t *) workspace + 256);
    uint32_t * list = marks + cap;
    const int32_t q_dim = n_head * head_dim;
    launch_pdl(attention_round_kernel, dim3((unsigned) ceil_div(kp, 256), (unsigned) m), dim3(256), 0, st,
               "attention_round_kernel", out, q_dim, head_dim, kp, CUDA_ATTN_EXACT_BAND, codes, count, marks, list);
    // a block per head of the batch, up to 8 per SM of an H100; more listed heads than blocks only take longer
    const unsigned blocks = (unsigned) std::min<int64_t>(EXACT_MAX_BLOCKS, (int64_t) m * n_head);
    if (k_scale) {
        launch_pdl(attention_exact_kernel<int8_t>, dim3(blocks), dim3(EXACT_THREADS), 0, st, "attention_exact_kernel<i8>",
                   qkv, row_stride, n_head, n_head_kv, head_dim, pos, (const int8_t *) k_cache, (const int8_t *) v_cache,
                   k_scale, v_scale, kp, count, marks, (const uint32_t *) list, codes);
    } else {
        launch_pdl(attention_exact_kernel<__half>, dim3(blocks), dim3(EXACT_THREADS), 0, st, "attention_exact_kernel<f16>",
                   qkv, row_stride, n_head, n_head_kv, head_dim, pos, (const __half *) k_cache, (const __half *) v_cache,
                   (const float *) nullptr, (const float *) nullptr, kp, count, marks, (const uint32_t *) list, codes);
    }
}

}  // namespace mq
