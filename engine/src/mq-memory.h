// Memory planning: what a model and a context will take (weights, KV cache, scratch), computed from the
// config before anything is allocated, and checked against what the host (or the GPU) has free, so an
// oversized context fails at once with the sizes and the settings that would fit instead of late with
// an allocation failure.
#pragma once

#include "mq-backend.h"
#include "mq-model.h"

#include <cstddef>
#include <cstdint>
#include <string>

namespace mq {

// the context length used when none is given: the trained context, at most this many tokens
constexpr int32_t DEFAULT_N_CTX_MAX = 4096;
int32_t default_n_ctx(const Config & c);

struct MemoryPlan {
    int32_t n_ctx = 0, n_batch = 0;
    KvType kv_type = KV_TYPE_F16;
    size_t weights = 0;   // the model's tensors (without the tokenizer): mapped from the file on the CPU, copied to a GPU
    size_t kv_cache = 0;  // K and V of every layer for n_ctx tokens
    size_t scratch = 0;   // activations and logits of one n_batch-token forward pass
    size_t context() const { return kv_cache + scratch; }
};

// KV cache bytes per token of context (every layer, K and V)
size_t kv_bytes_per_token(const Config & c, KvType t);
size_t scratch_bytes(const Config & c, int32_t n_batch, int64_t max_kp);
// the rows of logits one head pass computes (the device buffer's rows): all n_batch rows where that is at most
// LOGITS_BUFFER_BYTES, else fewer (at least 1); a pass asking for more rows runs the head a piece at a time
constexpr size_t LOGITS_BUFFER_BYTES = size_t(32) << 20;
int32_t logit_rows(const Config & c, int32_t n_batch);
size_t weight_bytes(const File & file);

MemoryPlan memory_plan(const Model & model, int32_t n_ctx, int32_t n_batch, KvType kv_type);

// bytes that can still be allocated where `backend` allocates: for the CPU, the host's available memory
// (MemAvailable, bounded by the cgroup limit and by RLIMIT_AS), for a GPU its free device memory; false
// when unknown
bool memory_available(Backend & backend, size_t & bytes);

// throws mq::Error when a device backend has less free memory than the model's weights take
void memory_check_weights(Backend & backend, const File & file);

// throws mq::Error when the context of `plan` does not fit in what is available, naming the sizes and
// the n_ctx (for this and for the other KV cache type) that would fit
void memory_check_context(Backend & backend, const Model & model, const MemoryPlan & plan);

std::string format_bytes(size_t bytes);

}  // namespace mq
