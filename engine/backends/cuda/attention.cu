// Attention over the fp16 KV cache, one block per (query head, token):
//   s_j = (Σ_d q[d]·k_j[d]) * (1/sqrt(hd)),  p = softmax(s) over j <= pos,  o[d] = Σ_j p_j·v_j[d]
// fp32 arithmetic on fp16(q) and the fp16 cache (docs/numerics.md). Keys are visited in chunks of 256 with
// an online softmax (running max m and sum l; the accumulator is rescaled by exp(m_old − m_new)), so any
// context length fits in a fixed amount of shared memory. With one chunk (pos < 256) this is the CPU
// backend's algorithm up to summation order. Scores: one warp per key, lanes over d (coalesced rows);
// p·V: one thread per output dimension d, reading V rows coalesced.
// TODO(perf): decode runs n_head blocks only; split the cache across blocks (flash-decoding) for long contexts.
#include "attention.cuh"
#include "cuda-common.cuh"

#include <cuda_fp16.h>

#include <cmath>

namespace mq {

constexpr int ATT_THREADS = 128, ATT_CHUNK = 256, ATT_MAX_HD = 256;

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

static __global__ void __launch_bounds__(ATT_THREADS) attention_kernel(
    const float * __restrict__ qkv, int32_t row_stride, int32_t n_head, int32_t n_head_kv, int32_t hd,
    const int32_t * __restrict__ pos, const __half * __restrict__ kc, const __half * __restrict__ vc,
    float * __restrict__ out) {
    __shared__ float q[ATT_MAX_HD];
    __shared__ float p[ATT_CHUNK];
    __shared__ float red[ATT_THREADS / 32];
    const int32_t h = blockIdx.x, t = blockIdx.y;
    const int32_t kvh = h / (n_head / n_head_kv), kv_dim = n_head_kv * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float scale = 1.0f / sqrtf((float) hd);
    const float * qrow = qkv + (size_t) t * row_stride + (size_t) h * hd;
    for (int d = threadIdx.x; d < hd; d += ATT_THREADS) q[d] = __half2float(__float2half_rn(qrow[d]));
    __syncthreads();

    const int32_t n_kv = pos[t] + 1;
    float m_run = -INFINITY, l_run = 0.0f;
    float acc[ATT_MAX_HD / ATT_THREADS] = {};  // dims d = threadIdx.x + ATT_THREADS·i
    for (int32_t j0 = 0; j0 < n_kv; j0 += ATT_CHUNK) {
        const int32_t nc = min(ATT_CHUNK, n_kv - j0);
        for (int32_t j = warp; j < nc; j += ATT_THREADS / 32) {
            const __half * krow = kc + (size_t) (j0 + j) * kv_dim + (size_t) kvh * hd;
            float s = 0.0f;
            for (int d = lane; d < hd; d += 32) s += q[d] * __half2float(krow[d]);
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
            if (lane == 0) p[j] = s * scale;
        }
        __syncthreads();
        float mx = -INFINITY;
        for (int j = threadIdx.x; j < nc; j += ATT_THREADS) mx = fmaxf(mx, p[j]);
        const float m_new = fmaxf(m_run, block_reduce(mx, true, red));
        float sum = 0.0f;
        for (int j = threadIdx.x; j < nc; j += ATT_THREADS) {
            const float e = expf(p[j] - m_new);
            p[j] = e;
            sum += e;
        }
        sum = block_reduce(sum, false, red);  // its barriers also publish p
        const float alpha = expf(m_run - m_new);  // 0 on the first chunk (m_run = -inf)
        l_run = l_run * alpha + sum;
#pragma unroll
        for (int i = 0; i < ATT_MAX_HD / ATT_THREADS; i++) {
            const int d = threadIdx.x + ATT_THREADS * i;
            if (d < hd) {
                const __half * vcol = vc + (size_t) j0 * kv_dim + (size_t) kvh * hd + d;
                float a = 0.0f;
                for (int32_t j = 0; j < nc; j++) a += p[j] * __half2float(vcol[(size_t) j * kv_dim]);
                acc[i] = acc[i] * alpha + a;
            }
        }
        m_run = m_new;
        __syncthreads();  // p is rewritten by the next chunk
    }
    const float inv = 1.0f / l_run;
    float * o = out + (size_t) t * n_head * hd + (size_t) h * hd;
#pragma unroll
    for (int i = 0; i < ATT_MAX_HD / ATT_THREADS; i++) {
        const int d = threadIdx.x + ATT_THREADS * i;
        if (d < hd) o[d] = acc[i] * inv;
    }
}

void cuda_attention(const float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                    int32_t head_dim, const int32_t * pos, const void * k_cache, const void * v_cache, float * out,
                    cudaStream_t st) {
    if (head_dim > ATT_MAX_HD || n_head_kv <= 0 || n_head % n_head_kv != 0) {
        throw Error("CUDA attention: head_dim " + std::to_string(head_dim) + " (at most " +
                    std::to_string(ATT_MAX_HD) + ") or heads " + std::to_string(n_head) + "/" +
                    std::to_string(n_head_kv) + " (a multiple) not supported");
    }
    if (n_tokens <= 0) return;
    attention_kernel<<<dim3(n_head, n_tokens), ATT_THREADS, 0, st>>>(qkv, row_stride, n_head, n_head_kv, head_dim, pos,
                                                                     (const __half *) k_cache, (const __half *) v_cache, out);
    cuda_check_launch("attention_kernel");
}

}  // namespace mq
