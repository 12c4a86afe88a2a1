#pragma once
#include <cuda_runtime.h>
#include <cstdint>
namespace mq {
struct SamplingParams;
// candidates the device sampler sorts (top_k above this, other than "all", goes to the host)
constexpr int32_t SAMPLE_CAP = 1024;
// Picks the next token from logits [n_vocab] (device) by mq::Sampler's rules (mq-sampling.h) with the uniform
// draw u: repetition penalty over penalty_ids [n_penalty] (device, distinct ids), then greedy, or top-k →
// top-p → min-p → temperature → draw. Writes the id to *out (device), or -1 where the nucleus reaches past
// the SAMPLE_CAP best candidates or 1024 < top_k < n_vocab (the caller then samples on the host).
// work: n_vocab floats of device scratch.
void cuda_sample(const float * logits, int32_t n_vocab, const SamplingParams & sp, double u, const int32_t * penalty_ids,
                 int32_t n_penalty, float * work, int32_t * out, cudaStream_t st);
}
