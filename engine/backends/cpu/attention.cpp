// Causal attention over the KV cache, one (token, kv head) per task (kernels/attention.cpp), sums and exp in float64 (docs/numerics.md).
#include "cpu-backend.h"
#include "cpu-simd.h"

#include "../../src/mq-error.h"

#include <algorithm>
#include <vector>

namespace mq::cpu {

void attention(Backend & be, const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
               const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache, float * out) {
    // qc = fp32(fp16(q) * c), c = fp32(1/sqrt(hd)); over cache rows 0..pos: s_j = qc · k_j, p_j = exp(s_j - max),
    // o = (Σ p_j v_j) / Σ p_j; the sums and exp in float64, o rounded once to fp32 (docs/numerics.md).
    // k_j, v_j are the cache rows as fp32: fp16 widened, or int8 codes times their steps float(code) * s_c.
    const int32_t hd = s.head_dim, kv_dim = s.n_head_kv * hd, group = s.n_head / s.n_head_kv;
    const float scale = (float) (1.0 / std::sqrt((double) hd));
    const bool i8 = s.kv_type == KV_TYPE_I8;
    if (i8 && (!sc.k_scale || !sc.v_scale)) {
        throw Error("attention: the int8 KV cache needs its scales");
    }
    // one task per (token, kv head), for the query heads that read it; a chunk takes every nth task so the long
    // causal rows of the last tokens spread over all chunks
    const int64_t n_work = (int64_t) n_tokens * s.n_head_kv;
    // a prefill: blocks of TQ tokens of one kv head per task, each cache row widened once for all of them
    const auto tokens = cpu_kernels().attention_tokens;
    constexpr int32_t TQ = 4;
    auto rows_of = [&](int32_t kvh) {
        const size_t off = (size_t) kvh * hd;
        return KvRows{i8 ? (const void *) ((const int8_t *) k_cache + off) : (const void *) ((const uint16_t *) k_cache + off),
                      i8 ? (const void *) ((const int8_t *) v_cache + off) : (const void *) ((const uint16_t *) v_cache + off),
                      i8 ? sc.k_scale + off : nullptr, i8 ? sc.v_scale + off : nullptr, kv_dim, i8};
    };
    if (n_tokens >= TQ && tokens && (hd == 32 || hd == 64 || hd == 128)) {
        const int64_t n_blocks = (n_tokens + TQ - 1) / TQ, n_tasks = n_blocks * s.n_head_kv;
        cpu_of(be).pool().run([&](int32_t ith, int32_t nth) {
            std::vector<float> q((size_t) TQ * group * hd);
            std::vector<uint16_t> qh((size_t) group * hd);
            int32_t n_kv[TQ];
            for (int64_t w = ith; w < n_tasks; w += nth) {
                const int32_t t0 = (int32_t) (w / s.n_head_kv) * TQ, kvh = (int32_t) (w % s.n_head_kv);
                const int32_t nq = std::min(TQ, n_tokens - t0);
                const size_t h0 = (size_t) kvh * group * hd;
                for (int32_t u = 0; u < nq; u++) {
                    float * qu = q.data() + (size_t) u * group * hd;
                    cpu_f32_to_f16(qkv + (size_t) (t0 + u) * row_stride + h0, qh.data(), (int64_t) group * hd);
                    cpu_f16_to_f32(qh.data(), qu, (int64_t) group * hd);
                    for (int32_t i = 0; i < group * hd; i++) {
                        qu[i] *= scale;
                    }
                    n_kv[u] = pos[t0 + u] + 1;
                }
                tokens(q.data(), (int64_t) group * hd, nq, n_kv, group, hd, rows_of(kvh),
                       out + (size_t) t0 * s.n_head * hd + h0, (int64_t) s.n_head * hd);
            }
        });
        return;
    }
    cpu_of(be).pool().run([&](int32_t ith, int32_t nth) {
        std::vector<float> q((size_t) group * hd);
        std::vector<uint16_t> qh((size_t) group * hd);
        for (int64_t w = ith; w < n_work; w += nth) {
            const int32_t t = (int32_t) (w / s.n_head_kv), kvh = (int32_t) (w % s.n_head_kv);
            const size_t h0 = (size_t) kvh * group * hd;
            cpu_f32_to_f16(qkv + (size_t) t * row_stride + h0, qh.data(), (int64_t) group * hd);
            cpu_f16_to_f32(qh.data(), q.data(), (int64_t) group * hd);
            for (float & v : q) {
                v *= scale;
            }
            cpu_attention_heads(q.data(), group, hd, rows_of(kvh), pos[t] + 1, out + (size_t) t * s.n_head * hd + h0);
        }
    });
}

}  // namespace mq::cpu
