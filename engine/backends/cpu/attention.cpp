// Causal attention over the KV cache, one (token, kv head) per task (kernels/attention.cpp), sums and exp in float64 (docs/numerics.md).
#include "cpu-backend.h"
#include "cpu-simd.h"

#include "../../src/mq-error.h"

#include <algorithm>
#include <cstring>
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
    // a prefill widens the cache rows it reads to float64 once (the same values: fp16, or float(code) * step in
    // fp32, widened), so the AVX-512 kernel reads them with no conversion per query
    static const bool wide_kernel = std::strcmp(cpu_kernels().isa, "avx512") == 0;
    thread_local std::vector<double> k64, v64;
    double * k64p = nullptr, * v64p = nullptr;
    if (wide_kernel && n_tokens >= 4) {
        int32_t n_rows = 0;
        for (int32_t t = 0; t < n_tokens; t++) {
            n_rows = std::max(n_rows, pos[t] + 1);
        }
        k64.resize((size_t) n_rows * kv_dim);
        v64.resize((size_t) n_rows * kv_dim);
        k64p = k64.data(), v64p = v64.data();
        cpu_of(be).pool().run([&](int32_t ith, int32_t nth) {
            int64_t b, e;
            split_range(n_rows, ith, nth, b, e);
            std::vector<float> row(kv_dim);
            for (int64_t j = b; j < e; j++) {
                for (int kv = 0; kv < 2; kv++) {
                    const size_t off = (size_t) j * kv_dim;
                    if (i8) {
                        cpu_i8_to_f32_scaled((const int8_t *) (kv ? v_cache : k_cache) + off, kv ? sc.v_scale : sc.k_scale,
                                             row.data(), kv_dim);
                    } else {
                        cpu_f16_to_f32((const uint16_t *) (kv ? v_cache : k_cache) + off, row.data(), kv_dim);
                    }
                    double * dst = (kv ? v64p : k64p) + off;
                    for (int32_t i = 0; i < kv_dim; i++) {
                        dst[i] = row[i];
                    }
                }
            }
        });
    }
    // with the widened rows, blocks of TQ tokens of one kv head per task (each row read once serves them all)
    const auto tokens = cpu_kernels().attention_tokens;
    constexpr int32_t TQ = 4;
    if (k64p && tokens && (hd == 32 || hd == 64 || hd == 128)) {
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
                const size_t off = (size_t) kvh * hd;
                tokens(q.data(), (int64_t) group * hd, nq, n_kv, group, hd, k64p + off, v64p + off, kv_dim,
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
            const size_t off = (size_t) kvh * hd;
            const KvRows rows{i8 ? (const void *) ((const int8_t *) k_cache + off)
                                 : (const void *) ((const uint16_t *) k_cache + off),
                              i8 ? (const void *) ((const int8_t *) v_cache + off)
                                 : (const void *) ((const uint16_t *) v_cache + off),
                              i8 ? sc.k_scale + off : nullptr, i8 ? sc.v_scale + off : nullptr, kv_dim, i8,
                              k64p ? k64p + off : nullptr, v64p ? v64p + off : nullptr};
            cpu_attention_heads(q.data(), group, hd, rows, pos[t] + 1, out + (size_t) t * s.n_head * hd + h0);
        }
    });
}

}  // namespace mq::cpu
