#include "mq-model.h"

#include "mq-error.h"
#include "mq-memory.h"
#include "mq-schemes.h"
#include "mq-vocab.h"

#include <cmath>
#include <thread>
#include <unistd.h>

namespace mq {

int32_t default_thread_count() {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) {
        n = (long) std::thread::hardware_concurrency();
    }
    return n < 1 ? 1 : (int32_t) n;
}

static int32_t config_int(const Json & j, const char * key, int64_t lo, int64_t hi) {
    int64_t v = j.at(key).as_int(key);
    if (v < lo || v > hi) {
        throw Error(std::string("config: ") + key + " = " + std::to_string(v) + " is out of range [" +
                    std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return (int32_t) v;
}

// a finite number in [lo, hi] (lo_open: lo itself excluded); docs/format.md states each field's range
static float config_float(const Json & j, const char * key, double lo, bool lo_open, double hi) {
    const double v = j.at(key).as_number(key);
    if (!std::isfinite(v) || v < lo || (lo_open && v == lo) || v > hi) {
        throw Error(std::string("config: ") + key + " = " + std::to_string(v) + " is out of range " +
                    (lo_open ? "(" : "[") + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return (float) v;
}

Config Config::from_json(const Json & j) {
    Config c;
    if (!j.is_object()) {
        throw Error("config is not a JSON object");
    }
    c.architecture = j.at("architecture").as_string("config.architecture");
    if (c.architecture != "llama") {
        throw Error("unsupported architecture '" + c.architecture + "' (this engine runs 'llama')");
    }
    c.n_vocab = config_int(j, "vocab_size", 1, 1 << 24);
    c.n_embd = config_int(j, "hidden_size", 1, 1 << 20);
    c.n_ff = config_int(j, "intermediate_size", 1, 1 << 22);
    c.n_layer = config_int(j, "num_hidden_layers", 1, 4096);
    c.n_head = config_int(j, "num_attention_heads", 1, 4096);
    c.n_head_kv = config_int(j, "num_key_value_heads", 1, 4096);
    c.head_dim = config_int(j, "head_dim", 2, 1024);
    c.n_ctx_train = config_int(j, "max_position_embeddings", 1, 1 << 24);
    if (c.n_head % c.n_head_kv != 0) {
        throw Error("config: num_attention_heads " + std::to_string(c.n_head) +
                    " is not a multiple of num_key_value_heads " + std::to_string(c.n_head_kv));
    }
    if (c.head_dim % 2 != 0) {
        throw Error("config: head_dim must be even for RoPE");
    }
    // the widest row the engine indexes with 32-bit products: (H + 2 Hkv) * hd
    if ((int64_t) (c.n_head + 2 * c.n_head_kv) * c.head_dim > (1 << 22)) {
        throw Error("config: (num_attention_heads + 2 * num_key_value_heads) * head_dim = " +
                    std::to_string((int64_t) (c.n_head + 2 * c.n_head_kv) * c.head_dim) + " exceeds 4194304");
    }
    // 1e-12 keeps 1/sqrt(mean + eps) finite in fp32 for a zero row; 1 is far above any trained value
    c.rms_eps = config_float(j, "rms_norm_eps", 1e-12, false, 1.0);
    c.rope.theta = config_float(j, "rope_theta", 1.0, false, 1e12);
    c.tied_embeddings = j.at("tie_word_embeddings").as_bool("config.tie_word_embeddings");
    const Json & rs = j.get("rope_scaling");
    c.rope.factor = 0.0f;
    if (!rs.is_null()) {
        if (!rs.is_object()) {
            throw Error("config: rope_scaling must be null or an object");
        }
        std::string type = rs.get_string("rope_type", rs.get_string("type", ""));
        if (type != "llama3") {
            throw Error("config: unsupported rope_scaling type '" + type + "' (supported: llama3)");
        }
        c.rope.factor = config_float(rs, "factor", 1.0, false, 1024.0);
        c.rope.low_freq_factor = config_float(rs, "low_freq_factor", 0.0, true, 1024.0);
        c.rope.high_freq_factor = config_float(rs, "high_freq_factor", 0.0, true, 1024.0);
        // the smoothing divides by high_freq_factor - low_freq_factor (docs/numerics.md)
        if (!(c.rope.high_freq_factor > c.rope.low_freq_factor)) {
            throw Error("config: rope_scaling.high_freq_factor (" + std::to_string(c.rope.high_freq_factor) +
                        ") must be greater than low_freq_factor (" + std::to_string(c.rope.low_freq_factor) + ")");
        }
        c.rope.original_max_pos = config_int(rs, "original_max_position_embeddings", 1, 1 << 24);
    }
    return c;
}

static std::unique_ptr<Backend> backend_select(const std::string & device, int32_t n_threads) {
    if (device == "cpu") {
        return backend_cpu_create(n_threads);
    }
    int32_t index = 0;
    const bool want_cuda = device.rfind("cuda", 0) == 0;
    if (want_cuda && device.size() > 4) {
        if (device[4] != ':' || device.size() == 5 || device.find_first_not_of("0123456789", 5) != std::string::npos) {
            throw ArgError("invalid device '" + device + "': expected auto, cpu, cuda or cuda:N");
        }
        index = std::stoi(device.substr(5));
    }
    if (!want_cuda && device != "auto") {
        throw ArgError("invalid device '" + device + "': expected auto, cpu, cuda or cuda:N");
    }
    std::string why;
    std::unique_ptr<Backend> cuda = backend_cuda_create(index, why);
    if (cuda) {
        return cuda;
    }
    if (want_cuda) {
        throw Error("device '" + device + "' requested but unavailable: " + why);
    }
    return backend_cpu_create(n_threads);
}

Model::Model(const std::string & path, const ModelParams & params) {
    file_.reset(new File(path));
    try {
        if (!file_->metadata().count("config")) {
            throw Error("metadata has no 'config' (a tokenizer-only file?)");
        }
        config_ = Config::from_json(file_->meta_json("config"));
    } catch (const Error & e) {
        throw Error("model file '" + path + "': " + e.what());
    }
    const Json & quant = file_->meta_json("quant");
    quant_method_ = quant.get_string("method", "f16");
    try {
        vocab_.reset(new Vocab(*file_));
    } catch (const Error & e) {
        // a malformed tokenizer table is a malformed file: the error names it (the vocab's own checks do)
        const std::string what = e.what();
        throw Error(what.find(path) != std::string::npos ? what : "model file '" + path + "': tokenizer: " + what);
    }
    // every id the model can sample must be a token the tokenizer can decode (a padded embedding is
    // written with padding tokens, docs/format.md), and every token must have an embedding row
    if (vocab_->n_tokens() != config_.n_vocab) {
        throw Error("model file '" + path + "': tokenizer has " + std::to_string(vocab_->n_tokens()) +
                    " tokens but config.vocab_size is " + std::to_string(config_.n_vocab) + " (they must be equal)");
    }
    n_threads_ = params.n_threads > 0 ? params.n_threads : default_thread_count();
    backend_ = backend_select(params.device, n_threads_);
    memory_check_weights(*backend_, *file_);
    try {
        load_weights(quant);
    } catch (...) {
        release();
        throw;
    }
}

void Model::load_weights(const Json & quant) {
    const std::string & path = file_->path();

    const Config & c = config_;
    output_norm = load_norm("output_norm.weight");
    // the int8 KV cache's steps are optional: every layer has both or the file has none
    for (int32_t i = 0; i < c.n_layer && !has_kv_scales_; i++) {
        const std::string p = "blk." + std::to_string(i) + ".";
        has_kv_scales_ = file_->has(p + "attn_k_scale") || file_->has(p + "attn_v_scale");
    }
    layers.resize(c.n_layer);
    for (int32_t i = 0; i < c.n_layer; i++) {
        const std::string p = "blk." + std::to_string(i) + ".";
        LayerWeights & L = layers[i];
        L.attn_norm = load_norm(p + "attn_norm.weight");
        L.ffn_norm = load_norm(p + "ffn_norm.weight");
        load_linear(L.attn_qkv, p + "attn_qkv", c.qkv_dim(), c.n_embd, quant, LINEAR_INPUT_NORM);
        load_linear(L.attn_output, p + "attn_output", c.n_embd, c.q_dim(), quant, LINEAR_INPUT_CODES);
        load_linear(L.ffn_gate_up, p + "ffn_gate_up", 2 * (int64_t) c.n_ff, c.n_embd, quant, LINEAR_INPUT_NORM);
        load_linear(L.ffn_down, p + "ffn_down", c.n_embd, c.n_ff, quant, LINEAR_INPUT_SLOTS);
        // static W4A4 is a property of the whole block: integer codes flow from op to op; ffn_down alone may take
        // floats instead (the mixed-precision policy: it quantizes the SwiGLU output itself)
        const int n_static = L.attn_qkv.def->takes_codes + L.attn_output.def->takes_codes + L.ffn_gate_up.def->takes_codes;
        if ((n_static != 0 && n_static != 3) || (n_static == 0 && L.ffn_down.def->takes_codes)) {
            throw Error("model file '" + path + "': layer " + std::to_string(i) +
                        " mixes w4a4 with other schemes; a static W4A4 block has attn_qkv, attn_output and ffn_gate_up "
                        "in w4a4, and ffn_down in w4a4 or in a scheme that takes floats");
        }
        L.static_w4a4 = n_static == 3;
        L.down_codes = L.static_w4a4 && L.ffn_down.def->takes_codes;
        if (has_kv_scales_) {
            L.kv_scales = load_kv_scales(i);
        }
    }
    load_output(quant);
}

// The output linear and the embedding (docs/format.md, "The output linear"): quant.linears.output names the
// output's scheme (absent: f16). An untied model has token_embd.weight (F16) and the output in its scheme; a tied
// model stores one matrix: token_embd.weight when f16, else the output linear's tensors, whose rows the embedding
// dequantizes (w8a8, w4a16g).
void Model::load_output(const Json & quant) {
    const std::string & path = file_->path();
    const Config & c = config_;
    const Json & linears = quant.get("linears");
    const std::string scheme = linears.is_null() ? "f16" : linears.get_string("output", "f16");
    auto refuse = [&](const std::string & why) { throw Error("model file '" + path + "': " + why); };
    auto upload = [&](const TensorView & t) {
        void * d = backend_->upload_copy(t.data, t.nbytes);
        owned_.push_back(d);
        return (const void *) d;
    };
    if (scheme == "f16") {
        for (const char * name : {"output.qweight", "output.scale"}) {
            if (file_->has(name)) {
                refuse(std::string("tensor '") + name + "' is present but quant.linears gives 'output' no quantized "
                       "scheme (f16 reads 'output.weight', or 'token_embd.weight' when tied)");
            }
        }
        const TensorView & emb = file_->tensor("token_embd.weight", DTYPE_F16, {c.n_vocab, c.n_embd});
        embed = EmbedTable();
        embed.data = upload(emb);
        if (c.tied_embeddings && file_->has("output.weight")) {
            refuse("tie_word_embeddings is set but 'output.weight' is present");
        }
        output.name = c.tied_embeddings ? "token_embd" : "output";
        output.scheme = "f16";
        output.n = c.n_vocab;
        output.k = c.n_embd;
        output.tensors = {c.tied_embeddings ? &emb : &file_->tensor("output.weight", DTYPE_F16, {c.n_vocab, c.n_embd})};
        backend_->prepare_linear(output);
        return;
    }
    if (file_->has("output.weight")) {
        refuse("tensor 'output.weight' is present but quant.linears gives 'output' the scheme '" + scheme +
               "' (its tensors are output.qweight, output.scale, ...)");
    }
    const Scheme * def = scheme_find(scheme);
    if (def && def->takes_codes) {
        refuse("linear 'output' uses scheme '" + scheme + "', which takes int4 codes from the op before it; the "
               "output linear reads the final norm's fp32 output (use f16, w8a8 or w4a16g)");
    }
    if (c.tied_embeddings) {
        if (scheme != "w8a8" && scheme != "w4a16g") {
            refuse("tie_word_embeddings is set and linear 'output' uses scheme '" + scheme + "': the embedding of a "
                   "tied model reads the rows of the output matrix, which it can dequantize for f16, w8a8 and w4a16g only");
        }
        if (file_->has("token_embd.weight")) {
            refuse("tie_word_embeddings is set and linear 'output' is stored as " + scheme + ", so tensor "
                   "'token_embd.weight' must be absent (the embedding reads the rows of the output matrix)");
        }
        if (file_->has("output.bias")) {
            refuse("tie_word_embeddings is set and tensor 'output.bias' is present: the rows the embedding reads "
                   "cannot carry a bias");
        }
    } else {
        file_->tensor("token_embd.weight", DTYPE_F16, {c.n_vocab, c.n_embd});
    }
    load_linear(output, "output", c.n_vocab, c.n_embd, quant, LINEAR_INPUT_NORM);
    if (c.tied_embeddings) {
        embed = EmbedTable();
        embed.kind = scheme == "w8a8" ? EMBED_I8_ROW : EMBED_I4_GROUP;
        embed.data = upload(*output.qweight);
        embed.scale = upload(*output.scale);
        embed.group = (int32_t) output.group;
    } else {
        embed = EmbedTable();
        embed.data = upload(file_->tensor("token_embd.weight"));
    }
}

void * Model::load_norm(const std::string & name) {
    const TensorView & t = file_->tensor(name, DTYPE_F32, {config_.n_embd});
    void * p = backend_->upload_copy(t.data, t.nbytes);
    owned_.push_back(p);
    return p;
}

// Layer l's int8 KV-cache steps s (docs/format.md: F32 [n_head_kv * head_dim], finite, > 0) and their
// inverses fp32(1 / s), computed here once for every backend (docs/numerics.md), uploaded side by side.
KvScales Model::load_kv_scales(int32_t l) {
    const int32_t kv_dim = config_.kv_dim();
    const float * dev[4];
    for (int which = 0; which < 2; which++) {
        const std::string name = "blk." + std::to_string(l) + (which ? ".attn_v_scale" : ".attn_k_scale");
        const float * s = file_->tensor(name, DTYPE_F32, {kv_dim}).as<float>();
        std::vector<float> host(2 * (size_t) kv_dim);
        for (int32_t c = 0; c < kv_dim; c++) {
            if (!std::isfinite(s[c]) || !(s[c] > 0.0f)) {
                throw Error("model file '" + file_->path() + "': tensor '" + name + "' channel " + std::to_string(c) +
                            " is " + std::to_string(s[c]) + ": KV-cache scales must be finite and > 0");
            }
            host[c] = s[c];
            host[kv_dim + c] = 1.0f / s[c];
        }
        float * d = (float *) backend_->upload_copy(host.data(), host.size() * sizeof(float));
        owned_.push_back(d);
        dev[2 * which] = d;
        dev[2 * which + 1] = d + kv_dim;
    }
    KvScales ks;
    ks.k_scale = dev[0];
    ks.k_inv = dev[1];
    ks.v_scale = dev[2];
    ks.v_inv = dev[3];
    return ks;
}

// a linear [n, k]: its scheme from quant.linears, the scheme's tensors (mq-schemes.cpp), its backend kernels
void Model::load_linear(Linear & lin, const std::string & name, int64_t n, int64_t k, const Json & quant,
                        LinearInput input) {
    lin.name = name;
    lin.n = n;
    lin.k = k;
    const Json & linears = quant.get("linears");
    lin.scheme = linears.is_null() ? "f16" : linears.get_string(name, "");
    const std::string & path = file_->path();
    if (lin.scheme.empty()) {
        throw Error("model file '" + path + "': quant.linears has no scheme for '" + name + "'");
    }
    const Scheme * def = scheme_find(lin.scheme);
    if (!def) {
        throw Error("model file '" + path + "': linear '" + name + "': uses scheme '" + lin.scheme +
                    "', which this engine does not support (it runs " + scheme_names() + ")");
    }
    def->load(*file_, lin, input);
    try {
        backend_->prepare_linear(lin);
    } catch (const Error & e) {
        throw Error("model file '" + path + "': " + e.what());
    }
}

Model::~Model() {
    release();
}

void Model::release() {
    if (!backend_) {
        return;
    }
    for (auto & L : layers) {
        for (Linear * lin : {&L.attn_qkv, &L.attn_output, &L.ffn_gate_up, &L.ffn_down}) {
            backend_->release_linear(*lin);
        }
    }
    backend_->release_linear(output);
    for (void * p : owned_) {
        backend_->free(p);
    }
    layers.clear();
    owned_.clear();
}

}  // namespace mq
