// Embedding lookup: a row of the table -> fp32; grid (element blocks, tokens), a thread per element. fp16 rows are
// widened (exact); the quantized output matrix of a tied model is dequantized one row at a time with the CPU's
// arithmetic (w8a8: float(q) * scale[id], one fp32 multiply; w4a16g: float(q) * float(scale[id, j / group]),
// exact), so every backend gives the same bits (docs/numerics.md, "Embedding").
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

static __global__ void embed_i8_row_kernel(const int8_t * __restrict__ table, const float * __restrict__ scale,
                                           const int32_t * __restrict__ ids, int32_t dim, float * __restrict__ out) {
    pdl_trigger();
    pdl_wait();
    const int32_t id = ids[blockIdx.y];
    const int8_t * row = table + (size_t) id * dim;
    float * o = out + (size_t) blockIdx.y * dim;
    const int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < dim) o[i] = __fmul_rn((float) row[i], scale[id]);
}

static __global__ void embed_i4_group_kernel(const uint8_t * __restrict__ table, const __half * __restrict__ scale,
                                             const int32_t * __restrict__ ids, int32_t dim, int32_t group,
                                             float * __restrict__ out) {
    pdl_trigger();
    pdl_wait();
    const int32_t id = ids[blockIdx.y];
    const uint8_t * row = table + (size_t) id * (dim / 2);
    const __half * s = scale + (size_t) id * (dim / group);
    float * o = out + (size_t) blockIdx.y * dim;
    const int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= dim) return;
    const int32_t u = (row[i / 2] >> (4 * (i & 1))) & 0xF;
    o[i] = __fmul_rn((float) (u - 16 * (u >= 8)), __half2float(s[i / group]));
}

void cuda_embed_f16(const void * table, const int32_t * ids, int32_t n, int32_t dim, float * out, cudaStream_t st) {
    if (n <= 0) return;
    launch_pdl(embed_f16_kernel, dim3((unsigned) ceil_div(dim, 256), n), dim3(256), 0, st, "embed_f16_kernel",
               (const __half *) table, ids, dim, out);
}

void cuda_embed(const EmbedTable & t, const int32_t * ids, int32_t n, int32_t dim, float * out, cudaStream_t st) {
    if (n <= 0) return;
    const dim3 grid((unsigned) ceil_div(dim, 256), n);
    switch (t.kind) {
    case EMBED_F16:
        cuda_embed_f16(t.data, ids, n, dim, out, st);
        return;
    case EMBED_I8_ROW:
        launch_pdl(embed_i8_row_kernel, grid, dim3(256), 0, st, "embed_i8_row_kernel", (const int8_t *) t.data,
                   (const float *) t.scale, ids, dim, out);
        return;
    case EMBED_I4_GROUP:
        launch_pdl(embed_i4_group_kernel, grid, dim3(256), 0, st, "embed_i4_group_kernel", (const uint8_t *) t.data,
                   (const __half *) t.scale, ids, dim, t.group, out);
        return;
    }
    throw Error("embed: unknown embedding table kind " + std::to_string((int) t.kind));
}

}  // namespace mq
