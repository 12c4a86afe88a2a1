// SwiGLU on fp32 rows [gate | up]: out = swiglu_value(g, u), the CPU backend's arithmetic.
#include "swiglu.cuh"
#include "cuda-common.cuh"

namespace mq {

static __global__ void swiglu_kernel(const float * __restrict__ gu, int64_t total, int32_t n_ff, float * __restrict__ out) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < total; i += (int64_t) gridDim.x * blockDim.x) {
        const int64_t r = i / n_ff, j = i % n_ff;
        const float g = gu[r * 2 * n_ff + j], u = gu[r * 2 * n_ff + n_ff + j];
        out[i] = swiglu_value(g, u);
    }
}

void cuda_swiglu(const float * gu, int32_t m, int32_t n_ff, float * out, cudaStream_t st) {
    const int64_t total = (int64_t) m * n_ff;
    if (total <= 0) return;
    launch_pdl(swiglu_kernel, dim3((unsigned) std::min<int64_t>(ceil_div(total, 256), 65535)), dim3(256), 0, st,
               "swiglu_kernel", gu, total, n_ff, out);
}

}  // namespace mq
