// A loaded model: its config, tokenizer and weights on one backend. Immutable after load, shared by
// every Context that generates with it.
#pragma once

#include "mq-backend.h"
#include "mq-file.h"
#include "mq-schemes.h"

#include <memory>
#include <string>
#include <vector>

namespace mq {

class Vocab;

struct Config {
    std::string architecture;
    int32_t n_vocab = 0, n_embd = 0, n_ff = 0, n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0;
    int32_t n_ctx_train = 0;
    float rms_eps = 1e-5f;
    RopeParams rope{};
    bool tied_embeddings = false;

    static Config from_json(const Json & j);  // validates; throws naming the bad field
    int32_t q_dim() const { return n_head * head_dim; }
    int32_t kv_dim() const { return n_head_kv * head_dim; }
    int32_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }
};

struct LayerWeights {
    void * attn_norm = nullptr;  // device fp32 [n_embd]
    void * ffn_norm = nullptr;
    Linear attn_qkv, attn_output, ffn_gate_up, ffn_down;
    bool static_w4a4 = false;  // attn_qkv, attn_output, ffn_gate_up (and ffn_down) w4a4: integer codes between the ops
    bool down_codes = false;   // ffn_down too takes codes (else, in a static block, the fp32 SwiGLU output)
    KvScales kv_scales;        // the int8 KV cache's steps (device), null when the file has none
};

struct ModelParams {
    std::string device = "auto";  // "auto" | "cpu" | "cuda" | "cuda:N"
    int32_t n_threads = 0;         // 0: one per core
};

class Model {
public:
    // maps, validates and uploads; throws mq::Error naming the file and the problem
    Model(const std::string & path, const ModelParams & params);
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    const Config & config() const { return config_; }
    const Vocab & vocab() const { return *vocab_; }
    const File & file() const { return *file_; }
    Backend & backend() const { return *backend_; }
    const std::string & quant_method() const { return quant_method_; }
    // whether the file has the int8 KV cache's steps (blk.{i}.attn_k_scale / attn_v_scale)
    bool has_kv_scales() const { return has_kv_scales_; }
    int32_t n_threads() const { return n_threads_; }

    // the embedding (device): fp16 token_embd.weight, or, for a tied model whose output linear is quantized,
    // the output matrix's own codes and scales (docs/format.md, "The output linear")
    EmbedTable embed;
    void * output_norm = nullptr;       // device fp32 [n_embd]
    Linear output;                      // lm_head (the embedding when tied and f16)
    std::vector<LayerWeights> layers;

private:
    void load_linear(Linear & lin, const std::string & name, int64_t n, int64_t k, const Json & quant,
                     LinearInput input);
    void * load_norm(const std::string & name);
    KvScales load_kv_scales(int32_t layer);
    void load_weights(const Json & quant);
    void load_output(const Json & quant);
    void release();

    std::unique_ptr<File> file_;
    Config config_;
    std::unique_ptr<Vocab> vocab_;
    std::unique_ptr<Backend> backend_;
    std::vector<void *> owned_;
    std::string quant_method_;
    bool has_kv_scales_ = false;
    int32_t n_threads_ = 1;
};

int32_t default_thread_count();

}  // namespace mq
