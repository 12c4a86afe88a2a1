// Static W4A4 activation codes and the small integer helpers around the w4a4 GEMM.
// Rounding: rint = round half to even (rintf), then clamp; NaN becomes 0, as in the CPU backend.
// Splitting: a channel's code t on the m-times wider range goes to its parts k = 0..m-1 as
// floordiv(t + k, m), which sum to t (docs/numerics.md).
#include "quantize.cuh"
#include "cuda-common.cuh"
#include "mma.cuh"

#include <cuda_fp16.h>

namespace mq {


// The code producers run on a grid (slot blocks of Q_SLOTS, rows): one block per row would leave a decode
// step's 4096-11008 slots to a single SM. Each block of rmsnorm_quant recomputes its row's sum of squares
// (D floats, cached), in the same order, so every block rounds the same r.
constexpr int Q_SLOTS = 1024, Q_PER = Q_SLOTS / 256;  // launched with 256 threads

static __global__ void rmsnorm_quant_kernel(const float * __restrict__ x, const float * __restrict__ in_scale,
                                            const int32_t * __restrict__ in_map, int32_t dim, int64_t kp, float eps,
                                            int8_t * __restrict__ out) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const float * xr = x + (size_t) blockIdx.y * dim;
    const float inv = block_rms_factor(xr, dim, eps);  // float64 sum like the CPU backend: the same r
    int8_t * o = out + (size_t) blockIdx.y * kp;
    // a thread's Q_SLOTS / 256 slots of each round: the map, then the gathered inputs, then the codes, each
    // batch of loads issued together (the maps come from device memory every step). Decode launches a block
    // per Q_SLOTS slots (one round each: the row spread over SMs); prefill a block per row (every round: the
    // row's r computed once)
    for (int64_t s0 = (int64_t) blockIdx.x * Q_SLOTS + threadIdx.x; s0 - threadIdx.x < kp; s0 += (int64_t) gridDim.x * Q_SLOTS) {
        int32_t jm[Q_PER], km[Q_PER], pm[Q_PER];
        float z[Q_PER];
#pragma unroll
        for (int u = 0; u < Q_PER; u++) {
            const int64_t s = s0 + u * 256;
            jm[u] = s < kp ? in_map[3 * s] : -1, km[u] = s < kp ? in_map[3 * s + 1] : 0, pm[u] = s < kp ? in_map[3 * s + 2] : 1;
        }
#pragma unroll
        for (int u = 0; u < Q_PER; u++) z[u] = jm[u] < 0 ? 0.0f : (xr[jm[u]] * inv) * in_scale[jm[u]];
#pragma unroll
        for (int u = 0; u < Q_PER; u++) {
            const int64_t s = s0 + u * 256;
            if (s < kp) o[s] = jm[u] < 0 ? 0 : slot_code(z[u], km[u], pm[u]);
        }
    }
}

static __global__ void quantize_codes_kernel(const float * __restrict__ x, int32_t k, int64_t kp, int8_t * __restrict__ out) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const float * xr = x + (size_t) blockIdx.y * k;
    int8_t * o = out + (size_t) blockIdx.y * kp;
    const int64_t s0 = (int64_t) blockIdx.x * Q_SLOTS + threadIdx.x;
    float v[Q_PER];
#pragma unroll
    for (int u = 0; u < Q_PER; u++) v[u] = s0 + u * 256 < k ? xr[s0 + u * 256] : 0.0f;
#pragma unroll
    for (int u = 0; u < Q_PER; u++) {
        const int64_t s = s0 + u * 256;
        if (s < kp) o[s] = s < k ? (int8_t) round_clamp(v[u], -8, 7) : 0;
    }
}

static __global__ void swiglu_quant_kernel(const float * __restrict__ gu, const int32_t * __restrict__ in_map, int32_t n_ff,
                                           int64_t kp, int8_t * __restrict__ out) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const float * g = gu + (size_t) blockIdx.y * 2 * n_ff;
    int8_t * o = out + (size_t) blockIdx.y * kp;
    const int64_t s0 = (int64_t) blockIdx.x * Q_SLOTS + threadIdx.x;
    int32_t jm[Q_PER], km[Q_PER], pm[Q_PER];
    float gv[Q_PER], uv[Q_PER];
#pragma unroll
    for (int u = 0; u < Q_PER; u++) {
        const int64_t s = s0 + u * 256;
        jm[u] = s < kp ? in_map[3 * s] : -1, km[u] = s < kp ? in_map[3 * s + 1] : 0, pm[u] = s < kp ? in_map[3 * s + 2] : 1;
    }
#pragma unroll
    for (int u = 0; u < Q_PER; u++) gv[u] = jm[u] < 0 ? 0.0f : g[jm[u]], uv[u] = jm[u] < 0 ? 0.0f : g[n_ff + jm[u]];
#pragma unroll
    for (int u = 0; u < Q_PER; u++) {
        const int64_t s = s0 + u * 256;
        if (s < kp) o[s] = jm[u] < 0 ? 0 : slot_code(swiglu_value(gv[u], uv[u]), km[u], pm[u]);
    }
}

// w4a4d: one block per row. amax = max_k |x[k]|; a = clamp(rint(x · (7 / amax))) straight into packed int4
// (the GEMM's operand), step = amax / 7 (both fp32 divisions, as the CPU backend); amax = 0 gives a = 0.
static __global__ void quantize_dynamic_kernel(const float * __restrict__ x, int32_t k, int64_t kp,
                                               uint8_t * __restrict__ packed, float * __restrict__ step) {
    pdl_trigger();
    const float * xr = x + (size_t) blockIdx.x * k;
    float amax = 0.0f;
    for (int32_t i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(xr[i]));
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    __shared__ float part[32];
    __shared__ float amax_row;
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = amax;
    __syncthreads();
    if (threadIdx.x == 0) {
        float a = 0.0f;
        for (int i = 0; i < (int) (blockDim.x >> 5); i++) a = fmaxf(a, part[i]);
        amax_row = a;
        step[blockIdx.x] = a / 7.0f;
    }
    __syncthreads();
    const float a = amax_row, inv = a > 0.0f ? 7.0f / a : 0.0f;
    uint8_t * o = packed + (size_t) blockIdx.x * (kp / 2);
    for (int64_t i = threadIdx.x; i < kp / 2; i += blockDim.x) {
        const int64_t k0 = 2 * i;
        const int32_t c0 = k0 < k ? round_clamp(xr[k0] * inv, -8, 7) : 0;
        const int32_t c1 = k0 + 1 < k ? round_clamp(xr[k0 + 1] * inv, -8, 7) : 0;
        o[i] = (uint8_t) ((c0 & 15) | ((c1 & 15) << 4));
    }
}

static __global__ void pack_codes_kernel(const int8_t * __restrict__ codes, int64_t total_pairs, uint8_t * __restrict__ packed) {
    pdl_trigger();
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < total_pairs; i += (int64_t) gridDim.x * blockDim.x) {
        packed[i] = (uint8_t) ((codes[2 * i] & 15) | ((codes[2 * i + 1] & 15) << 4));
    }
}

// one warp per weight row n; lanes over 16-byte chunks, dp4a on the unpacked 16·x lanes (exact)
static __global__ void int_gemm_kernel(const uint8_t * __restrict__ w, int32_t N, int32_t kb, const uint8_t * __restrict__ a,
                                       int32_t M, int32_t * __restrict__ acc) {
    pdl_trigger();
    const int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (n >= N) return;
    for (int32_t t = 0; t < M; t++) {
        int32_t s = 0;
        for (int32_t off = lane * 16; off < kb; off += 512) {
            const uint4 q = *(const uint4 *) (w + (size_t) n * kb + off);
            const uint4 p = *(const uint4 *) (a + (size_t) t * kb + off);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                s = __dp4a((int) FmtI4::lo(mma_word(q, i)), (int) FmtI4::lo(mma_word(p, i)), s);
                s = __dp4a((int) FmtI4::hi(mma_word(q, i)), (int) FmtI4::hi(mma_word(p, i)), s);
            }
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) acc[(size_t) t * N + n] = s >> 8;
    }
}

// The low-rank branch in float64, rounded once, as on the CPU backend (docs/numerics.md).
// block per (token, rank row): l = Σ_s A[i, s] · a[s], exact in float64
static __global__ void lora_down_kernel(const __half * __restrict__ la, int64_t kp, const int8_t * __restrict__ codes,
                                        int32_t rank, double * __restrict__ l) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const int32_t t = blockIdx.x / rank, i = blockIdx.x % rank;
    double s = 0.0;
    for (int64_t k = threadIdx.x; k < kp; k += blockDim.x) s += (double) __half2float(la[i * kp + k]) * codes[t * kp + k];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    __shared__ double part[32];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double r = 0.0;
        for (int w = 0; w < (int) (blockDim.x >> 5); w++) r += part[w];
        l[blockIdx.x] = r;
    }
}

// The same sums for many tokens (prefill) on the float64 tensor cores (mma.m8n8k4.f64: D = A·B + C, each
// product and sum an IEEE double operation): tokens are the MMA's rows, the ranks its columns, K its depth. Every
// partial sum is the exact double (fp16 times int4 codes, docs/numerics.md), so the MMA's internal order, the
// split of K over blocks and the order of their atomic adds do not show in l: it equals lora_down_kernel's.
// A block owns 64 tokens x 8·J ranks (J ≤ 8) and walks its share of K in chunks of 32: the chunk's codes and
// lora_a columns are converted to double once, into shared memory (rows padded to 36 doubles: a half-warp's
// fragment loads hit 16 distinct bank pairs). Warp w computes tokens 16w .. 16w + 15 (two m-tiles) x all J
// n-tiles. K is split over gridDim.y blocks (enough blocks for every SM), each adding its part to l (zeroed
// before) with a double atomicAdd.
constexpr int LD_TOK = 64, LD_K = 32, LD_PAD = LD_K + 4;

__device__ __forceinline__ void mma_f64_m8n8k4(double (&d)[2], double a, double b) {
    asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
                 : "+d"(d[0]), "+d"(d[1])
                 : "d"(a), "d"(b));
}

template <int J>
static __global__ void __launch_bounds__(128) lora_down_tiled_kernel(const __half * __restrict__ la, int64_t kp,
                                                                     const int8_t * __restrict__ codes, int32_t m,
                                                                     int32_t rank, double * __restrict__ l) {
    pdl_trigger();
    pdl_wait();
    __shared__ double sc[LD_TOK * LD_PAD];   // [token][k] codes
    __shared__ double sa[8 * J * LD_PAD];    // [rank][k] lora_a
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int t0 = blockIdx.x * LD_TOK;
    const int64_t nk = kp / LD_K, per = (nk + gridDim.y - 1) / gridDim.y;
    const int64_t k_end = ((blockIdx.y + 1) * per < nk ? (blockIdx.y + 1) * per : nk) * LD_K;
    double acc[2][J][2] = {};
    for (int64_t k0 = blockIdx.y * per * LD_K; k0 < k_end; k0 += LD_K) {
        __syncthreads();  // the previous chunk is consumed
        for (int q = tid; q < LD_TOK * (LD_K / 4); q += 128) {  // 64 tokens x 8 words of 4 codes
            const int r = q / (LD_K / 4), w = q % (LD_K / 4);
            const int32_t c4 = t0 + r < m ? *(const int32_t *) (codes + (size_t) (t0 + r) * kp + k0 + 4 * w) : 0;
#pragma unroll
            for (int b = 0; b < 4; b++) sc[r * LD_PAD + 4 * w + b] = (double) (int8_t) (c4 >> (8 * b));
        }
        for (int q = tid; q < 8 * J * (LD_K / 2); q += 128) {  // 8·J ranks x 16 pairs of halves
            const int i = q / (LD_K / 2), w = q % (LD_K / 2);
            double2 v = make_double2(0.0, 0.0);
            if (i < rank) {
                const __half2 h = *(const __half2 *) (la + (size_t) i * kp + k0 + 2 * w);
                v = make_double2((double) __low2float(h), (double) __high2float(h));
            }
            sa[i * LD_PAD + 2 * w] = v.x, sa[i * LD_PAD + 2 * w + 1] = v.y;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < LD_K; kk += 4) {
            double a[2], b[J];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) a[mt] = sc[(16 * warp + 8 * mt + g) * LD_PAD + kk + t];
#pragma unroll
            for (int j = 0; j < J; j++) b[j] = sa[(8 * j + g) * LD_PAD + kk + t];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int j = 0; j < J; j++) mma_f64_m8n8k4(acc[mt][j], a[mt], b[j]);
        }
    }
    // D fragment: lane (g, t) holds rows g, columns 2t and 2t + 1 of its 8 x 8 tile
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        const int tok = t0 + 16 * warp + 8 * mt + g;
#pragma unroll
        for (int j = 0; j < J; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int i = 8 * j + 2 * t + e;
                if (tok < m && i < rank) atomicAdd(&l[(size_t) tok * rank + i], acc[mt][j][e]);
            }
        }
    }
}

// thread per (token, n): out = fp32(Σ_i B[n, i] · l[t, i])
static __global__ void lora_up_kernel(const __half * __restrict__ lb, int32_t rank, int64_t N, const double * __restrict__ l,
                                      int64_t total, float * __restrict__ out) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    for (int64_t idx = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; idx < total; idx += (int64_t) gridDim.x * blockDim.x) {
        const int64_t t = idx / N, n = idx % N;
        double s = 0.0;
        for (int32_t i = 0; i < rank; i++) s += (double) __half2float(lb[n * rank + i]) * l[t * rank + i];
        out[idx] = (float) s;
    }
}

static unsigned grid_for(int64_t total) { return (unsigned) std::min<int64_t>(ceil_div(total, 256), 65535); }

void cuda_rmsnorm_quant(const float * x, const float * in_scale, const int32_t * in_map, int32_t m, int32_t dim,
                        int64_t kp, float eps, int8_t * out, cudaStream_t st) {
    if (m <= 0) return;
    launch_pdl(rmsnorm_quant_kernel, dim3(m >= 64 ? 1u : (unsigned) ceil_div(kp, Q_SLOTS), m), dim3(256), 0, st,
               "rmsnorm_quant_kernel", x, in_scale, in_map, dim, kp, eps, out);
}

void cuda_quantize_codes(const float * x, int32_t m, int32_t k, int64_t kp, int8_t * out, cudaStream_t st) {
    if (m <= 0) return;
    launch_pdl(quantize_codes_kernel, dim3((unsigned) ceil_div(kp, Q_SLOTS), m), dim3(256), 0, st,
               "quantize_codes_kernel", x, k, kp, out);
}

void cuda_swiglu_quant(const float * gu, const int32_t * in_map, int32_t m, int32_t n_ff, int64_t kp, int8_t * out,
                       cudaStream_t st) {
    if (m <= 0) return;
    launch_pdl(swiglu_quant_kernel, dim3((unsigned) ceil_div(kp, Q_SLOTS), m), dim3(256), 0, st, "swiglu_quant_kernel",
               gu, in_map, n_ff, kp, out);
}

void cuda_quantize_dynamic(const float * x, int32_t m, int32_t k, int64_t kp, uint8_t * packed, float * step,
                           cudaStream_t st) {
    if (m <= 0) return;
    quantize_dynamic_kernel<<<m, 256, 0, st>>>(x, k, kp, packed, step);
    cuda_check_launch("quantize_dynamic_kernel");
}

void cuda_pack_codes(const int8_t * codes, int32_t m, int64_t kp, uint8_t * packed, cudaStream_t st) {
    const int64_t pairs = (int64_t) m * kp / 2;
    if (pairs <= 0) return;
    pack_codes_kernel<<<grid_for(pairs), 256, 0, st>>>(codes, pairs, packed);
    cuda_check_launch("pack_codes_kernel");
}

void cuda_int_gemm(const void * qweight, int64_t n, int64_t kp, const uint8_t * a_packed, int32_t m, int32_t * acc,
                   cudaStream_t st) {
    if (kp % 64 != 0 || kp >= 131072) {
        throw Error("CUDA int_gemm: K = " + std::to_string(kp) + " must be a multiple of 64 below 131072");
    }
    if (m <= 0 || n <= 0) return;
    int_gemm_kernel<<<(unsigned) ceil_div(n * 32, 256), 256, 0, st>>>((const uint8_t *) qweight, (int32_t) n,
                                                                       (int32_t) (kp / 2), a_packed, m, acc);
    cuda_check_launch("int_gemm_kernel");
}

void cuda_lora_down(const void * lora_a, int64_t rank, int64_t kp, const int8_t * codes, int32_t m, double * l,
                    cudaStream_t st) {
    if (m <= 0 || rank <= 0) return;
    if (m > 16 && rank <= 64 && kp % LD_K == 0) {  // prefill: the tiled kernel
        const auto f = rank <= 8 ? lora_down_tiled_kernel<1> : rank <= 16 ? lora_down_tiled_kernel<2>
                     : rank <= 24 ? lora_down_tiled_kernel<3> : rank <= 32 ? lora_down_tiled_kernel<4>
                     : rank <= 48 ? lora_down_tiled_kernel<6> : lora_down_tiled_kernel<8>;
        const int64_t mb = ceil_div(m, LD_TOK), nk = kp / LD_K;
        // about four 4-warp blocks an SM
        const int64_t splits = std::min<int64_t>(nk, std::max<int64_t>(1, ceil_div(4 * cuda_sm_count(), mb)));
        cuda_check(cudaMemsetAsync(l, 0, (size_t) m * rank * sizeof(double), st), "cudaMemsetAsync(lora l)");
        launch_pdl(f, dim3((unsigned) mb, (unsigned) splits), dim3(128), 0, st, "lora_down_tiled_kernel",
                   (const __half *) lora_a, kp, codes, m, (int32_t) rank, l);
        return;
    }
    launch_pdl(lora_down_kernel, dim3((unsigned) (m * rank)), dim3(256), 0, st, "lora_down_kernel",
               (const __half *) lora_a, kp, codes, (int32_t) rank, l);
}

void cuda_lora(const void * lora_a, const void * lora_b, int64_t rank, int64_t n, int64_t kp, const int8_t * codes,
               int32_t m, double * l_scratch, float * out, cudaStream_t st) {
    if (m <= 0 || rank <= 0) return;
    cuda_lora_down(lora_a, rank, kp, codes, m, l_scratch, st);
    launch_pdl(lora_up_kernel, dim3(grid_for((int64_t) m * n)), dim3(256), 0, st, "lora_up_kernel",
               (const __half *) lora_b, (int32_t) rank, n, l_scratch, (int64_t) m * n, out);
}

}  // namespace mq
