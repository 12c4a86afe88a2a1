// The attention kernel of the CPU backend: one query token against the cached rows of one kv head, for the
// query heads that share that kv head (docs/numerics.md: s and p in float64, o rounded once to fp32).
#pragma once

#include <cstdint>

namespace mq {

// The rows of one kv head in a layer's K and V caches: row j of K is at k + j·stride elements (fp16, or
// int8 codes read back as float(code) · k_step[d]).
struct KvRows {
    const void * k;
    const void * v;
    const float * k_step;  // int8 cache: the steps of this head's hd channels; null for fp16
    const float * v_step;
    int64_t stride;        // elements between rows (n_head_kv · hd)
    bool i8;
};

// For the g query heads q [g, hd] (fp32, already fp32(fp16(q)) · c) over rows [0, n_kv):
//   s_j = Σ_d q[d]·k_j[d], p_j = exp(s_j − max_j s_j), out[d] = fp32((Σ_j p_j·v_j[d]) / Σ_j p_j)
// with s, p and the sums in float64. out [g, hd].
void cpu_attention_heads(const float * q, int32_t g, int32_t hd, const KvRows & kv, int32_t n_kv, float * out);

}  // namespace mq
