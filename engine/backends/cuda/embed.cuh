#pragma once
#include "../../src/mq-backend.h"
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
// out[i, :] = float(table[ids[i], :]) for an fp16 table [n_vocab, dim]
void cuda_embed_f16(const void * table, const int32_t * ids, int32_t n, int32_t dim, float * out, cudaStream_t st);
// out[i, :] = row ids[i] of any embedding table kind as fp32 (mq-backend.h EmbedTable; docs/numerics.md)
void cuda_embed(const EmbedTable & table, const int32_t * ids, int32_t n, int32_t dim, float * out, cudaStream_t st);
}
