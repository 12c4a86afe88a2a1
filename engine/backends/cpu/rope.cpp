// RoPE in the HF rotate_half layout, angles in float64 from the shared frequencies (mq-rope.h).
#include "cpu-backend.h"

#include "../../src/mq-rope.h"

#include <vector>

namespace mq::cpu {

void rope(Backend &, float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
          int32_t head_dim, const int32_t * pos, const RopeParams & rp) {
    const int32_t half = head_dim / 2;
    std::vector<double> inv_freq(half);
    for (int32_t i = 0; i < half; i++) {
        inv_freq[i] = rope_inv_freq(i, head_dim, rp);
    }
    for (int32_t t = 0; t < n_tokens; t++) {
        float * row = qkv + (size_t) t * row_stride;
        for (int32_t i = 0; i < half; i++) {
            // angle in float64 so long positions stay exact; cos/sin rounded to fp32
            const double ang = (double) pos[t] * inv_freq[i];
            const float c = (float) std::cos(ang), sn = (float) std::sin(ang);
            for (int32_t h = 0; h < n_head + n_head_kv; h++) {
                float * v = row + (size_t) h * head_dim;
                const float a = v[i], b = v[i + half];
                // rotate_half: (a, b) -> (a cos - b sin, b cos + a sin)
                v[i] = a * c - b * sn;
                v[i + half] = b * c + a * sn;
            }
        }
    }
}

}  // namespace mq::cpu
