// The embedding lookup: rows of the table as fp32 (docs/numerics.md, "Embedding"): fp16 rows widened, or rows of
// the quantized output matrix of a tied model dequantized (w8a8: int8 code x the row's fp32 scale; w4a16g: int4
// code x its group's fp16 scale, exact in fp32).
#include "cpu-backend.h"
#include "cpu-simd.h"

#include "../../src/mq-error.h"

#include <string>
#include <vector>

namespace mq::cpu {

void embed(Backend &, const EmbedTable & table, const int32_t * ids, int32_t n, int32_t dim, float * out) {
    switch (table.kind) {
    case EMBED_F16: {
        const uint16_t * t = (const uint16_t *) table.data;
        for (int32_t i = 0; i < n; i++) {
            cpu_f16_to_f32(t + (size_t) ids[i] * dim, out + (size_t) i * dim, dim);
        }
        return;
    }
    case EMBED_I8_ROW: {
        const int8_t * q = (const int8_t *) table.data;
        const float * s = (const float *) table.scale;
        for (int32_t i = 0; i < n; i++) {
            const int8_t * row = q + (size_t) ids[i] * dim;
            const float sc = s[ids[i]];
            float * o = out + (size_t) i * dim;
            for (int32_t j = 0; j < dim; j++) {
                o[j] = (float) row[j] * sc;
            }
        }
        return;
    }
    case EMBED_I4_GROUP: {
        const uint8_t * q = (const uint8_t *) table.data;
        const uint16_t * s = (const uint16_t *) table.scale;
        const int32_t g = table.group, n_groups = dim / g;
        std::vector<float> sc((size_t) n_groups);
        for (int32_t i = 0; i < n; i++) {
            const uint8_t * row = q + (size_t) ids[i] * (dim / 2);
            cpu_f16_to_f32(s + (size_t) ids[i] * n_groups, sc.data(), n_groups);
            float * o = out + (size_t) i * dim;
            for (int32_t j = 0; j < dim; j++) {
                const int32_t u = (row[j / 2] >> (4 * (j & 1))) & 0xF;
                o[j] = (float) (u - 16 * (u >= 8)) * sc[(size_t) (j / g)];
            }
        }
        return;
    }
    }
    throw Error("embed: unknown embedding table kind " + std::to_string((int) table.kind));
}

}  // namespace mq::cpu
