// RoPE in the HF rotate_half layout, angles in float64 from the shared frequencies (mq-rope.h).
#include "cpu-backend.h"

#include "../../src/mq-rope.h"

#include <algorithm>
#include <vector>

namespace mq::cpu {

// cos and sin (fp32, from the float64 angle pos · inv_freq_i) of positions [0, n) for one head size and one set of
// RoPE parameters: every layer of a forward pass rotates by the same angles, so they are computed once per position
// (per calling thread) and reused; positions past the table's bound are computed on the spot
namespace {
struct RopeTable {
    int32_t head_dim = 0;
    RopeParams rp{};
    std::vector<double> inv_freq;
    std::vector<float> cs;  // [n, half, 2]: cos, sin
    int32_t n = 0;

    static constexpr int32_t MAX_POS = 1 << 16;

    bool same(int32_t hd, const RopeParams & p) const {
        return hd == head_dim && p.theta == rp.theta && p.factor == rp.factor &&
               p.low_freq_factor == rp.low_freq_factor && p.high_freq_factor == rp.high_freq_factor &&
               p.original_max_pos == rp.original_max_pos;
    }
    void reset(int32_t hd, const RopeParams & p) {
        head_dim = hd, rp = p, n = 0;
        cs.clear();
        inv_freq.resize(hd / 2);
        for (int32_t i = 0; i < hd / 2; i++) {
            inv_freq[i] = rope_inv_freq(i, hd, p);
        }
    }
    void angle(int32_t pos, int32_t i, float & c, float & s) const {
        // angle in float64 so long positions stay exact; cos/sin rounded to fp32
        const double ang = (double) pos * inv_freq[i];
        c = (float) std::cos(ang), s = (float) std::sin(ang);
    }
    // the table covers positions [0, upto) (upto ≤ MAX_POS)
    void extend(int32_t upto) {
        if (upto <= n) {
            return;
        }
        const int32_t half = head_dim / 2, to = std::max(upto, std::min(MAX_POS, 2 * n));
        cs.resize((size_t) to * half * 2);
        for (int32_t p = n; p < to; p++) {
            for (int32_t i = 0; i < half; i++) {
                angle(p, i, cs[((size_t) p * half + i) * 2], cs[((size_t) p * half + i) * 2 + 1]);
            }
        }
        n = to;
    }
};
}  // namespace

void rope(Backend & be, float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
          int32_t head_dim, const int32_t * pos, const RopeParams & rp) {
    const int32_t half = head_dim / 2;
    thread_local RopeTable tab;
    if (!tab.same(head_dim, rp)) {
        tab.reset(head_dim, rp);
    }
    int32_t max_pos = 0;
    for (int32_t t = 0; t < n_tokens; t++) {
        max_pos = std::max(max_pos, pos[t]);
    }
    tab.extend(std::min(max_pos + 1, RopeTable::MAX_POS));
    const RopeTable & T = tab;
    cpu_of(be).run_rows(n_tokens, [&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(n_tokens, ith, nth, b, e);
        for (int64_t t = b; t < e; t++) {
            float * row = qkv + (size_t) t * row_stride;
            for (int32_t i = 0; i < half; i++) {
                float c, sn;
                if (pos[t] >= 0 && pos[t] < T.n) {
                    c = T.cs[((size_t) pos[t] * half + i) * 2], sn = T.cs[((size_t) pos[t] * half + i) * 2 + 1];
                } else {
                    T.angle(pos[t], i, c, sn);
                }
                for (int32_t h = 0; h < n_head + n_head_kv; h++) {
                    float * v = row + (size_t) h * head_dim;
                    const float a = v[i], bb = v[i + half];
                    // rotate_half: (a, b) -> (a cos - b sin, b cos + a sin)
                    v[i] = a * c - bb * sn;
                    v[i + half] = bb * c + a * sn;
                }
            }
        }
    });
}

}  // namespace mq::cpu
