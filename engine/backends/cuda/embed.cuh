#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// out[i, :] = float(table[ids[i], :]) for an fp16 table [n_vocab, dim]
void cuda_embed_f16(const void * table, const int32_t * ids, int32_t n, int32_t dim, float * out, cudaStream_t st);
}
