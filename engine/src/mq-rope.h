// RoPE frequencies, computed on the host for every backend (the CPU uses them directly, the CUDA backend
// uploads them once per configuration), so both rotate by the same float64 angles (docs/numerics.md).
#pragma once

#include <cstdint>

namespace mq {

struct RopeParams;

// inv_freq_i = theta^(-2i/d) in float64, with Llama-3 frequency scaling when rp.factor > 0
double rope_inv_freq(int32_t i, int32_t head_dim, const RopeParams & rp);

}  // namespace mq
