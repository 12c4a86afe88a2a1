#include "mq-sampling.h"

#include "mq-error.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <unordered_set>

namespace mq {

void SamplingParams::validate() const {
    if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
        throw ArgError("invalid temperature " + std::to_string(temperature) + ": must be >= 0 (0 = greedy)");
    }
    if (top_k < 0) {
        throw ArgError("invalid top_k " + std::to_string(top_k) + ": must be >= 0 (0 = disabled)");
    }
    if (!(top_p > 0.0f && top_p <= 1.0f)) {
        throw ArgError("invalid top_p " + std::to_string(top_p) + ": must be in (0, 1]");
    }
    if (!(min_p >= 0.0f && min_p <= 1.0f)) {
        throw ArgError("invalid min_p " + std::to_string(min_p) + ": must be in [0, 1]");
    }
    if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty)) {
        throw ArgError("invalid repetition_penalty " + std::to_string(repetition_penalty) + ": must be > 0");
    }
    if (seed < -1) {
        throw ArgError("invalid seed " + std::to_string(seed) + ": must be >= 0 (or -1 for random)");
    }
}

// splitmix64: tiny, well-distributed, identical everywhere
static uint64_t splitmix64(uint64_t & s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

Sampler::Sampler(const SamplingParams & params) : params_(params) {
    params_.validate();
    state_ = params.seed >= 0 ? (uint64_t) params.seed
                              : (uint64_t) std::chrono::steady_clock::now().time_since_epoch().count();
}

double Sampler::uniform() {
    return (double) (splitmix64(state_) >> 11) * (1.0 / 9007199254740992.0);
}

int32_t Sampler::pick(const float * logits, int32_t n_vocab, const std::vector<int32_t> & history, double u) {
    cand_.resize(n_vocab);
    for (int32_t i = 0; i < n_vocab; i++) {
        cand_[i] = {logits[i], i};
    }
    if (params_.repetition_penalty != 1.0f) {
        // as in CTRL / Hugging Face: positive logits divided by the penalty, negative ones multiplied
        std::unordered_set<int32_t> seen(history.begin(), history.end());
        for (int32_t id : seen) {
            if (id >= 0 && id < n_vocab) {
                float & l = cand_[id].first;
                l = l > 0.0f ? l / params_.repetition_penalty : l * params_.repetition_penalty;
            }
        }
    }
    auto by_logit = [](const std::pair<float, int32_t> & a, const std::pair<float, int32_t> & b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    if (params_.temperature == 0.0f) {
        return std::min_element(cand_.begin(), cand_.end(), by_logit)->second;
    }
    size_t n = cand_.size();
    if (params_.top_k > 0 && (size_t) params_.top_k < n) {
        n = (size_t) params_.top_k;
        std::partial_sort(cand_.begin(), cand_.begin() + n, cand_.end(), by_logit);
    } else {
        std::sort(cand_.begin(), cand_.end(), by_logit);
    }
    cand_.resize(n);
    // probabilities at temperature 1 for the top-p and min-p cut (llama.cpp order: filters, then temperature)
    std::vector<double> p(n);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        p[i] = std::exp((double) cand_[i].first - cand_[0].first);
        sum += p[i];
    }
    size_t keep = n;
    if (params_.top_p < 1.0f) {
        double cum = 0.0;
        for (size_t i = 0; i < n; i++) {
            cum += p[i] / sum;
            if (cum >= params_.top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    if (params_.min_p > 0.0f) {
        // p_i >= min_p * p_max, and p_max is p[0] = 1 before normalization
        size_t k = 1;
        while (k < keep && p[k] >= params_.min_p) {
            k++;
        }
        keep = k;
    }
    cand_.resize(keep);
    std::vector<double> w(keep);
    double total = 0.0;
    for (size_t i = 0; i < keep; i++) {
        w[i] = std::exp(((double) cand_[i].first - cand_[0].first) / params_.temperature);
        total += w[i];
    }
    double r = u * total;
    for (size_t i = 0; i < keep; i++) {
        r -= w[i];
        if (r < 0.0) {
            return cand_[i].second;
        }
    }
    return cand_[keep - 1].second;
}

}  // namespace mq
