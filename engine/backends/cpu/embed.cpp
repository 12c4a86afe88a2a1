// The embedding lookup: rows of the fp16 table widened to fp32.
#include "cpu-backend.h"
#include "cpu-simd.h"

namespace mq::cpu {

void embed(Backend &, const void * table, const int32_t * ids, int32_t n, int32_t dim, float * out) {
    const uint16_t * t = (const uint16_t *) table;
    for (int32_t i = 0; i < n; i++) {
        cpu_f16_to_f32(t + (size_t) ids[i] * dim, out + (size_t) i * dim, dim);
    }
}

}  // namespace mq::cpu
