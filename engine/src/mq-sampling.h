// Token sampling: repetition penalty → top-k → top-p → min-p → temperature → draw (greedy when the
// temperature is 0). Deterministic for a given seed on every platform: the generator and the uniform
// draw are specified here, not left to the standard library's distributions.
#pragma once

#include <cstdint>
#include <vector>

namespace mq {

struct SamplingParams {
    float temperature = 0.8f;         // 0: greedy
    int32_t top_k = 40;               // 0: disabled
    float top_p = 0.95f;              // 1: disabled
    float min_p = 0.05f;              // 0: disabled
    float repetition_penalty = 1.0f;  // 1: disabled; applied to every token already in the sequence
    int64_t seed = -1;                // -1: random

    void validate() const;  // throws mq::ArgError naming the invalid value
};

class Sampler {
public:
    explicit Sampler(const SamplingParams & params);
    const SamplingParams & params() const { return params_; }
    // picks the next token from logits [n_vocab]; `history` is every token of the sequence so far
    int32_t sample(const float * logits, int32_t n_vocab, const std::vector<int32_t> & history) {
        return pick(logits, n_vocab, history, draw());
    }
    // the uniform draw in [0, 1) that sample() makes: one per token when the temperature is > 0, none when
    // greedy (a device sampler takes it so that both draw the same sequence)
    double draw() { return params_.temperature > 0.0f ? uniform() : 0.0; }
    // sample() with the draw u given
    int32_t pick(const float * logits, int32_t n_vocab, const std::vector<int32_t> & history, double u);

private:
    double uniform();  // [0, 1)

    SamplingParams params_;
    uint64_t state_;
    std::vector<std::pair<float, int32_t>> cand_;
};

}  // namespace mq
