// Causal attention over the KV cache, one (token, head) per task, sums and exp in float64 (docs/numerics.md).
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
    // row j of kv head kvh of a cache, as fp32
    auto load_row = [&](const void * cache, const float * steps, int32_t j, int32_t kvh, float * dst) {
        const size_t off = (size_t) j * kv_dim + (size_t) kvh * hd;
        if (i8) {
            cpu_i8_to_f32_scaled((const int8_t *) cache + off, steps + (size_t) kvh * hd, dst, hd);
        } else {
            cpu_f16_to_f32((const uint16_t *) cache + off, dst, hd);
        }
    };
    const int64_t n_work = (int64_t) n_tokens * s.n_head;
    cpu_of(be).pool().run([&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(n_work, ith, nth, b, e);
        std::vector<double> scores, acc(hd);
        std::vector<float> q(hd), row(hd);
        std::vector<uint16_t> qh(hd);
        for (int64_t w = b; w < e; w++) {
            const int32_t t = (int32_t) (w / s.n_head), h = (int32_t) (w % s.n_head);
            const int32_t kvh = h / group;
            const int32_t n_kv = pos[t] + 1;
            cpu_f32_to_f16(qkv + (size_t) t * row_stride + (size_t) h * hd, qh.data(), hd);
            cpu_f16_to_f32(qh.data(), q.data(), hd);
            for (int32_t i = 0; i < hd; i++) {
                q[i] *= scale;
            }
            scores.resize(n_kv);
            double mx = -INFINITY;
            for (int32_t j = 0; j < n_kv; j++) {
                load_row(k_cache, sc.k_scale, j, kvh, row.data());
                scores[j] = cpu_dot_f64(q.data(), row.data(), hd);
                mx = std::max(mx, scores[j]);
            }
            double sum = 0.0;
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int32_t j = 0; j < n_kv; j++) {
                const double p = std::exp(scores[j] - mx);
                sum += p;
                load_row(v_cache, sc.v_scale, j, kvh, row.data());
                cpu_axpy_f64(p, row.data(), acc.data(), hd);
            }
            float * o = out + (size_t) t * s.n_head * hd + (size_t) h * hd;
            for (int32_t i = 0; i < hd; i++) {
                o[i] = (float) (acc[i] / sum);
            }
        }
    });
}

}  // namespace mq::cpu
