// Schemes w8a8, w8a8s, w4a8 and w4a8g on the CUDA backend (docs/numerics.md, "Dynamic int8 activations"): the linear
// quantizes each token of its fp32 input to int8 codes itself (one block per token: amax, then one fp32 multiply and a
// rounding per value; zeros past K up to w4a8's padded kp), runs the exact int32 GEMV/GEMM on INT8 tensor cores (w8a8:
// over the file's int8 weights, cuda_linear_i8 of linear-w4a4.cu with the FmtI8 fragments; w4a8, w4a8g: over its
// packed int4 weights, cuda_linear_w4a8 of linear-w4a8.cu) with y = (float(acc) * scale[n]) * (amax / qmax) in its
// epilogue, and, where the file has P.bias, adds it in the CPU's order, y = y + (v + bias[n]): in the w4a8 GEMV's
// epilogue at decode sizes, else in a second pass. The
// same integers and the same fp32 operations in the same order as the CPU backend: bit-identical outputs. w8a8s
// (static per-channel input, "Static int8 activations") quantizes with its steps and shift instead, a step of 1 per
// token, and runs w8a8's GEMM and bias pass.
#include "cuda-backend.cuh"
#include "cuda-common.cuh"
#include "linear-w4a4.cuh"
#include "linear-w4a8.cuh"

#include <atomic>
#include <string>

namespace mq {

namespace {

struct CudaLinearI8 {
    void * qweight = nullptr;    // w8a8, w8a8s: I8 [n, k]; w4a8, w4a8g: packed int4 U8 [n, kp/2]
    uint8_t * gscale = nullptr;  // w4a8g: [n, kp / group]
    float * scale = nullptr;     // [n]
    float * bias = nullptr;      // [n] or nullptr
    float * in_scale = nullptr;  // w8a8s: [k], the static steps' inverses
    float * shift = nullptr;     // w8a8s: [k]
};

constexpr int Q8_THREADS = 256;

// Per-token int8 codes (docs/numerics.md, "Dynamic int8 activations"): amax of the row, step = amax / qmax,
// inv = qmax / amax (both 0 where amax is 0: every code 0), a = clamp(rint(x · inv), -qmax, qmax), zeros from k to
// the row stride. One block of Q8_THREADS a row; the kernels differ in where the row's values come from.
//
// the block's amax from each thread's maximum mx; thread 0 writes step; returns inv
__device__ __forceinline__ float block_quant_inv(float mx, int qmax, float * __restrict__ step) {
    __shared__ float part[Q8_THREADS / 32];
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = mx;
    __syncthreads();
    float amax = 0.0f;
#pragma unroll
    for (int w = 0; w < Q8_THREADS / 32; w++) amax = fmaxf(amax, part[w]);
    if (threadIdx.x == 0) *step = amax > 0.0f ? __fdiv_rn(amax, (float) qmax) : 0.0f;
    return amax > 0.0f ? __fdiv_rn((float) qmax, amax) : 0.0f;
}
__device__ __forceinline__ uint32_t code_i8(float v, float inv, int qmax) {
    return (uint32_t) (uint8_t) (int8_t) round_clamp(__fmul_rn(v, inv), -qmax, qmax);
}
// codes of the row v [k] (shared or global memory) into out [stride], four a 32-bit store where k % 4 == 0
__device__ __forceinline__ void store_codes_i8(const float * v, int k, int stride, float inv, int qmax, uint8_t * out) {
    if ((k & 3) == 0 && (stride & 3) == 0 && ((uintptr_t) out & 3) == 0) {
        for (int i = 4 * (int) threadIdx.x; i < stride; i += 4 * Q8_THREADS) {
            uint32_t q = 0;
            if (i < k) {
                q = code_i8(v[i], inv, qmax) | (code_i8(v[i + 1], inv, qmax) << 8) | (code_i8(v[i + 2], inv, qmax) << 16) |
                    (code_i8(v[i + 3], inv, qmax) << 24);
            }
            *(uint32_t *) (out + i) = q;
        }
    } else {
        for (int i = threadIdx.x; i < stride; i += Q8_THREADS) out[i] = (uint8_t) (i < k ? code_i8(v[i], inv, qmax) : 0u);
    }
}

// row t of x [m, k] -> codes [m, stride] and step[t]. Where rows are whole, aligned float4s (k % 4 == 0), Q8_LOADS
// independent 16-byte loads a thread are in flight for the maximum and the second read hits L1: a decode step
// waits on this kernel's latency.
constexpr int Q8_LOADS = 4;
__global__ void __launch_bounds__(Q8_THREADS) quantize_i8_kernel(const float * __restrict__ x, int k, int stride,
                                                                  int qmax, int8_t * __restrict__ codes,
                                                                  float * __restrict__ step) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: x comes from the kernel before
    const float * xr = x + (size_t) blockIdx.x * k;
    constexpr int STRIDE = 4 * Q8_THREADS;  // floats per pass of the block
    float mx = 0.0f;
    if ((k & 3) == 0 && ((uintptr_t) x & 15) == 0) {
        for (int i0 = 4 * (int) threadIdx.x; i0 < k; i0 += Q8_LOADS * STRIDE) {
            float4 v[Q8_LOADS];
#pragma unroll
            for (int j = 0; j < Q8_LOADS; j++) {
                const int i = i0 + j * STRIDE;
                v[j] = i < k ? *(const float4 *) (xr + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int j = 0; j < Q8_LOADS; j++) {
                mx = fmaxf(mx, fmaxf(fmaxf(fabsf(v[j].x), fabsf(v[j].y)), fmaxf(fabsf(v[j].z), fabsf(v[j].w))));
            }
        }
    } else {
        for (int i = threadIdx.x; i < k; i += Q8_THREADS) mx = fmaxf(mx, fabsf(xr[i]));
    }
    const float inv = block_quant_inv(mx, qmax, step + blockIdx.x);
    store_codes_i8(xr, k, stride, inv, qmax, (uint8_t *) codes + (size_t) blockIdx.x * stride);
}

// The producers fused with the quantization (ops rmsnorm_linear, swiglu_linear): the row's fp32 values computed
// as rmsnorm.cu and swiglu.cu compute them (the same expressions, so the same floats), kept in shared memory, then
// quantized as above. Rows of up to Q8_FUSED_MAX floats (96 KB of shared memory).
constexpr int Q8_FUSED_MAX = 24576;

__global__ void __launch_bounds__(Q8_THREADS) rmsnorm_quantize_i8_kernel(const float * __restrict__ x,
                                                                          const float * __restrict__ w, int dim,
                                                                          float eps, int stride, int qmax,
                                                                          int8_t * __restrict__ codes,
                                                                          float * __restrict__ step) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: x comes from the kernel before
    extern __shared__ float q8_row[];
    const float * xr = x + (size_t) blockIdx.x * dim;
    const float inv = block_rms_factor(xr, dim, eps);  // rmsnorm_kernel's r
    float mx = 0.0f;
    for (int i = threadIdx.x; i < dim; i += Q8_THREADS) {
        const float v = xr[i], g = w[i];
        const float h = v * inv * g;  // rmsnorm_kernel's out[i]
        q8_row[i] = h;
        mx = fmaxf(mx, fabsf(h));
    }
    const float qinv = block_quant_inv(mx, qmax, step + blockIdx.x);  // its barrier makes q8_row visible
    store_codes_i8(q8_row, dim, stride, qinv, qmax, (uint8_t *) codes + (size_t) blockIdx.x * stride);
}

__global__ void __launch_bounds__(Q8_THREADS) swiglu_quantize_i8_kernel(const float * __restrict__ gu, int n_ff,
                                                                         int stride, int qmax,
                                                                         int8_t * __restrict__ codes,
                                                                         float * __restrict__ step) {
    pdl_trigger();
    pdl_wait();
    extern __shared__ float q8_row[];
    const float * gr = gu + (size_t) blockIdx.x * 2 * n_ff;
    float mx = 0.0f;
    for (int j = threadIdx.x; j < n_ff; j += Q8_THREADS) {
        const float z = swiglu_value(gr[j], gr[n_ff + j]);  // swiglu_kernel's out
        q8_row[j] = z;
        mx = fmaxf(mx, fabsf(z));
    }
    const float qinv = block_quant_inv(mx, qmax, step + blockIdx.x);
    store_codes_i8(q8_row, n_ff, stride, qinv, qmax, (uint8_t *) codes + (size_t) blockIdx.x * stride);
}

// w8a8s: row t of x [m, k] -> codes [m, stride], a = clamp(rint((x - shift) * in_scale), -qmax, qmax) (zeros from k
// on), and step[t] = 1 (the GEMM's epilogue (float(acc) * scale[n]) * 1 is float(acc) * scale[n], exactly)
__global__ void __launch_bounds__(Q8_THREADS) quantize_static_i8_kernel(const float * __restrict__ x,
                                                                         const float * __restrict__ shift,
                                                                         const float * __restrict__ in_scale, int k,
                                                                         int stride, int qmax,
                                                                         int8_t * __restrict__ codes,
                                                                         float * __restrict__ step) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: x comes from the kernel before
    const float * xr = x + (size_t) blockIdx.x * k;
    int8_t * out = codes + (size_t) blockIdx.x * stride;
    if (threadIdx.x == 0) step[blockIdx.x] = 1.0f;
    for (int i = threadIdx.x; i < stride; i += Q8_THREADS) {
        out[i] = i < k ? (int8_t) round_clamp(__fmul_rn(__fsub_rn(xr[i], shift[i]), in_scale[i]), -qmax, qmax)
                       : (int8_t) 0;
    }
}

// y[t, n] = (accumulate ? y[t, n] + (v + bias[n]) : v + bias[n]), v = tmp[t, n]
__global__ void bias_epilogue_kernel(const float * __restrict__ tmp, const float * __restrict__ bias, int n, int total,
                                     int accumulate, float * __restrict__ y) {
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const float v = __fadd_rn(tmp[i], bias[i % n]);
    y[i] = accumulate ? __fadd_rn(y[i], v) : v;
}

void prepare_i8(Backend & be, Linear & lin) {
    BackendCuda & b = cuda_of(be);
    if (!lin.qweight || !lin.scale || lin.qmax <= 0) {
        throw Error("linear '" + lin.name + "': " + lin.scheme + " needs qweight, scale and its bit width");
    }
    if (lin.scheme == "w8a8s" && (!lin.in_scale || !lin.shift || !lin.bias)) {
        throw Error("linear '" + lin.name + "': w8a8s needs in_scale, shift and bias");
    }
    if (lin.scheme == "w4a8g" && (!lin.gscale || lin.group <= 0)) {
        throw Error("linear '" + lin.name + "': w4a8g needs gscale and its group");
    }
    CudaLinearI8 * p = new CudaLinearI8();
    p->qweight = b.copy_tensor(lin.qweight);
    p->gscale = (uint8_t *) b.copy_tensor(lin.gscale);  // w4a8g only
    p->scale = (float *) b.copy_tensor(lin.scale);
    p->bias = (float *) b.copy_tensor(lin.bias);
    p->in_scale = (float *) b.copy_tensor(lin.in_scale);  // w8a8s only (null for w8a8)
    p->shift = (float *) b.copy_tensor(lin.shift);
    lin.prepared = p;
}

void release_i8(Backend & be, Linear & lin) {
    CudaLinearI8 * p = (CudaLinearI8 *) lin.prepared;
    if (!p) return;
    for (void * d : {p->qweight, (void *) p->gscale, (void *) p->scale, (void *) p->bias, (void *) p->in_scale, (void *) p->shift}) {
        if (d) be.free(d);
    }
    delete p;
    lin.prepared = nullptr;
}

// the int8 GEMV/GEMM of the scheme: int8 weights (w8a8, w8a8s) or packed int4 ones (w4a8, w4a8g); bias: added by
// the w4a8 GEMV's epilogue (bias_in_gemv)
bool bias_in_gemv(const Linear & lin, int32_t m) {
    return (lin.scheme == "w4a8" || lin.scheme == "w4a8g") && m <= W4A8_GEMV_MAX_M;
}
void gemm_i8(const Linear & lin, const CudaLinearI8 & p, const float * step, const int8_t * codes, int32_t m, float * y,
             bool accumulate, cudaStream_t st) {
    if (lin.scheme == "w4a8" || lin.scheme == "w4a8g") {
        cuda_linear_w4a8(p.qweight, p.gscale, lin.group, p.scale, step, bias_in_gemv(lin, m) ? p.bias : nullptr, lin.n,
                         lin.kp, codes, m, y, accumulate, st);
    } else {
        cuda_linear_i8(p.qweight, p.scale, step, lin.n, lin.k, codes, m, y, accumulate, st);
    }
}

// the scratch of one call: codes [m, kp], their steps [m], the bias pass's tmp [m, n]
struct ScratchI8 {
    int8_t * codes;
    float * step;
    float * tmp;
};
ScratchI8 scratch_i8(BackendCuda & b, const Linear & lin, const CudaLinearI8 & p, int32_t m) {
    const size_t codes_bytes = ((size_t) m * lin.kp + 255) / 256 * 256, step_bytes = ((size_t) m * 4 + 255) / 256 * 256;
    const size_t tmp_bytes = p.bias && !bias_in_gemv(lin, m) ? (size_t) m * lin.n * sizeof(float) : 0;
    uint8_t * buf = (uint8_t *) b.scratch_for(codes_bytes + step_bytes + tmp_bytes);
    return {(int8_t *) buf, (float *) (buf + codes_bytes), (float *) (buf + codes_bytes + step_bytes)};
}

// the GEMV/GEMM on the codes made, then the bias (in the w4a8 GEMV's epilogue, else a pass)
void finish_i8(BackendCuda & b, const Linear & lin, const CudaLinearI8 & p, const ScratchI8 & s, int32_t m, float * y,
               bool accumulate) {
    if (!p.bias || bias_in_gemv(lin, m)) {
        gemm_i8(lin, p, s.step, s.codes, m, y, accumulate, b.stream());
        return;
    }
    gemm_i8(lin, p, s.step, s.codes, m, s.tmp, false, b.stream());
    const int total = (int) (m * lin.n);
    launch_pdl(bias_epilogue_kernel, dim3((unsigned) ceil_div(total, 256)), dim3(256), 0, b.stream(),
               "bias_epilogue_kernel", (const float *) s.tmp, (const float *) p.bias, (int) lin.n, total,
               accumulate ? 1 : 0, y);
}

// every scheme: quantize x (per token; w8a8s: static per channel) into codes of kp per row, the GEMV/GEMM, the bias
void run_i8(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    BackendCuda & b = cuda_of(be);
    const CudaLinearI8 & p = *(const CudaLinearI8 *) lin.prepared;
    if (m <= 0) return;
    const ScratchI8 s = scratch_i8(b, lin, p, m);
    if (p.shift) {
        launch_pdl(quantize_static_i8_kernel, dim3((unsigned) m), dim3(Q8_THREADS), 0, b.stream(),
                   "quantize_static_i8_kernel", x, (const float *) p.shift, (const float *) p.in_scale, (int) lin.k,
                   (int) lin.kp, (int) lin.qmax, s.codes, s.step);
    } else {
        launch_pdl(quantize_i8_kernel, dim3((unsigned) m), dim3(Q8_THREADS), 0, b.stream(), "quantize_i8_kernel", x,
                   (int) lin.k, (int) lin.kp, (int) lin.qmax, s.codes, s.step);
    }
    finish_i8(b, lin, p, s, m, y, accumulate);
}

// the fused ops take the linears that quantize per token (w8a8, w4a8, w4a8g; not w8a8s, whose codes need its
// shift and steps) and rows that fit in the kernels' shared memory
bool fuses_i8(const Linear & lin, int32_t width) {
    return lin.prepared && (lin.scheme == "w8a8" || lin.scheme == "w4a8" || lin.scheme == "w4a8g") && width > 0 &&
           width <= Q8_FUSED_MAX && width == lin.k;
}

template <class Kernel> void fused_smem(Kernel kernel, std::atomic<uint64_t> & done) {
    cuda_once_per_device(done, [&] {
        cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Q8_FUSED_MAX * 4),
                   "cudaFuncSetAttribute(fused int8 quantization)");
    });
}

}  // namespace

void cuda_op_rmsnorm_linear(Backend & be, const float * x, const float * w, int32_t m, int32_t dim, float eps,
                            const Linear & lin, float * h, float * y, bool accumulate) {
    if (m <= 0 || !fuses_i8(lin, dim)) {
        be.rmsnorm_then_linear(x, w, m, dim, eps, lin, h, y, accumulate);
        return;
    }
    BackendCuda & b = cuda_of(be);
    const CudaLinearI8 & p = *(const CudaLinearI8 *) lin.prepared;
    static std::atomic<uint64_t> smem_set{0};
    fused_smem(rmsnorm_quantize_i8_kernel, smem_set);
    const ScratchI8 s = scratch_i8(b, lin, p, m);
    launch_pdl(rmsnorm_quantize_i8_kernel, dim3((unsigned) m), dim3(Q8_THREADS), (size_t) dim * 4, b.stream(),
               "rmsnorm_quantize_i8_kernel", x, w, (int) dim, eps, (int) lin.kp, (int) lin.qmax, s.codes, s.step);
    finish_i8(b, lin, p, s, m, y, accumulate);
}

void cuda_op_swiglu_linear(Backend & be, const float * gu, int32_t m, int32_t n_ff, const Linear & lin, float * act,
                           float * y, bool accumulate) {
    if (m <= 0 || !fuses_i8(lin, n_ff)) {
        be.swiglu_then_linear(gu, m, n_ff, lin, act, y, accumulate);
        return;
    }
    BackendCuda & b = cuda_of(be);
    const CudaLinearI8 & p = *(const CudaLinearI8 *) lin.prepared;
    static std::atomic<uint64_t> smem_set{0};
    fused_smem(swiglu_quantize_i8_kernel, smem_set);
    const ScratchI8 s = scratch_i8(b, lin, p, m);
    launch_pdl(swiglu_quantize_i8_kernel, dim3((unsigned) m), dim3(Q8_THREADS), (size_t) n_ff * 4, b.stream(),
               "swiglu_quantize_i8_kernel", gu, (int) n_ff, (int) lin.kp, (int) lin.qmax, s.codes, s.step);
    finish_i8(b, lin, p, s, m, y, accumulate);
}

// K a multiple of 16: every row of codes and weights starts on a 16-byte boundary (the kernels' load unit)
const LinearKernels cuda_linear_w8a8_kernels = {"w8a8", 16, 0, prepare_i8, release_i8, run_i8, nullptr, nullptr};
const LinearKernels cuda_linear_w8a8s_kernels = {"w8a8s", 16, 0, prepare_i8, release_i8, run_i8, nullptr, nullptr};
// kp and the group are multiples of 64 in every w4a8 / w4a8g file: no limits beyond the format's
const LinearKernels cuda_linear_w4a8_kernels = {"w4a8", 0, 0, prepare_i8, release_i8, run_i8, nullptr, nullptr};
const LinearKernels cuda_linear_w4a8g_kernels = {"w4a8g", 0, 0, prepare_i8, release_i8, run_i8, nullptr, nullptr};

}  // namespace mq
