// A conversation's state on a Model: the KV cache, the tokens it holds, scratch buffers; and
// generation on top of it (prefill, then one decode step per token, sampling and streaming text).
#pragma once

#include "mq-model.h"
#include "mq-sampling.h"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace mq {

class StreamDecoder;

struct ContextParams {
    int32_t n_ctx = 0;      // 0: min(the model's trained context length, 4096) (mq-memory.h)
    int32_t n_batch = 0;    // tokens per forward pass during prefill (bounds scratch memory); 0: the backend's default
                            // (Backend::default_n_batch: CPU 256, CUDA 2048)
    KvType kv_type = KV_TYPE_F16;  // int8 needs a model file with KV-cache scales (--kv-int8)
};

// "fp16" | "int8" -> the KV cache type; throws ArgError naming the value otherwise
KvType kv_type_parse(const std::string & name);
const char * kv_type_name(KvType t);

class Context {
public:
    Context(std::shared_ptr<const Model> model, const ContextParams & params);
    ~Context();
    Context(const Context &) = delete;
    Context & operator=(const Context &) = delete;

    const Model & model() const { return *model_; }
    int32_t n_ctx() const { return n_ctx_; }
    int32_t n_batch() const { return n_batch_; }  // tokens per prefill pass (params.n_batch, or the backend's default)
    KvType kv_type() const { return kv_type_; }
    // tokens whose keys and values are in the cache, in order
    const std::vector<int32_t> & tokens() const { return tokens_; }
    // forget everything after the first n tokens (0: clear)
    void truncate(int32_t n);

    // appends `tokens` at the current position and returns the logits of the last one [n_vocab], or of
    // every one [n, n_vocab] when all_logits; throws ContextOverflow past n_ctx
    const std::vector<float> & eval(const std::vector<int32_t> & tokens, bool all_logits);
    // eval(tokens, false) that leaves the last token's logits in device memory (no download), for sample()
    void eval_keep(const std::vector<int32_t> & tokens);
    // the next token from the logits eval_keep() left, by `sampler`: on the device where the backend can
    // (samples_on_device()), else on the host; the same token either way
    int32_t sample(Sampler & sampler);
    // waits for the backend's queued work (eval_keep() may return before its forward pass has run)
    void synchronize() { be_.synchronize(); }

    // calls fn(linear name, codes [m, kp], m, kp) with the int4 input codes of every w4a4 linear as they
    // are produced (tests compare them with the simulated engine); an empty function turns it off
    using CodeTrace = std::function<void(const std::string &, const std::vector<int8_t> &, int32_t, int64_t)>;
    void set_code_trace(CodeTrace fn) { code_trace_ = std::move(fn); }

    // the rows of layer l's K and V caches that hold tokens(), as stored: [n_tokens, kv_dim] elements of
    // kv_elem_size(kv_type()) bytes (fp16 bits or int8 codes); tests compare them with the simulator's
    void read_kv(int32_t l, std::vector<uint8_t> & k, std::vector<uint8_t> & v) const;

private:
    void trace_codes(const Linear & lin, int32_t m, const int8_t * codes);
    void eval_chunks(const std::vector<int32_t> & tokens, bool all_logits, bool download);
    void forward_chunk(const int32_t * ids, int32_t n, int32_t pos0, bool all_logits, bool logits, float * logits_out);
    void forward_ops(int32_t m, const AttentionShape & as, int32_t first, int32_t rows, float * logits_out);
    void attention_block(int32_t l, int32_t m, const AttentionShape & as);
    void mlp_block(int32_t l, int32_t m);
    void attention_block_w4a4(int32_t l, int32_t m, const AttentionShape & as);
    void mlp_block_w4a4(int32_t l, int32_t m);
    void rope_and_cache(int32_t l, int32_t m, const AttentionShape & as);
    KvScales kv_scales(int32_t l) const;  // layer l's int8 cache steps (none for an fp16 cache)

    std::shared_ptr<const Model> model_;
    Backend & be_;
    int32_t n_ctx_, n_batch_;
    int32_t logit_rows_;  // rows of logits_ (mq-memory.h, logit_rows)
    KvType kv_type_;
    std::vector<int32_t> tokens_;
    std::vector<void *> k_cache_, v_cache_;
    // scratch (device)
    float *x_, *h_, *qkv_, *attn_, *gu_, *act_, *logits_;
    int32_t *ids_, *pos_;
    int8_t * codes_;       // int4 codes between the ops of a static W4A4 block [n_batch, max kp]
    int8_t * codes_down_;  // down_proj's input codes (written while codes_ is read)
    CodeTrace code_trace_;
    std::vector<float> logits_host_;
};

struct GenerateParams {
    int32_t max_tokens = 128;
    SamplingParams sampling;
    std::vector<std::string> stop;    // stop strings (not included in the output)
    std::vector<int32_t> stop_ids;    // extra stop token ids (the tokenizer's end-of-turn ids always stop)
    bool ignore_eos = false;

    void validate(int32_t n_vocab) const;
};

struct Timings {
    int32_t n_prompt = 0, n_cached = 0, n_prefill = 0, n_decode = 0;
    // wall time of the prompt's forward pass; of the decode steps' forward passes and of every sampling
    double prefill_ms = 0.0, decode_ms = 0.0;
};

// One generation: the constructor prefills (reusing the cached prefix of `prompt`), next() yields text.
class Generator {
public:
    Generator(Context & ctx, const std::vector<int32_t> & prompt, const GenerateParams & params);
    ~Generator();
    // samples and decodes one token; appends newly completed UTF-8 text to `text`; false once finished
    bool next(std::string & text);
    // "stop" (end-of-turn token, stop id or stop string), "length" (max_tokens), "" while running
    const std::string & finish_reason() const { return finish_reason_; }
    const std::vector<int32_t> & output_tokens() const { return out_; }
    const Timings & timings() const { return timings_; }

private:
    Context & ctx_;
    GenerateParams params_;
    Sampler sampler_;
    std::unique_ptr<StreamDecoder> stream_;
    std::vector<int32_t> out_;
    std::string finish_reason_;
    Timings timings_;
};

}  // namespace mq
