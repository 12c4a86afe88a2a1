// K and V of each token into the layer's caches: fp16, or int8 codes with static per-channel steps.
#include "cpu-backend.h"
#include "cpu-simd.h"

#include "../../src/mq-error.h"

namespace mq::cpu {

void kv_store(Backend &, const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
              const int32_t * pos, const KvScales & sc, void * k_cache, void * v_cache) {
    // K/V cache <- fp16(k), fp16(v), or int8 codes clamp(rint(x * inv_c), -127, 127) (docs/numerics.md)
    const int32_t kv_dim = s.n_head_kv * s.head_dim;
    const int32_t q_dim = s.n_head * s.head_dim;
    const bool i8 = s.kv_type == KV_TYPE_I8;
    if (i8 && (!sc.k_inv || !sc.v_inv)) {
        throw Error("kv_store: the int8 KV cache needs its scales");
    }
    for (int32_t t = 0; t < n_tokens; t++) {
        const float * kv = qkv + (size_t) t * row_stride + q_dim;  // k [kv_dim], then v [kv_dim]
        const size_t off = (size_t) pos[t] * kv_dim;
        if (i8) {
            cpu_f32_to_i8_scaled(kv, sc.k_inv, (int8_t *) k_cache + off, kv_dim);
            cpu_f32_to_i8_scaled(kv + kv_dim, sc.v_inv, (int8_t *) v_cache + off, kv_dim);
        } else {
            cpu_f32_to_f16(kv, (uint16_t *) k_cache + off, kv_dim);
            cpu_f32_to_f16(kv + kv_dim, (uint16_t *) v_cache + off, kv_dim);
        }
    }
}

}  // namespace mq::cpu
