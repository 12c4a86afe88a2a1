// Schemes w8a8, w8a8s, w4a8 and w4a8g on the CUDA backend (docs/numerics.md, "Dynamic int8 activations"): the linear
// quantizes each token of its fp32 input to int8 codes itself (one block per token: amax, then one fp32 multiply and a
// rounding per value; zeros past K up to w4a8's padded kp), runs the exact int32 GEMV/GEMM on INT8 tensor cores (w8a8:
// over the file's int8 weights, cuda_linear_i8 of linear-w4a4.cu with the FmtI8 fragments; w4a8, w4a8g: over its
// packed int4 weights, cuda_linear_w4a8 of linear-w4a8.cu) with y = (float(acc) * scale[n]) * (amax / qmax) in its
// epilogue, and, where the file has P.bias, adds it in a second pass in the CPU's order: y = y + (v + bias[n]). The
// same integers and the same fp32 operations in the same order as the CPU backend: bit-identical outputs. w8a8s
// (static per-channel input, "Static int8 activations") quantizes with its steps and shift instead, a step of 1 per
// token, and runs w8a8's GEMM and bias pass.
#include "cuda-backend.cuh"
#include "cuda-common.cuh"
#include "linear-w4a4.cuh"
#include "linear-w4a8.cuh"

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
    unsigned * sync = nullptr;   // w4a8, w4a8g: the decode GEMV's producer counters [2] (W4A8Quant)
};

constexpr int Q8_THREADS = 256;

// row t of x [m, k] -> codes [m, stride] (zeros from k on) and step[t] = amax / qmax
__global__ void __launch_bounds__(Q8_THREADS) quantize_i8_kernel(const float * __restrict__ x, int k, int stride,
                                                                  int qmax, int8_t * __restrict__ codes,
                                                                  float * __restrict__ step) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: x comes from the kernel before
    const float * xr = x + (size_t) blockIdx.x * k;
    int8_t * out = codes + (size_t) blockIdx.x * stride;
    float mx = 0.0f;
    for (int i = threadIdx.x; i < k; i += Q8_THREADS) mx = fmaxf(mx, fabsf(xr[i]));
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    __shared__ float part[Q8_THREADS / 32];
    __shared__ float amax_s;
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = mx;
    __syncthreads();
    if (threadIdx.x == 0) {
        float a = 0.0f;
        for (int w = 0; w < Q8_THREADS / 32; w++) a = fmaxf(a, part[w]);
        amax_s = a;
        step[blockIdx.x] = a > 0.0f ? __fdiv_rn(a, (float) qmax) : 0.0f;
    }
    __syncthreads();
    const float amax = amax_s;
    if (!(amax > 0.0f)) {
        for (int i = threadIdx.x; i < stride; i += Q8_THREADS) out[i] = 0;
        return;
    }
    const float inv = __fdiv_rn((float) qmax, amax);
    for (int i = threadIdx.x; i < stride; i += Q8_THREADS) {
        out[i] = i < k ? (int8_t) round_clamp(__fmul_rn(xr[i], inv), -qmax, qmax) : (int8_t) 0;
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
    if (lin.scheme == "w4a8" || lin.scheme == "w4a8g") {
        p->sync = (unsigned *) b.alloc(2 * sizeof(unsigned));
        cuda_check(cudaMemsetAsync(p->sync, 0, 2 * sizeof(unsigned), b.stream()), "cudaMemsetAsync (w4a8 counters)");
    }
    lin.prepared = p;
}

void release_i8(Backend & be, Linear & lin) {
    CudaLinearI8 * p = (CudaLinearI8 *) lin.prepared;
    if (!p) return;
    for (void * d : {p->qweight, (void *) p->gscale, (void *) p->scale, (void *) p->bias, (void *) p->in_scale, (void *) p->shift,
                     (void *) p->sync}) {
        if (d) be.free(d);
    }
    delete p;
    lin.prepared = nullptr;
}

// the int8 GEMV/GEMM of the scheme: int8 weights (w8a8, w8a8s) or packed int4 ones (w4a8, w4a8g)
void gemm_i8(const Linear & lin, const CudaLinearI8 & p, const float * step, const int8_t * codes, int32_t m, float * y,
             bool accumulate, cudaStream_t st) {
    if (lin.scheme == "w4a8" || lin.scheme == "w4a8g") {
        cuda_linear_w4a8(p.qweight, p.gscale, lin.group, p.scale, step, lin.n, lin.kp, codes, m, y, accumulate, st);
    } else {
        cuda_linear_i8(p.qweight, p.scale, step, lin.n, lin.k, codes, m, y, accumulate, st);
    }
}

// every scheme: quantize x (per token; w8a8s: static per channel) into codes of kp per row, the GEMV/GEMM, the bias
void run_i8(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    BackendCuda & b = cuda_of(be);
    const CudaLinearI8 & p = *(const CudaLinearI8 *) lin.prepared;
    if (m <= 0) return;
    const bool int4_weights = lin.scheme == "w4a8" || lin.scheme == "w4a8g";
    const bool one_launch = int4_weights && cuda_linear_w4a8_takes_floats(m);  // decode: the GEMV quantizes
    const size_t codes_bytes = ((size_t) m * lin.kp + 255) / 256 * 256, step_bytes = ((size_t) m * 4 + 255) / 256 * 256;
    const size_t tmp_bytes = p.bias && !one_launch ? (size_t) m * lin.n * sizeof(float) : 0;
    uint8_t * buf = (uint8_t *) b.scratch_for(codes_bytes + step_bytes + tmp_bytes);
    int8_t * codes = (int8_t *) buf;
    float * step = (float *) (buf + codes_bytes);
    if (one_launch) {
        W4A8Quant q;
        q.codes = codes, q.step = step, q.sync = p.sync;
        cuda_linear_w4a8_floats(p.qweight, p.gscale, lin.group, p.scale, p.bias, lin.n, lin.k, lin.kp, lin.qmax, x, m, q,
                                y, accumulate, b.stream());
        return;
    }
    if (p.shift) {
        launch_pdl(quantize_static_i8_kernel, dim3((unsigned) m), dim3(Q8_THREADS), 0, b.stream(),
                   "quantize_static_i8_kernel", x, (const float *) p.shift, (const float *) p.in_scale, (int) lin.k,
                   (int) lin.kp, (int) lin.qmax, codes, step);
    } else {
        launch_pdl(quantize_i8_kernel, dim3((unsigned) m), dim3(Q8_THREADS), 0, b.stream(), "quantize_i8_kernel", x,
                   (int) lin.k, (int) lin.kp, (int) lin.qmax, codes, step);
    }
    if (!p.bias) {
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
