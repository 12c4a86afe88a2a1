// The backend interface: device memory, plus the ops of a forward pass dispatched through two tables each backend
// fills once: BackendOps (one function per op: embed, norm -> codes, rope, KV store, attention, SwiGLU, sample)
// and one LinearKernels entry per linear scheme it runs (mq-schemes.h). Each op's code lives in a file of the op's
// name in every backend (engine/backends/cpu/rmsnorm.cpp <-> engine/backends/cuda/rmsnorm.cu; the table in
// docs/architecture.md). The CPU backend is the reference; tests/test_ops.py compares the CPU ops with the
// simulator and runs engine/backends/cuda/test-cuda-ops.cpp, which compares the CUDA ops with the CPU's.
//
// Memory: every pointer passed to an op is device memory obtained from alloc() (host memory for the CPU
// backend). Positions are a device buffer of int32 so a captured decode step (CUDA graph) can be replayed
// with new positions without re-recording.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace mq {

struct TensorView;
struct SamplingParams;
struct Scheme;
struct LinearKernels;
class Backend;

// One linear layer y[M, N] = x[M, K] · Wᵀ in some scheme (docs/format.md, docs/numerics.md). The views
// point into the file mapping (host memory); `prepared` is what the backend made of them (device copy,
// repacked layout), owned by the backend.
struct Linear {
    std::string name;    // file prefix, e.g. "blk.3.attn_qkv"
    std::string scheme;  // a name of mq-schemes.h: "f16", "w4a16g", "w4a4d", "w4a4"
    int64_t n = 0, k = 0;
    int64_t kp = 0;    // 4-bit schemes: input slots (K padded to a multiple of 64, plus split channels)
    int64_t group = 0; // w4a16g, w4a8g: group size along K
    int64_t rank = 0;  // w4a4: rows of the low-rank branch (0: none)
    std::vector<const TensorView *> tensors;  // f16: {weight}
    const TensorView * qweight = nullptr;   // U8 [n, kp/2], two codes a byte, even k in the low nibble (w8a8: I8 [n, k])
    const TensorView * scale = nullptr;     // F32 [n] (w4a4, w4a4d, w8a8, w4a8, w4a8g, w8a8s) or F16 [n, k/group] (w4a16g)
    const TensorView * in_scale = nullptr;  // w4a4, norm-fed: F32 [k], norm weight with 1/step folded in; w8a8s: 1/step
    const TensorView * in_map = nullptr;    // w4a4: I32 [kp, 3] input slot -> (source channel, part, parts)
    const TensorView * lora_a = nullptr;    // w4a4: F16 [rank, kp]
    const TensorView * lora_b = nullptr;    // w4a4: F16 [n, rank]
    const TensorView * gscale = nullptr;    // w4a8g: U8 [n, k/group] integer group scales in [1, 16]
    const TensorView * bias = nullptr;      // w8a8, w4a8, w4a8g: optional F32 [n], added last (w8a8s: required)
    const TensorView * shift = nullptr;     // w8a8s: F32 [k], subtracted from the input before its static codes
    int32_t qmax = 0;  // w8a8, w4a8, w4a8g, w8a8s: codes of the int8 input in [-qmax, qmax] (w8a8, w8a8s: 2^(bits-1) - 1)
    // set by Backend::prepare_linear: the scheme's entry and the backend's kernels for it
    const Scheme * def = nullptr;
    const LinearKernels * kernels = nullptr;
    void * prepared = nullptr;
};

// Element type of the K/V cache (docs/numerics.md): fp16, or int8 codes with static per-channel steps.
enum KvType : int32_t {
    KV_TYPE_F16,
    KV_TYPE_I8,
};

// bytes of one cache element
inline size_t kv_elem_size(KvType t) {
    return t == KV_TYPE_I8 ? 1 : 2;
}

// One layer's int8 cache steps, device fp32 [n_head_kv * head_dim] each: a value x of channel c is stored as
// clamp(rint(x * inv[c]), -127, 127), inv[c] = fp32(1 / scale[c]), and read back as float(code) * scale[c].
// All null for an fp16 cache.
struct KvScales {
    const float * k_scale = nullptr;
    const float * k_inv = nullptr;
    const float * v_scale = nullptr;
    const float * v_inv = nullptr;
};

struct AttentionShape {
    int32_t n_head, n_head_kv, head_dim;
    int32_t n_ctx;                    // rows allocated in each layer's K and V cache
    KvType kv_type = KV_TYPE_F16;     // element type of the caches
};

// The embedding table (device memory), docs/numerics.md "Embedding": fp16 rows, or the rows of the quantized
// output matrix of a tied model, dequantized one row at a time (the file stores that matrix once).
enum EmbedKind : int32_t {
    EMBED_F16,       // data F16 [n_vocab, dim]: out = float(row)
    EMBED_I8_ROW,    // data I8 [n_vocab, dim], scale F32 [n_vocab] (w8a8): out[j] = float(q[j]) * scale[id]
    EMBED_I4_GROUP,  // data U8 [n_vocab, dim/2] packed int4, scale F16 [n_vocab, dim/group] (w4a16g):
                     // out[j] = float(q[j]) * float(scale[id, j / group])
};

struct EmbedTable {
    EmbedKind kind = EMBED_F16;
    const void * data = nullptr;
    const void * scale = nullptr;
    int32_t group = 0;  // EMBED_I4_GROUP: elements per scale
};

struct RopeParams {
    float theta;
    // llama3 scaling (factor == 0: none)
    float factor, low_freq_factor, high_freq_factor;
    int32_t original_max_pos;
};

// One linear scheme's kernels on one backend: an entry of the backend's scheme table. The GEMV/GEMM choice by
// token count is the kernels' own (inside `linear` / `linear_codes`, in the backend's linear-<scheme> file).
struct LinearKernels {
    const char * scheme;  // the Scheme's name
    // this backend's limits beyond the format's (0: none): K a multiple of k_multiple, the group of group_multiple
    int32_t k_multiple, group_multiple;
    void (*prepare)(Backend & be, Linear & lin);  // copy/repack lin's tensors; nullptr: reads the file's as they are
    void (*release)(Backend & be, Linear & lin);  // frees what prepare made (nullptr with prepare)
    // y = x · Wᵀ (accumulate: y += x · Wᵀ), x [m, k] fp32, y [m, n] fp32; schemes that take floats
    void (*linear)(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate);
    // the same on int4 codes a [m, kp] (one per int8): y = float(a · qweightᵀ) * scale (+ low-rank branch);
    // schemes that take codes
    void (*linear_codes)(Backend & be, const Linear & lin, const int8_t * a, int32_t m, float * y, bool accumulate);
    // acc = a · qweightᵀ exact in int32 [m, n], the integer core of the 4-bit schemes (exposed for tests)
    void (*int_gemm)(Backend & be, const Linear & lin, const int8_t * a, int32_t m, int32_t * acc);
};

// The ops of a forward pass on one backend, one function each (the forwarders of Backend document them).
// attention_quant, linear_codes_swiglu_quant, sample and rope_kv_store may be nullptr: the composition of the
// plainer ops (sample: the host samples).
struct BackendOps {
    void (*embed)(Backend &, const EmbedTable & table, const int32_t * ids, int32_t n, int32_t dim, float * out);
    void (*rmsnorm)(Backend &, const float * x, const float * w, int32_t n_rows, int32_t dim, float eps, float * out);
    void (*rmsnorm_quant)(Backend &, const float * x, const Linear & consumer, int32_t m, int32_t dim, float eps,
                          int8_t * out);
    void (*quantize_codes)(Backend &, const float * x, int32_t m, int32_t k, const Linear & consumer, int8_t * out);
    void (*rope)(Backend &, float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                 int32_t head_dim, const int32_t * pos, const RopeParams & rp);
    void (*kv_store)(Backend &, const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                     const int32_t * pos, const KvScales & sc, void * k_cache, void * v_cache);
    void (*attention)(Backend &, const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                      const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache, float * out);
    void (*attention_quant)(Backend &, const float * qkv, int32_t n_tokens, int32_t row_stride,
                            const AttentionShape & s, const int32_t * pos, const KvScales & sc, const void * k_cache,
                            const void * v_cache, float * out, const Linear & consumer, int8_t * codes);
    void (*swiglu)(Backend &, const float * gu, int32_t m, int32_t n_ff, float * out);
    void (*swiglu_quant)(Backend &, const float * gu, const Linear & consumer, int32_t m, int32_t n_ff, int8_t * out);
    void (*linear_codes_swiglu_quant)(Backend &, const Linear & gate_up, const int8_t * a, int32_t m,
                                      const Linear & down, int32_t n_ff, float * gu, int8_t * out);
    int32_t (*sample)(Backend &, const float * logits, int32_t n_vocab, const SamplingParams & sp, double u,
                      const std::vector<int32_t> & penalty_ids);
    void (*rope_kv_store)(Backend &, float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                          const int32_t * pos, const RopeParams & rp, const KvScales & sc, void * k_cache,
                          void * v_cache);
};

class Backend {
public:
    // ops: copied (a backend may clear an optional op for its configuration); kernels: one entry per scheme
    Backend(const BackendOps & ops, const std::vector<LinearKernels> & kernels) : ops_(ops), kernels_(kernels) {}
    virtual ~Backend() = default;
    Backend(const Backend &) = delete;
    Backend & operator=(const Backend &) = delete;
    virtual std::string name() const = 0;
    // tokens per prefill pass where the context does not say (ContextParams::n_batch 0): enough to keep the
    // backend's GEMMs efficient, few enough to bound the scratch memory
    virtual int32_t default_n_batch() const { return 256; }

    // --- device memory -------------------------------------------------------------------------------
    virtual void * alloc(size_t bytes) = 0;
    virtual void free(void * p) = 0;
    virtual void upload(void * dst, const void * src, size_t bytes) = 0;
    virtual void download(void * dst, const void * src, size_t bytes) = 0;
    virtual void synchronize() = 0;
    // a device copy of a host array (norm weights, embeddings); free with free()
    void * upload_copy(const void * src, size_t bytes) {
        void * p = alloc(bytes);
        upload(p, src, bytes);
        return p;
    }

    // --- linears ---------------------------------------------------------------------------------------
    // this backend's kernels for `scheme`, or nullptr
    const LinearKernels * kernels_for(const std::string & scheme) const;
    // binds lin to its scheme and this backend's kernels, checks their limits and prepares it; throws mq::Error
    // naming the linear, the scheme and this backend when the backend lacks the scheme or the shape breaks a limit
    void prepare_linear(Linear & lin);
    void release_linear(Linear & lin);
    // y = x · Wᵀ (accumulate: y += x · Wᵀ); x [M, K] fp32, y [M, N] fp32; schemes with float inputs:
    // f16, w4a16g, w4a4d (per-token dynamic quantization inside)
    void linear(const Linear & lin, const float * x, int32_t m, float * y, bool accumulate);
    // y = float(a · qweightᵀ) * scale (+ low-rank branch); accumulate: y += ...; schemes with code inputs (w4a4)
    void linear_codes(const Linear & lin, const int8_t * a, int32_t m, float * y, bool accumulate);
    // acc = a · qweightᵀ, exact int32 [m, n] (the integer core of the 4-bit schemes, exposed for tests)
    void int_gemm(const Linear & lin, const int8_t * a, int32_t m, int32_t * acc);

    // --- ops ---------------------------------------------------------------------------------------------
    // out[i, :] = row ids[i] of the table as fp32 (EmbedTable gives each kind's arithmetic)
    void embed(const EmbedTable & table, const int32_t * ids, int32_t n, int32_t dim, float * out) {
        ops_.embed(*this, table, ids, n, dim, out);
    }
    // out[i, :] = float(table[ids[i], :]) for an fp16 table [n_vocab, dim]
    void embed_f16(const void * table, const int32_t * ids, int32_t n, int32_t dim, float * out) {
        EmbedTable t;
        t.data = table;
        embed(t, ids, n, dim, out);
    }
    // out = x / sqrt(mean(x²) + eps) * w, row by row
    void rmsnorm(const float * x, const float * w, int32_t n_rows, int32_t dim, float eps, float * out) {
        ops_.rmsnorm(*this, x, w, n_rows, dim, eps, out);
    }
    // rotate q and k in place (HF rotate_half layout); qkv rows are [q heads | k heads | v heads]
    void rope(float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
              const int32_t * pos, const RopeParams & rp) {
        ops_.rope(*this, qkv, n_tokens, row_stride, n_head, n_head_kv, head_dim, pos, rp);
    }
    // write k and v of each token to the layer's caches at pos[i], as s.kv_type (int8: with the steps sc)
    void kv_store(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                  const int32_t * pos, const KvScales & sc, void * k_cache, void * v_cache) {
        ops_.kv_store(*this, qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache);
    }
    // rope, then kv_store (a backend may do both in one pass: the same values and cache bytes)
    void rope_kv_store(float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s, const int32_t * pos,
                       const RopeParams & rp, const KvScales & sc, void * k_cache, void * v_cache);
    // causal attention of each token i over cache rows [0, pos[i]]; out [n_tokens, n_head*head_dim]
    void attention(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                   const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache, float * out) {
        ops_.attention(*this, qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache, out);
    }
    // out[m, j] = silu(gu[m, j]) * gu[m, n_ff + j]
    void swiglu(const float * gu, int32_t m, int32_t n_ff, float * out) { ops_.swiglu(*this, gu, m, n_ff, out); }

    // --- static W4A4 (docs/numerics.md): int4 codes, one per int8, flow between these ops ---------
    // fused RMSNorm + static quantization into `consumer`'s input slots: z_j = (x_j * r) * in_scale[j]
    void rmsnorm_quant(const float * x, const Linear & consumer, int32_t m, int32_t dim, float eps, int8_t * out) {
        ops_.rmsnorm_quant(*this, x, consumer, m, dim, eps, out);
    }
    // codes = clamp(rint(x), -8, 7) for the k channels of each row, 0 up to consumer.kp
    void quantize_codes(const float * x, int32_t m, int32_t k, const Linear & consumer, int8_t * out) {
        ops_.quantize_codes(*this, x, m, k, consumer, out);
    }
    // attention (into out) and its output rounded to `consumer`'s codes as quantize_codes does, the codes
    // those of the exact arithmetic of docs/numerics.md (a backend whose attention computes it otherwise
    // mends the codes near a rounding boundary); without the op: attention() then quantize_codes()
    void attention_quant(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                         const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache,
                         float * out, const Linear & consumer, int8_t * codes);
    // z_j = silu(g_j) * u_j into `consumer`'s input slots
    void swiglu_quant(const float * gu, const Linear & consumer, int32_t m, int32_t n_ff, int8_t * out) {
        ops_.swiglu_quant(*this, gu, consumer, m, n_ff, out);
    }
    // the static W4A4 MLP's middle: linear_codes(gate_up) into gu [m, 2·n_ff] (scratch), then swiglu_quant into
    // `down`'s codes `out` (a buffer other than a); a backend may fuse them and skip gu
    void linear_codes_swiglu_quant(const Linear & gate_up, const int8_t * a, int32_t m, const Linear & down,
                                   int32_t n_ff, float * gu, int8_t * out);
    // the unfused forms of the two optional ops (a backend's op falls back on them where it does not apply)
    void attention_then_quantize(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                                 const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache,
                                 float * out, const Linear & consumer, int8_t * codes);
    void linear_codes_then_swiglu_quant(const Linear & gate_up, const int8_t * a, int32_t m, const Linear & down,
                                        int32_t n_ff, float * gu, int8_t * out);

    // --- sampling on the device (optional) -------------------------------------------------------------
    // With a sample op, sample() picks the next token from the logits row `logits` [n_vocab] (device memory)
    // by mq::Sampler's rules (mq-sampling.h) with the uniform draw u, penalizing `penalty_ids` (host memory,
    // distinct ids; used when the repetition penalty is not 1). It returns -1 where it cannot decide exactly on
    // the device; the caller then samples on the host with the same draw. Only the token id crosses to the host.
    bool samples_on_device() const { return ops_.sample != nullptr; }
    int32_t sample(const float * logits, int32_t n_vocab, const SamplingParams & sp, double u,
                   const std::vector<int32_t> & penalty_ids) {
        return ops_.sample ? ops_.sample(*this, logits, n_vocab, sp, u, penalty_ids) : -1;
    }

    // --- whole-step replay (the decode step) ----------------------------------------------------------
    // Runs the ops that record() issues. A backend may capture them on a first call for `key` and replay
    // that capture on later calls with the same key instead of calling record() again: record() must then
    // issue the same ops on the same buffers every time, with everything that varies (ids, positions)
    // read from device memory. The default runs record() each time.
    virtual void run_step(const void * key, const std::function<void()> & record) {
        (void) key;
        record();
    }
    // drops what run_step kept for `key` (its owner is going away)
    virtual void forget_step(const void * key) { (void) key; }

    // --- memory (optional) -----------------------------------------------------------------------------
    // a device backend sets `bytes` to its free device memory and returns true (mq-memory.h plans with it);
    // the default (host memory) returns false and the planner reads the host's figures itself
    virtual bool free_device_memory(size_t & bytes) {
        (void) bytes;
        return false;
    }

protected:
    BackendOps ops_;

private:
    const std::vector<LinearKernels> & kernels_;
};

std::unique_ptr<Backend> backend_cpu_create(int32_t n_threads);
// nullptr with a reason in `why` when the CUDA backend is not built in or no usable GPU is present
std::unique_ptr<Backend> backend_cuda_create(int32_t device, std::string & why);
bool backend_cuda_built();

}  // namespace mq
