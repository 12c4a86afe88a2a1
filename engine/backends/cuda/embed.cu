// Embedding lookup: fp16 row -> fp32 (exact); grid (element blocks, tokens), a thread per element.
#include "embed.cuh"
#include "cuda-common.cuh"

#include <cuda_fp16.h>

namespace mq {

static __global__ void embed_f16_kernel(const __half * __restrict__ table, const int32_t * __restrict__ ids,
                                        int32_t dim, float * __restrict__ out) {
    pdl_trigger();
    pdl_wait();  // launched with PDL: the inputs come from the kernel before
    const __half * row = table + (size_t) ids[blockIdx.y] * dim;
    float * o = out + (size_t) blockIdx.y * dim;
    const int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < dim) o[i] = __half2float(row[i]);
}

void cuda_embed_f16(const void * table, const int32_t * ids, int32_t n, int32_t dim, float * out, cudaStream_t st) {
    if (n <= 0) return;
    launch_pdl(embed_f16_kernel, dim3((unsigned) ceil_div(dim, 256), n), dim3(256), 0, st, "embed_f16_kernel",
               (const __half *) table, ids, dim, out);
}

}  // namespace mq
