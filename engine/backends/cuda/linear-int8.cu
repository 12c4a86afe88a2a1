// Schemes w8a8, w8a8s, w4a8 and w4a8g on the CUDA backend (docs/numerics.md, "Dynamic int8 activations"): the linear
// quantizes each token of its fp32 input to int8 codes itself (one block per token: amax, then one fp32 multiply and a
// rounding per value; zeros past K up to w4a8's padded kp), runs the exact int32 GEMV/GEMM on INT8 tensor cores (w8a8:
// over the file's int8 weights, cuda_linear_i8 of linear-w4a4.cu with the FmtI8 fragments; w4a8, w4a8g: over its
// packed int4 weights, cuda_linear_w4a8 of linear-w4a8.cu) with y = (float(acc) * scale[n]) * (amax / qmax) in its
// epilogue, and, where the file has P.bias, adds it in the CPU's order, y = y + (v + bias[n]): in the w4a8 GEMV's
// epilogue at decode sizes, else in a second pass. From m = 64 the GEMM is cuBLAS's int8 one with every epilogue
// operation, the bias included, in one kernel after it (gemm-cublas-i8.cuh), where cuBLAS is found. The
// same integers and the same fp32 operations in the same order as the CPU backend: bit-identical outputs. w8a8s
// (static per-channel input, "Static int8 activations") quantizes with its steps and shift instead, a step of 1 per
// token, and runs w8a8's GEMM and bias pass.
#include "cuda-backend.cuh"
#include "cuda-common.cuh"
#include "linear-w4a4.cuh"
#include "linear-w4a8.cuh"
#include "gemm-cublas-i8.cuh"

#include <algorithm>
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

// row t of x [m, k] -> codes [m, stride] (zeros from k on) and step[t] = amax / qmax (amax 0: codes and step 0):
// inv = qmax / amax, a = clamp(rint(x · inv), -qmax, qmax), one block a row. Where rows are whole, aligned float4s
// (k % 4 == 0), Q8_LOADS independent 16-byte loads a thread are in flight for the maximum, the second read hits
// L1 and four codes go out in one 32-bit store (stride % 4 == 0): a decode step waits on this kernel's latency.
constexpr int Q8_LOADS = 4;
__global__ void __launch_bounds__(Q8_THREADS) quantize_i8_kernel(const float * __restrict__ x, int k, int stride,
                                                                  int qmax, int8_t * __restrict__ codes,
                                                                  float * __restrict__ step) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: x comes from the kernel before
    const float * xr = x + (size_t) blockIdx.x * k;
    uint8_t * out = (uint8_t *) codes + (size_t) blockIdx.x * stride;
    const bool vec = (k & 3) == 0 && (stride & 3) == 0 && ((uintptr_t) x & 15) == 0 && ((uintptr_t) codes & 3) == 0;
    constexpr int STRIDE = 4 * Q8_THREADS;  // floats per pass of the block
    float mx = 0.0f;
    if (vec) {
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
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    __shared__ float part[Q8_THREADS / 32];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = mx;
    __syncthreads();
    float amax = 0.0f;
#pragma unroll
    for (int w = 0; w < Q8_THREADS / 32; w++) amax = fmaxf(amax, part[w]);
    if (threadIdx.x == 0) step[blockIdx.x] = amax > 0.0f ? __fdiv_rn(amax, (float) qmax) : 0.0f;
    const float inv = amax > 0.0f ? __fdiv_rn((float) qmax, amax) : 0.0f;  // amax 0: every code 0
    auto code = [&](float v) -> uint32_t {
        return (uint32_t) (uint8_t) (int8_t) round_clamp(__fmul_rn(v, inv), -qmax, qmax);
    };
    if (vec) {
        for (int i = 4 * (int) threadIdx.x; i < stride; i += STRIDE) {
            uint32_t q = 0;
            if (i < k) {
                const float4 v = *(const float4 *) (xr + i);
                q = code(v.x) | (code(v.y) << 8) | (code(v.z) << 16) | (code(v.w) << 24);
            }
            *(uint32_t *) (out + i) = q;
        }
    } else {
        for (int i = threadIdx.x; i < stride; i += Q8_THREADS) out[i] = (uint8_t) (i < k ? code(xr[i]) : 0u);
    }
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

// packed int4 weights (w4a8, w4a8g; else int8 ones: w8a8, w8a8s)
bool int4_weights(const Linear & lin) {
    return lin.scheme == "w4a8" || lin.scheme == "w4a8g";
}
// a bias is added by the w4a8 GEMV's epilogue; elsewhere by a pass after the GEMM
bool bias_in_gemv(const Linear & lin, int32_t m) {
    return int4_weights(lin) && m <= W4A8_GEMV_MAX_M;
}
// the int8 GEMV/GEMM of the scheme
void gemm_i8(const Linear & lin, const CudaLinearI8 & p, const float * step, const int8_t * codes, int32_t m, float * y,
             bool accumulate, cudaStream_t st) {
    if (int4_weights(lin)) {
        cuda_linear_w4a8(p.qweight, p.gscale, lin.group, p.scale, step, bias_in_gemv(lin, m) ? p.bias : nullptr, lin.n,
                         lin.kp, codes, m, y, accumulate, st);
    } else {
        cuda_linear_i8(p.qweight, p.scale, step, lin.n, lin.k, codes, m, y, accumulate, st);
    }
}

// every scheme: quantize x (per token; w8a8s: static per channel) into codes of kp per row, the GEMV/GEMM, the bias
void run_i8(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    BackendCuda & b = cuda_of(be);
    const CudaLinearI8 & p = *(const CudaLinearI8 *) lin.prepared;
    if (m <= 0) return;
    const bool bias_pass = p.bias && !bias_in_gemv(lin, m);
    const size_t codes_bytes = ((size_t) m * lin.kp + 255) / 256 * 256, step_bytes = ((size_t) m * 4 + 255) / 256 * 256;
    const size_t tmp_bytes = bias_pass ? (size_t) m * lin.n * sizeof(float) : 0;
    const bool cublas = cuda_cublas_i8_enabled(m);
    const I8Weights fmt = !int4_weights(lin) ? I8Weights::I8 : p.gscale ? I8Weights::I4G : I8Weights::I4;
    const int64_t k = int4_weights(lin) ? lin.kp : lin.k;
    const size_t work_bytes = cublas ? cuda_cublas_i8_work_bytes(m, lin.n, k, fmt) : 0;
    uint8_t * buf = (uint8_t *) b.scratch_for(codes_bytes + step_bytes + std::max(tmp_bytes, work_bytes));
    int8_t * codes = (int8_t *) buf;
    float * step = (float *) (buf + codes_bytes);
    if (p.shift) {
        launch_pdl(quantize_static_i8_kernel, dim3((unsigned) m), dim3(Q8_THREADS), 0, b.stream(),
                   "quantize_static_i8_kernel", x, (const float *) p.shift, (const float *) p.in_scale, (int) lin.k,
                   (int) lin.kp, (int) lin.qmax, codes, step);
    } else {
        launch_pdl(quantize_i8_kernel, dim3((unsigned) m), dim3(Q8_THREADS), 0, b.stream(), "quantize_i8_kernel", x,
                   (int) lin.k, (int) lin.kp, (int) lin.qmax, codes, step);
    }
    if (cublas) {  // cuBLAS's int8 GEMM with scale, step, bias and accumulate in one epilogue (gemm-cublas-i8.cuh)
        I8Epilogue ep;
        ep.scale = p.scale, ep.row_scale = step, ep.bias = p.bias, ep.accumulate = accumulate;
        if (cuda_gemm_i8_cublas(p.qweight, fmt, p.gscale, lin.group, lin.n, k, codes, m, ep, y,
                                buf + codes_bytes + step_bytes, work_bytes, b.stream())) {
            return;
        }
    }
    if (!bias_pass) {
        gemm_i8(lin, p, step, codes, m, y, accumulate, b.stream());
        return;
    }
    float * tmp = (float *) (buf + codes_bytes + step_bytes);
    gemm_i8(lin, p, step, codes, m, tmp, false, b.stream());
    const int total = (int) (m * lin.n);
    launch_pdl(bias_epilogue_kernel, dim3((unsigned) ceil_div(total, 256)), dim3(256), 0, b.stream(),
               "bias_epilogue_kernel", (const float *) tmp, (const float *) p.bias, (int) lin.n, total,
               accumulate ? 1 : 0, y);
}

}  // namespace

// K a multiple of 16: every row of codes and weights starts on a 16-byte boundary (the kernels' load unit)
const LinearKernels cuda_linear_w8a8_kernels = {"w8a8", 16, 0, prepare_i8, release_i8, run_i8, nullptr, nullptr};
const LinearKernels cuda_linear_w8a8s_kernels = {"w8a8s", 16, 0, prepare_i8, release_i8, run_i8, nullptr, nullptr};
// kp and the group are multiples of 64 in every w4a8 / w4a8g file: no limits beyond the format's
const LinearKernels cuda_linear_w4a8_kernels = {"w4a8", 0, 0, prepare_i8, release_i8, run_i8, nullptr, nullptr};
const LinearKernels cuda_linear_w4a8g_kernels = {"w4a8g", 0, 0, prepare_i8, release_i8, run_i8, nullptr, nullptr};

}  // namespace mq
