#include "mq-context.h"

#include "mq-error.h"
#include "mq-memory.h"
#include "mq-vocab.h"

#include <algorithm>
#include <chrono>

namespace mq {

static double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

KvType kv_type_parse(const std::string & name) {
    if (name == "fp16") {
        return KV_TYPE_F16;
    }
    if (name == "int8") {
        return KV_TYPE_I8;
    }
    throw ArgError("invalid kv_cache '" + name + "': expected fp16 or int8");
}

const char * kv_type_name(KvType t) {
    return t == KV_TYPE_I8 ? "int8" : "fp16";
}

Context::Context(std::shared_ptr<const Model> model, const ContextParams & params)
    : model_(std::move(model)), be_(model_->backend()), kv_type_(params.kv_type) {
    const Config & c = model_->config();
    if (params.n_ctx < 0) {
        throw ArgError("invalid n_ctx " + std::to_string(params.n_ctx) + ": must be > 0 (or 0 for min(trained context, 4096))");
    }
    if (params.n_batch < 0) {
        throw ArgError("invalid n_batch " + std::to_string(params.n_batch) + ": must be >= 1 (or 0 for the backend's default, " +
                       std::to_string(be_.default_n_batch()) + " on " + be_.name() + ")");
    }
    if (kv_type_ != KV_TYPE_F16 && kv_type_ != KV_TYPE_I8) {
        throw ArgError("invalid KV cache type " + std::to_string((int) kv_type_) + ": expected fp16 or int8");
    }
    if (kv_type_ == KV_TYPE_I8 && !model_->has_kv_scales()) {
        throw ArgError("model file " + model_->file().path() +
                       " has no KV-cache scales (attn_k_scale/attn_v_scale): convert it with --kv-int8");
    }
    n_ctx_ = params.n_ctx > 0 ? params.n_ctx : default_n_ctx(c);
    n_batch_ = std::min(params.n_batch > 0 ? params.n_batch : be_.default_n_batch(), n_ctx_);
    memory_check_context(be_, *model_, memory_plan(*model_, n_ctx_, n_batch_, kv_type_));
    const size_t kv_bytes = (size_t) n_ctx_ * c.kv_dim() * kv_elem_size(kv_type_);
    for (int32_t i = 0; i < c.n_layer; i++) {
        k_cache_.push_back(be_.alloc(kv_bytes));
        v_cache_.push_back(be_.alloc(kv_bytes));
    }
    const size_t B = (size_t) n_batch_;
    x_ = (float *) be_.alloc(B * c.n_embd * sizeof(float));
    h_ = (float *) be_.alloc(B * c.n_embd * sizeof(float));
    qkv_ = (float *) be_.alloc(B * c.qkv_dim() * sizeof(float));
    attn_ = (float *) be_.alloc(B * c.q_dim() * sizeof(float));
    gu_ = (float *) be_.alloc(B * 2 * c.n_ff * sizeof(float));
    act_ = (float *) be_.alloc(B * c.n_ff * sizeof(float));
    logit_rows_ = logit_rows(c, n_batch_);
    logits_ = (float *) be_.alloc((size_t) logit_rows_ * c.n_vocab * sizeof(float));
    ids_ = (int32_t *) be_.alloc(B * sizeof(int32_t));
    int64_t max_kp = 0;
    for (const LayerWeights & L : model_->layers) {
        for (const Linear * lin : {&L.attn_qkv, &L.attn_output, &L.ffn_gate_up, &L.ffn_down}) {
            max_kp = std::max(max_kp, lin->kp);
        }
    }
    codes_ = (int8_t *) be_.alloc(std::max<size_t>(1, B * (size_t) max_kp));
    codes_down_ = (int8_t *) be_.alloc(std::max<size_t>(1, B * (size_t) max_kp));
    pos_ = (int32_t *) be_.alloc(B * sizeof(int32_t));
}

Context::~Context() {
    be_.forget_step(this);
    for (void * p : k_cache_) {
        be_.free(p);
    }
    for (void * p : v_cache_) {
        be_.free(p);
    }
    for (void * p : {(void *) x_, (void *) h_, (void *) qkv_, (void *) attn_, (void *) gu_, (void *) act_,
                     (void *) logits_, (void *) ids_, (void *) pos_, (void *) codes_, (void *) codes_down_}) {
        be_.free(p);
    }
}

void Context::truncate(int32_t n) {
    if (n < (int32_t) tokens_.size()) {
        tokens_.resize(std::max(n, 0));
    }
}

const std::vector<float> & Context::eval(const std::vector<int32_t> & tokens, bool all_logits) {
    eval_chunks(tokens, all_logits, true);
    return logits_host_;
}

void Context::eval_keep(const std::vector<int32_t> & tokens) {
    eval_chunks(tokens, false, false);
}

int32_t Context::sample(Sampler & sampler) {
    const int32_t n_vocab = model_->config().n_vocab;
    const SamplingParams & sp = sampler.params();
    const double u = sampler.draw();
    if (be_.samples_on_device()) {
        std::vector<int32_t> seen;
        if (sp.repetition_penalty != 1.0f) {
            seen = tokens_;
            std::sort(seen.begin(), seen.end());
            seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
        }
        const int32_t id = be_.sample(logits_, n_vocab, sp, u, seen);
        if (id >= 0) {
            return id;
        }
    }
    logits_host_.resize(n_vocab);
    be_.download(logits_host_.data(), logits_, (size_t) n_vocab * sizeof(float));
    return sampler.pick(logits_host_.data(), n_vocab, tokens_, u);
}

void Context::eval_chunks(const std::vector<int32_t> & tokens, bool all_logits, bool download) {
    const Config & c = model_->config();
    const int32_t n = (int32_t) tokens.size();
    if (n == 0) {
        throw ArgError("eval: no tokens");
    }
    for (int32_t id : tokens) {
        if (id < 0 || id >= c.n_vocab) {
            throw ArgError("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                           std::to_string(c.n_vocab) + ")");
        }
    }
    if ((int64_t) tokens_.size() + n > n_ctx_) {
        throw ContextOverflow("context overflow: " + std::to_string(tokens_.size()) + " cached + " +
                              std::to_string(n) + " new tokens exceed the context length of " +
                              std::to_string(n_ctx_) + " (n_ctx)");
    }
    if (download) {
        logits_host_.resize((size_t) (all_logits ? n : 1) * c.n_vocab);
    }
    for (int32_t done = 0; done < n; done += n_batch_) {
        const int32_t m = std::min(n_batch_, n - done);
        const bool last = done + m == n;
        float * out = !download ? nullptr
                      : all_logits ? logits_host_.data() + (size_t) done * c.n_vocab
                                   : (last ? logits_host_.data() : nullptr);
        forward_chunk(tokens.data() + done, m, (int32_t) tokens_.size(), all_logits, all_logits || last, out);
        tokens_.insert(tokens_.end(), tokens.begin() + done, tokens.begin() + done + m);
    }
}

// One forward pass over m tokens at positions pos0..pos0+m-1; with `logits`, the logits of the last row (of
// every row when all_logits) are downloaded to logits_out when it is given, and the last row's (the last piece's
// where the rows do not fit logits_ at once) are left in logits_.
void Context::forward_chunk(const int32_t * ids, int32_t m, int32_t pos0, bool all_logits, bool logits,
                            float * logits_out) {
    const Config & c = model_->config();
    std::vector<int32_t> pos(m);
    for (int32_t i = 0; i < m; i++) {
        pos[i] = pos0 + i;
    }
    be_.upload(ids_, ids, m * sizeof(int32_t));
    be_.upload(pos_, pos.data(), m * sizeof(int32_t));
    AttentionShape as{c.n_head, c.n_head_kv, c.head_dim, n_ctx_, kv_type_};
    // logits only for the rows asked for: all of them, or the last one
    const int32_t first = all_logits ? 0 : m - 1;
    const int32_t rows = m - first;
    if (rows > logit_rows_ && !logits_out) {
        throw Error("forward pass: " + std::to_string(rows) + " rows of logits do not fit the logits buffer (" +
                    std::to_string(logit_rows_) + " rows) and none are downloaded");
    }
    auto ops = [&]() { forward_ops(m, as, logits ? first : -1, rows, rows > logit_rows_ ? logits_out : nullptr); };
    // a decode step issues the same ops on the same buffers every time (the token id and position are
    // read from ids_/pos_ on the device), so the backend may capture it once and replay it; a code trace
    // downloads between the ops, which a capture cannot hold
    if (m == 1 && logits && !code_trace_) {
        be_.run_step(this, ops);
    } else {
        ops();
    }
    if (logits_out && rows <= logit_rows_) {
        be_.download(logits_out, logits_, (size_t) rows * c.n_vocab * sizeof(float));
    }
}

// The model's forward pass over m tokens whose ids and positions are in ids_/pos_: the embedding, every
// block's attention and MLP (each added to the residual stream x_), then the final norm and lm_head for rows
// [first, first + rows) when first >= 0: into logits_, or, with pieces_out, logit_rows_ rows at a time into
// logits_ and from there to pieces_out (rows more than logits_ holds: an all-logits pass of a large vocabulary).
// A static W4A4 block (docs/numerics.md) passes int4 codes between its ops.
void Context::forward_ops(int32_t m, const AttentionShape & as, int32_t first, int32_t rows, float * pieces_out) {
    const Model & M = *model_;
    const Config & c = M.config();
    be_.embed(M.embed, ids_, m, c.n_embd, x_);
    for (int32_t l = 0; l < c.n_layer; l++) {
        if (M.layers[l].static_w4a4) {
            attention_block_w4a4(l, m, as);
            mlp_block_w4a4(l, m);
        } else {
            attention_block(l, m, as);
            mlp_block(l, m);
        }
    }
    if (first >= 0) {
        be_.rmsnorm(x_ + (size_t) first * c.n_embd, (const float *) M.output_norm, rows, c.n_embd, c.rms_eps, h_);
        if (!pieces_out) {
            be_.linear(M.output, h_, rows, logits_, false);
            return;
        }
        for (int32_t r0 = 0; r0 < rows; r0 += logit_rows_) {
            const int32_t rr = std::min(logit_rows_, rows - r0);
            be_.linear(M.output, h_ + (size_t) r0 * c.n_embd, rr, logits_, false);
            be_.download(pieces_out + (size_t) r0 * c.n_vocab, logits_, (size_t) rr * c.n_vocab * sizeof(float));
        }
    }
}

// x += attention(rmsnorm(x) · Wqkvᵀ) · Woᵀ
void Context::attention_block(int32_t l, int32_t m, const AttentionShape & as) {
    const Config & c = model_->config();
    const LayerWeights & L = model_->layers[l];
    be_.rmsnorm(x_, (const float *) L.attn_norm, m, c.n_embd, c.rms_eps, h_);
    be_.linear(L.attn_qkv, h_, m, qkv_, false);
    rope_and_cache(l, m, as);
    be_.attention(qkv_, m, c.qkv_dim(), as, pos_, kv_scales(l), k_cache_[l], v_cache_[l], attn_);
    be_.linear(L.attn_output, attn_, m, x_, true);
}

// x += swiglu(rmsnorm(x) · Wguᵀ) · Wdᵀ
void Context::mlp_block(int32_t l, int32_t m) {
    const Config & c = model_->config();
    const LayerWeights & L = model_->layers[l];
    be_.rmsnorm(x_, (const float *) L.ffn_norm, m, c.n_embd, c.rms_eps, h_);
    be_.linear(L.ffn_gate_up, h_, m, gu_, false);
    be_.swiglu(gu_, m, c.n_ff, act_);
    be_.linear(L.ffn_down, act_, m, x_, true);
}

// the same in a static W4A4 block: the norm writes q/k/v's input codes, attention o_proj's
void Context::attention_block_w4a4(int32_t l, int32_t m, const AttentionShape & as) {
    const Config & c = model_->config();
    const LayerWeights & L = model_->layers[l];
    be_.rmsnorm_quant(x_, L.attn_qkv, m, c.n_embd, c.rms_eps, codes_);
    trace_codes(L.attn_qkv, m, codes_);
    be_.linear_codes(L.attn_qkv, codes_, m, qkv_, false);
    rope_and_cache(l, m, as);
    be_.attention_quant(qkv_, m, c.qkv_dim(), as, pos_, kv_scales(l), k_cache_[l], v_cache_[l], attn_, L.attn_output,
                        codes_);
    trace_codes(L.attn_output, m, codes_);
    be_.linear_codes(L.attn_output, codes_, m, x_, true);
}

// the norm writes gate/up's codes, gate/up + SwiGLU down_proj's
void Context::mlp_block_w4a4(int32_t l, int32_t m) {
    const Config & c = model_->config();
    const LayerWeights & L = model_->layers[l];
    be_.rmsnorm_quant(x_, L.ffn_gate_up, m, c.n_embd, c.rms_eps, codes_);
    trace_codes(L.ffn_gate_up, m, codes_);
    if (!L.down_codes) {  // ffn_down takes the fp32 SwiGLU output (mixed precision, docs/numerics.md)
        be_.linear_codes(L.ffn_gate_up, codes_, m, gu_, false);
        be_.swiglu(gu_, m, c.n_ff, act_);
        be_.linear(L.ffn_down, act_, m, x_, true);
        return;
    }
    be_.linear_codes_swiglu_quant(L.ffn_gate_up, codes_, m, L.ffn_down, c.n_ff, gu_, codes_down_);
    trace_codes(L.ffn_down, m, codes_down_);
    be_.linear_codes(L.ffn_down, codes_down_, m, x_, true);
}

// RoPE on q and k of qkv_, then k and v into layer l's caches
void Context::rope_and_cache(int32_t l, int32_t m, const AttentionShape & as) {
    const Config & c = model_->config();
    be_.rope_kv_store(qkv_, m, c.qkv_dim(), as, pos_, c.rope, kv_scales(l), k_cache_[l], v_cache_[l]);
}

KvScales Context::kv_scales(int32_t l) const {
    return kv_type_ == KV_TYPE_I8 ? model_->layers[l].kv_scales : KvScales();
}

void Context::read_kv(int32_t l, std::vector<uint8_t> & k, std::vector<uint8_t> & v) const {
    const Config & c = model_->config();
    if (l < 0 || l >= c.n_layer) {
        throw ArgError("layer " + std::to_string(l) + " is outside [0, " + std::to_string(c.n_layer) + ")");
    }
    const size_t bytes = tokens_.size() * (size_t) c.kv_dim() * kv_elem_size(kv_type_);
    k.resize(bytes);
    v.resize(bytes);
    be_.download(k.data(), k_cache_[l], bytes);
    be_.download(v.data(), v_cache_[l], bytes);
}

void Context::trace_codes(const Linear & lin, int32_t m, const int8_t * codes) {
    if (!code_trace_) {
        return;
    }
    std::vector<int8_t> host((size_t) m * lin.kp);
    be_.download(host.data(), codes, host.size());
    code_trace_(lin.name, host, m, lin.kp);
}

void GenerateParams::validate(int32_t n_vocab) const {
    if (max_tokens < 0) {
        throw ArgError("invalid max_tokens " + std::to_string(max_tokens) + ": must be >= 0");
    }
    sampling.validate();
    for (const std::string & s : stop) {
        if (s.empty()) {
            throw ArgError("invalid stop string: empty");
        }
    }
    for (int32_t id : stop_ids) {
        if (id < 0 || id >= n_vocab) {
            throw ArgError("invalid stop token id " + std::to_string(id) + ": outside [0, " +
                           std::to_string(n_vocab) + ")");
        }
    }
}

Generator::Generator(Context & ctx, const std::vector<int32_t> & prompt, const GenerateParams & params)
    : ctx_(ctx), params_(params), sampler_((params.validate(ctx.model().config().n_vocab), params.sampling)) {
    if (prompt.empty()) {
        throw ArgError("empty prompt: at least one token is needed");
    }
    const int64_t need = (int64_t) prompt.size() + params.max_tokens;
    if (need > ctx.n_ctx()) {
        throw ContextOverflow("context overflow: prompt of " + std::to_string(prompt.size()) + " tokens + max_tokens " +
                              std::to_string(params.max_tokens) + " exceed the context length of " +
                              std::to_string(ctx.n_ctx()) + " (raise n_ctx or shorten the prompt)");
    }
    // keep the longest cached prefix, but evaluate at least the last prompt token to get its logits
    const std::vector<int32_t> & cached = ctx.tokens();
    size_t keep = 0;
    while (keep < cached.size() && keep + 1 < prompt.size() && cached[keep] == prompt[keep]) {
        keep++;
    }
    ctx.truncate((int32_t) keep);
    timings_.n_prompt = (int32_t) prompt.size();
    timings_.n_cached = (int32_t) keep;
    timings_.n_prefill = (int32_t) (prompt.size() - keep);
    const double t0 = now_ms();
    ctx.eval_keep(std::vector<int32_t>(prompt.begin() + keep, prompt.end()));
    ctx.synchronize();
    timings_.prefill_ms = now_ms() - t0;
    stream_.reset(new StreamDecoder(ctx.model().vocab(), params.stop));
    if (params.max_tokens == 0) {
        finish_reason_ = "length";
    }
}

Generator::~Generator() = default;

bool Generator::next(std::string & text) {
    if (!finish_reason_.empty()) {
        return false;
    }
    const Vocab & vocab = ctx_.model().vocab();
    double t0 = now_ms();
    const int32_t id = ctx_.sample(sampler_);
    timings_.decode_ms += now_ms() - t0;
    const bool is_stop_id = std::find(params_.stop_ids.begin(), params_.stop_ids.end(), id) != params_.stop_ids.end();
    if ((!params_.ignore_eos && vocab.is_eot(id)) || is_stop_id) {
        text += stream_->flush();
        finish_reason_ = "stop";
        return false;
    }
    out_.push_back(id);
    text += stream_->push(id);
    if (stream_->stopped()) {
        finish_reason_ = "stop";
        return false;
    }
    if ((int32_t) out_.size() >= params_.max_tokens) {
        text += stream_->flush();
        finish_reason_ = "length";
        return false;
    }
    t0 = now_ms();
    ctx_.eval_keep({id});
    ctx_.synchronize();
    timings_.decode_ms += now_ms() - t0;
    timings_.n_decode++;
    return true;
}

}  // namespace mq
