// RMSNorm, one block per row. The sum of squares is taken in float64 as the CPU backend does, so both
// round the same factor r = 1 / sqrt(Σx²/D + eps) to fp32; then out = (x * r) * w.
#include "rmsnorm.cuh"
#include "cuda-common.cuh"

namespace mq {

static __global__ void rmsnorm_kernel(const float * __restrict__ x, const float * __restrict__ w, int32_t dim, float eps,
                                      float * __restrict__ out) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const float * xr = x + (size_t) blockIdx.x * dim;
    float * o = out + (size_t) blockIdx.x * dim;
    const float inv = block_rms_factor(xr, dim, eps);
    for (int32_t i0 = 0; i0 < dim; i0 += 8 * blockDim.x) {
        float v[8], g[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int32_t i = i0 + u * blockDim.x + threadIdx.x;
            v[u] = i < dim ? xr[i] : 0.0f, g[u] = i < dim ? w[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int32_t i = i0 + u * blockDim.x + threadIdx.x;
            if (i < dim) o[i] = v[u] * inv * g[u];
        }
    }
}

void cuda_rmsnorm(const float * x, const float * w, int32_t n_rows, int32_t dim, float eps, float * out, cudaStream_t st) {
    if (n_rows <= 0) return;
    launch_pdl(rmsnorm_kernel, dim3(n_rows), dim3(256), 0, st, "rmsnorm_kernel", x, w, dim, eps, out);
}

}  // namespace mq
