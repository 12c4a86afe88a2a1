// The CUDA backend: the ops of mq-backend.h on one GPU, every launch on the backend's own stream.
// fp32 activations, fp16 or int8 KV cache, int4 codes one per int8 between the static W4A4 ops (docs/numerics.md);
// weights uploaded once by prepare_linear, in the file's layout. Each op
// lives in its own op.cu with a header declaring its launcher; this file glues them to the interface.
// Decode steps are captured in a CUDA graph per context and replayed (run_step); MERGEQUANT_CUDA_GRAPHS=0
// turns that off (every step launched op by op), for comparisons.
#include "attention-quant.cuh"
#include "attention.cuh"
#include "cuda-common.cuh"
#include "embed.cuh"
#include "kv-store.cuh"
#include "linear-f16.cuh"
#include "linear-w4a16g.cuh"
#include "linear-w4a4.cuh"
#include "quantize.cuh"
#include "rmsnorm.cuh"
#include "rope.cuh"
#include "sampling.cuh"
#include "swiglu.cuh"

#include "../../src/mq-backend.h"
#include "../../src/mq-file.h"
#include "../../src/mq-sampling.h"
#include "../cpu/cpu-ops.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

namespace mq {

int cuda_pdl_mode() {
    static const int mode = [] {
        int dev = 0, major = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9) {
            return 0;
        }
        const char * env = std::getenv("MERGEQUANT_CUDA_PDL");
        return env && *env ? std::max(0, std::min(2, std::atoi(env))) : 2;
    }();
    return mode;
}

class BackendCuda : public Backend {
public:
    explicit BackendCuda(int32_t device) : device_(device) {
        cuda_check(cudaSetDevice(device), "cudaSetDevice");
        cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
        const char * env = std::getenv("MERGEQUANT_CUDA_GRAPHS");
        graphs_ = !(env && std::strcmp(env, "0") == 0);
        w4a4_mma_ = cuda_w4a4_mma_default();
        const char * smp = std::getenv("MERGEQUANT_CUDA_SAMPLING");
        device_sampling_ = !(smp && std::strcmp(smp, "0") == 0);
        const char * exact = std::getenv("MERGEQUANT_CUDA_EXACT_CODES");
        exact_codes_ = exact && std::strcmp(exact, "1") == 0;
    }
    ~BackendCuda() override {
        for (auto & kv : steps_) if (kv.second.exec) cudaGraphExecDestroy(kv.second.exec);
        for (auto & kv : inv_freq_) cudaFree(kv.second);
        if (scratch_) cudaFree(scratch_);
        if (att_ws_) cudaFree(att_ws_);
        if (sample_mem_) cudaFree(sample_mem_);
        if (attq_ws_) cudaFree(attq_ws_);
        if (sample_host_) cudaFreeHost(sample_host_);
        cudaStreamDestroy(stream_);
    }

    std::string name() const override { return "cuda"; }

    bool free_device_memory(size_t & bytes) override {
        size_t total = 0;
        return cudaSetDevice(device_) == cudaSuccess && cudaMemGetInfo(&bytes, &total) == cudaSuccess;
    }

    void * alloc(size_t bytes) override {
        void * p = nullptr;
        const cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 256));
        if (err != cudaSuccess) {
            throw Error("CUDA: out of device memory allocating " + std::to_string(bytes) + " bytes (" +
                        cudaGetErrorString(err) + ")");
        }
        return p;
    }
    void free(void * p) override { cuda_check(cudaFree(p), "cudaFree"); }
    void upload(void * dst, const void * src, size_t bytes) override {
        cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "upload (cudaMemcpyAsync)");
        cuda_check(cudaStreamSynchronize(stream_), "upload (synchronize)");
    }
    void download(void * dst, const void * src, size_t bytes) override {
        cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "download (cudaMemcpyAsync)");
        cuda_check(cudaStreamSynchronize(stream_), "download (synchronize)");
    }
    void synchronize() override { cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

    // device copies of a 4-bit linear's tensors (absent ones stay nullptr): w4a4 has them all, w4a4d
    // qweight and scale, w4a16g qweight and its fp16 group scales in `scale`
    struct W4A4 {
        void * qweight = nullptr;
        float * scale = nullptr;
        float * in_scale = nullptr;
        int32_t * in_map = nullptr;
        void * lora_a = nullptr;
        void * lora_b = nullptr;
        // the decode GEMV's fused low-rank branch (LoraGemv): l [W4A4_GEMV_MAX_M, rank] and its two counters
        double * lora_l = nullptr;
        unsigned * lora_sync = nullptr;
        // as the consumer of a fused gate/up + SwiGLU (made at its first use): its in_map by source channel
        int32_t * swiglu_start = nullptr;
        int4 * swiglu_slots = nullptr;
    };

    void prepare_linear(Linear & lin) override {
        auto copy = [&](const TensorView * t) { return t ? upload_copy(t->data, t->nbytes) : nullptr; };
        if (lin.scheme == "w4a16g" || lin.scheme == "w4a4d") {
            const bool g = lin.scheme == "w4a16g";
            if (!lin.qweight || !lin.scale || (g ? lin.k % 64 != 0 || lin.group % 64 != 0 : lin.kp % 64 != 0)) {
                throw Error("linear '" + lin.name + "': " + lin.scheme + " needs qweight, scale and " +
                            (g ? "K and the group size multiples of 64 (K = " + std::to_string(lin.k) + ", group = " +
                                     std::to_string(lin.group) + ")"
                               : "kp % 64 == 0 (kp = " + std::to_string(lin.kp) + ")"));
            }
            W4A4 * p = new W4A4();
            p->qweight = copy(lin.qweight);
            p->scale = (float *) copy(lin.scale);
            lin.prepared = p;
            return;
        }
        if (lin.scheme == "w4a4") {
            if (!lin.qweight || !lin.scale || lin.kp % 64 != 0 || (lin.rank > 0 && (!lin.lora_a || !lin.lora_b))) {
                throw Error("linear '" + lin.name + "': w4a4 needs qweight, scale (and lora_a/lora_b when rank > 0) "
                            "and kp % 64 == 0 (kp = " + std::to_string(lin.kp) + ")");
            }
            W4A4 * p = new W4A4();
            p->qweight = copy(lin.qweight);
            p->scale = (float *) copy(lin.scale);
            p->in_scale = (float *) copy(lin.in_scale);
            p->in_map = (int32_t *) copy(lin.in_map);
            if (lin.rank > 0) {
                p->lora_a = copy(lin.lora_a);
                p->lora_b = copy(lin.lora_b);
                p->lora_l = (double *) alloc((size_t) W4A4_GEMV_MAX_M * lin.rank * sizeof(double));
                p->lora_sync = (unsigned *) alloc(2 * sizeof(unsigned));
                cuda_check(cudaMemsetAsync(p->lora_sync, 0, 2 * sizeof(unsigned), stream_), "cudaMemsetAsync (low-rank counters)");
            }
            lin.prepared = p;
            return;
        }
        if (lin.scheme == "f16") {
            if (lin.tensors.size() != 1 || lin.k % 8 != 0) {
                throw Error("linear '" + lin.name + "': the CUDA f16 linear needs one weight tensor and K % 8 == 0 (K = " +
                            std::to_string(lin.k) + ")");
            }
            lin.prepared = upload_copy(lin.tensors[0]->data, lin.tensors[0]->nbytes);
            return;
        }
        throw Error("linear '" + lin.name + "': the CUDA backend does not support scheme '" + lin.scheme +
                    "' (f16, w4a16g, w4a4d and w4a4 are supported)");
    }
    void release_linear(Linear & lin) override {
        if (!lin.prepared) return;
        if (lin.scheme != "f16") {
            W4A4 * p = (W4A4 *) lin.prepared;
            for (void * d : {p->qweight, (void *) p->scale, (void *) p->in_scale, (void *) p->in_map, p->lora_a, p->lora_b,
                             (void *) p->lora_l, (void *) p->lora_sync, (void *) p->swiglu_start, (void *) p->swiglu_slots}) {
                if (d) free(d);
            }
            delete p;
        } else {
            free(lin.prepared);
        }
        lin.prepared = nullptr;
    }
    void * upload_copy(const void * src, size_t bytes) override {
        void * p = alloc(bytes);
        upload(p, src, bytes);
        return p;
    }

    void embed_f16(const void * table, const int32_t * ids, int32_t n, int32_t dim, float * out) override {
        cuda_embed_f16(table, ids, n, dim, out, stream_);
    }
    void rmsnorm(const float * x, const float * w, int32_t n_rows, int32_t dim, float eps, float * out) override {
        cuda_rmsnorm(x, w, n_rows, dim, eps, out, stream_);
    }
    void linear(const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) override {
        if (!lin.prepared) throw Error("linear '" + lin.name + "' was not prepared on the CUDA backend");
        if (lin.scheme == "f16") {
            void * scratch = scratch_for(cuda_linear_f16_scratch(m, lin.k));
            cuda_linear_f16(lin.prepared, lin.n, lin.k, x, m, y, accumulate, scratch, stream_);
        } else if (lin.scheme == "w4a16g") {
            const W4A4 & p = *(const W4A4 *) lin.prepared;
            void * scratch = scratch_for(cuda_linear_w4a16g_scratch(m, lin.n, lin.k));
            cuda_linear_w4a16g(p.qweight, p.scale, lin.n, lin.k, lin.group, x, m, y, accumulate, scratch, stream_);
        } else if (lin.scheme == "w4a4d") {
            // per-token codes and steps, then the w4a4 GEMV/GEMM with the step in its epilogue:
            // y = (float(acc) · scale[n]) · step[t]
            const W4A4 & p = *(const W4A4 *) lin.prepared;
            const size_t packed_bytes = ((size_t) m * lin.kp / 2 + 255) / 256 * 256;
            uint8_t * packed = (uint8_t *) scratch_for(packed_bytes + (size_t) m * sizeof(float));
            float * step = (float *) (packed + packed_bytes);
            cuda_quantize_dynamic(x, m, (int32_t) lin.k, lin.kp, packed, step, stream_);
            cuda_linear_w4a4(p.qweight, p.scale, nullptr, step, lin.n, lin.kp, packed, false, m, y, accumulate, w4a4_mma_,
                             stream_);
        } else {
            throw Error("linear '" + lin.name + "': scheme '" + lin.scheme + "' takes integer codes, not floats "
                        "(it goes through linear_codes)");
        }
    }
    void rope(float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
              const int32_t * pos, const RopeParams & rp) override {
        cuda_rope(qkv, n_tokens, row_stride, n_head, n_head_kv, head_dim, pos, inv_freq_for(head_dim, rp), stream_);
    }
    void kv_store(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s, const int32_t * pos,
                  const KvScales & sc, void * k_cache, void * v_cache) override {
        const KvScales k = kv_scales_of(s, sc);
        cuda_kv_store(qkv, n_tokens, row_stride, s.n_head * s.head_dim, s.n_head_kv * s.head_dim, pos, k.k_inv, k.v_inv,
                      k_cache, v_cache, stream_);
    }
    void attention(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s, const int32_t * pos,
                   const KvScales & sc, const void * k_cache, const void * v_cache, float * out) override {
        const KvScales k = kv_scales_of(s, sc);
        void * ws = attention_workspace_for(cuda_attention_workspace(n_tokens, s.n_head, s.head_dim, s.n_ctx));
        cuda_attention(qkv, n_tokens, row_stride, s.n_head, s.n_head_kv, s.head_dim, s.n_ctx, pos, k_cache, v_cache,
                       k.k_scale, k.v_scale, ws, out, stream_);
    }
    void attention_quant(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                         const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache, float * out,
                         const Linear & c, int8_t * codes) override {
        if (!exact_codes_) {  // the default: the fp32 attention's codes (within the tolerances of docs/numerics.md)
            Backend::attention_quant(qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache, out, c, codes);
            return;
        }
        attention(qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache, out);
        const KvScales k = kv_scales_of(s, sc);
        void * ws = grow(attq_ws_, attq_ws_bytes_, cuda_attention_quant_workspace(n_tokens, s.n_head), true,
                         "attention_quant workspace");
        cuda_attention_quant(out, qkv, n_tokens, row_stride, s.n_head, s.n_head_kv, s.head_dim, pos, k_cache, v_cache,
                             k.k_scale, k.v_scale, c.kp, ws, attq_ws_bytes_, codes, stream_);
    }
    void swiglu(const float * gu, int32_t m, int32_t n_ff, float * out) override {
        cuda_swiglu(gu, m, n_ff, out, stream_);
    }

    void rmsnorm_quant(const float * x, const Linear & c, int32_t m, int32_t dim, float eps, int8_t * out) override {
        const W4A4 & p = w4a4_of(c);
        if (!p.in_scale || !p.in_map) {
            throw Error("linear '" + c.name + "': rmsnorm_quant needs the consumer's in_scale and in_map");
        }
        cuda_rmsnorm_quant(x, p.in_scale, p.in_map, m, dim, c.kp, eps, out, stream_);
    }
    void quantize_codes(const float * x, int32_t m, int32_t k, const Linear & c, int8_t * out) override {
        cuda_quantize_codes(x, m, k, c.kp, out, stream_);
    }
    void swiglu_quant(const float * gu, const Linear & c, int32_t m, int32_t n_ff, int8_t * out) override {
        const W4A4 & p = w4a4_of(c);
        if (!p.in_map) throw Error("linear '" + c.name + "': swiglu_quant needs the consumer's in_map");
        cuda_swiglu_quant(gu, p.in_map, m, n_ff, c.kp, out, stream_);
    }
    void int_gemm(const Linear & lin, const int8_t * a, int32_t m, int32_t * acc) override {
        const W4A4 & p = w4a4_of(lin);
        uint8_t * packed = (uint8_t *) scratch_for((size_t) m * lin.kp / 2);
        cuda_pack_codes(a, m, lin.kp, packed, stream_);
        cuda_int_gemm(p.qweight, lin.n, lin.kp, packed, m, acc, stream_);
    }
    // the GEMV (decode) reads the int8 codes as they are and computes the low-rank branch inside (LoraGemv); the
    // GEMM reads packed codes, made by a pack pass (m·kp bytes, small next to the weights), and adds the branch
    // computed before it (cuda_lora) in its epilogue
    void linear_codes(const Linear & lin, const int8_t * a, int32_t m, float * y, bool accumulate) override {
        const W4A4 & p = w4a4_of(lin);
        if (m <= W4A4_GEMV_MAX_M) {
            cuda_linear_w4a4(p.qweight, p.scale, nullptr, nullptr, lin.n, lin.kp, a, true, m, y, accumulate, w4a4_mma_,
                             stream_, lora_gemv_of(lin));
            return;
        }
        const size_t packed_bytes = ((size_t) m * lin.kp / 2 + 255) / 256 * 256;
        float * lora = nullptr;
        uint8_t * packed = (uint8_t *) scratch_with_lora(lin, a, m, packed_bytes, lora);
        cuda_pack_codes(a, m, lin.kp, packed, stream_);
        cuda_linear_w4a4(p.qweight, p.scale, lora, nullptr, lin.n, lin.kp, packed, false, m, y, accumulate, w4a4_mma_,
                         stream_);
    }
    // at decode sizes the gate/up GEMV's epilogue computes SwiGLU and writes down_proj's codes (no gu round trip,
    // one launch fewer); prefill sizes take the two ops
    void linear_codes_swiglu_quant(const Linear & gate_up, const int8_t * a, int32_t m, const Linear & down, int32_t n_ff,
                                   float * gu, int8_t * out) override {
        if (m > W4A4_GEMV_MAX_M || n_ff % 8 != 0 || gate_up.n != 2 * (int64_t) n_ff) {
            Backend::linear_codes_swiglu_quant(gate_up, a, m, down, n_ff, gu, out);
            return;
        }
        const W4A4 & p = w4a4_of(gate_up);
        W4A4 & dp = const_cast<W4A4 &>(w4a4_of(down));  // the map is made once, at the first (eager) call
        if (!dp.swiglu_start) build_swiglu_map(down, n_ff, dp);
        SwigluOut so;
        so.start = dp.swiglu_start, so.slots = dp.swiglu_slots, so.out = out, so.kp = down.kp, so.n_ff = n_ff;
        cuda_linear_w4a4_swiglu(p.qweight, p.scale, nullptr, gate_up.kp, a, m, so, w4a4_mma_, stream_, lora_gemv_of(gate_up));
    }

    // First call per key: run the ops eagerly, so one-time work (scratch growth, kernel attributes) happens
    // outside a capture. Second call: capture them into a graph and launch it. Later calls: launch it. The
    // graph holds the buffer pointers of the capture, so it is dropped when the scratch buffer moves.
    void run_step(const void * key, const std::function<void()> & record) override {
        if (!graphs_) {
            record();
            return;
        }
        Step & s = steps_[key];
        if (!s.exec && !s.seen) {
            s.seen = true;
            record();
            return;
        }
        if (!s.exec) {
            cuda_check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
            capturing_ = true;
            try {
                record();
            } catch (...) {
                capturing_ = false;
                cudaGraph_t g = nullptr;
                cudaStreamEndCapture(stream_, &g);
                if (g) cudaGraphDestroy(g);
                cudaGetLastError();  // the failed capture's error is the one thrown
                throw;
            }
            capturing_ = false;
            cudaGraph_t g = nullptr;
            cuda_check(cudaStreamEndCapture(stream_, &g), "cudaStreamEndCapture (decode step)");
            const cudaError_t err = cudaGraphInstantiate(&s.exec, g, 0);
            cudaGraphDestroy(g);
            cuda_check(err, "cudaGraphInstantiate (decode step)");
        }
        cuda_check(cudaGraphLaunch(s.exec, stream_), "cudaGraphLaunch (decode step)");
    }
    // MERGEQUANT_CUDA_SAMPLING=0 samples on the host instead (for comparisons)
    bool samples_on_device() const override { return device_sampling_; }
    int32_t sample(const float * logits, int32_t n_vocab, const SamplingParams & sp, double u,
                   const std::vector<int32_t> & penalty_ids) override {
        // [work: n_vocab floats | the picked id | penalty ids]
        const size_t work_bytes = ((size_t) n_vocab * sizeof(float) + 255) / 256 * 256;
        const size_t n_pen = sp.repetition_penalty != 1.0f ? penalty_ids.size() : 0;
        uint8_t * mem = (uint8_t *) grow(sample_mem_, sample_bytes_, work_bytes + 256 + n_pen * sizeof(int32_t), false,
                                         "sampling buffer");
        int32_t * out = (int32_t *) (mem + work_bytes), * pen = (int32_t *) (mem + work_bytes + 256);
        if (!sample_host_) cuda_check(cudaMallocHost(&sample_host_, sizeof(int32_t)), "cudaMallocHost");
        if (n_pen > 0) {
            cuda_check(cudaMemcpyAsync(pen, penalty_ids.data(), n_pen * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
                       "cudaMemcpyAsync (penalty ids)");
        }
        cuda_sample(logits, n_vocab, sp, u, pen, (int32_t) n_pen, (float *) mem, out, stream_);
        cuda_check(cudaMemcpyAsync(sample_host_, out, sizeof(int32_t), cudaMemcpyDeviceToHost, stream_),
                   "cudaMemcpyAsync (sampled id)");
        synchronize();
        return *sample_host_;
    }

    void forget_step(const void * key) override {
        auto it = steps_.find(key);
        if (it == steps_.end()) return;
        if (it->second.exec) cudaGraphExecDestroy(it->second.exec);
        steps_.erase(it);
    }

private:
    // the launchers take an int8 cache where the steps are given, fp16 where they are null
    static KvScales kv_scales_of(const AttentionShape & s, const KvScales & sc) {
        if (s.kv_type != KV_TYPE_I8) return KvScales();
        if (!sc.k_scale || !sc.k_inv || !sc.v_scale || !sc.v_inv) {
            throw Error("CUDA: the int8 KV cache needs the steps of k and of v and their inverses");
        }
        return sc;
    }
    const W4A4 & w4a4_of(const Linear & lin) const {
        if (lin.scheme != "w4a4" || !lin.prepared) {
            throw Error("linear '" + lin.name + "': scheme '" + lin.scheme + "' is not a prepared w4a4 linear");
        }
        return *(const W4A4 *) lin.prepared;
    }
    // grows a device buffer (the scratch buffer, the attention workspace); captured steps that point into
    // the old one are dropped (and captured again at their next call). zero: fill the new buffer with zeros.
    void * grow(void *& buf, size_t & held, size_t bytes, bool zero, const char * what) {
        if (bytes == 0) return nullptr;
        if (bytes > held) {
            if (capturing_) {
                throw Error(std::string("CUDA: the ") + what + " would grow inside a captured decode step (" +
                            std::to_string(bytes) + " bytes asked, " + std::to_string(held) + " held)");
            }
            synchronize();
            for (auto & kv : steps_) {
                if (kv.second.exec) cudaGraphExecDestroy(kv.second.exec);
                kv.second.exec = nullptr;
            }
            if (buf) free(buf);
            buf = alloc(bytes);
            held = bytes;
            if (zero) {
                cuda_check(cudaMemsetAsync(buf, 0, bytes, stream_), "cudaMemsetAsync (attention workspace)");
            }
        }
        return buf;
    }
    void * scratch_for(size_t bytes) { return grow(scratch_, scratch_bytes_, bytes, false, "scratch buffer"); }
    // the decode GEMV's low-rank branch of lin (rank 0: none)
    LoraGemv lora_gemv_of(const Linear & lin) const {
        LoraGemv lo;
        if (lin.rank <= 0) return lo;
        const W4A4 & p = w4a4_of(lin);
        lo.a = p.lora_a, lo.b = p.lora_b, lo.l = p.lora_l, lo.sync = p.lora_sync, lo.rank = (int32_t) lin.rank;
        return lo;
    }
    // scratch of `bytes` (a multiple of 256) followed by the low-rank branch of lin on codes a, computed into it
    // (lora = nullptr without one)
    void * scratch_with_lora(const Linear & lin, const int8_t * a, int32_t m, size_t bytes, float *& lora) {
        const size_t lora_bytes = lin.rank > 0 ? (size_t) m * (lin.rank * sizeof(double) + lin.n * sizeof(float)) : 0;
        uint8_t * buf = (uint8_t *) scratch_for(bytes + lora_bytes);
        lora = nullptr;
        if (lin.rank > 0) {
            const W4A4 & p = w4a4_of(lin);
            double * l = (double *) (buf + bytes);
            lora = (float *) (l + (size_t) m * lin.rank);
            cuda_lora(p.lora_a, p.lora_b, lin.rank, lin.n, lin.kp, a, m, l, lora, stream_);
        }
        return buf;
    }
    // down_proj's in_map by source channel for the fused SwiGLU epilogue (SwigluOut); padding slots go with the
    // last channel, parts 0
    void build_swiglu_map(const Linear & down, int32_t n_ff, W4A4 & dp) {
        if (!down.in_map) throw Error("linear '" + down.name + "': the fused SwiGLU needs its in_map");
        const int32_t * im = down.in_map->as<int32_t>();
        std::vector<std::vector<int4>> by(n_ff);
        for (int64_t s = 0; s < down.kp; s++) {
            const int32_t j = im[3 * s], k = im[3 * s + 1], parts = im[3 * s + 2];
            if (j >= n_ff) throw Error("linear '" + down.name + "': in_map slot " + std::to_string(s) + " reads channel " +
                                       std::to_string(j) + " of " + std::to_string(n_ff));
            by[j >= 0 ? j : n_ff - 1].push_back(make_int4((int) s, j >= 0 ? k : 0, j >= 0 ? parts : 0, 0));
        }
        std::vector<int32_t> start(n_ff + 1, 0);
        std::vector<int4> slots;
        for (int32_t j = 0; j < n_ff; j++) {
            slots.insert(slots.end(), by[j].begin(), by[j].end());
            start[j + 1] = (int32_t) slots.size();
        }
        dp.swiglu_start = (int32_t *) upload_copy(start.data(), start.size() * sizeof(int32_t));
        dp.swiglu_slots = (int4 *) upload_copy(slots.data(), slots.size() * sizeof(int4));
    }
    // the split attention's tickets must start at zero (its kernels leave them so)
    void * attention_workspace_for(size_t bytes) {
        return grow(att_ws_, att_ws_bytes_, bytes, true, "attention workspace");
    }
    // the float64 RoPE frequencies of the CPU backend (rope_inv_freq), uploaded once per configuration
    const double * inv_freq_for(int32_t head_dim, const RopeParams & rp) {
        const auto key = std::make_tuple(head_dim, rp.theta, rp.factor, rp.low_freq_factor, rp.high_freq_factor,
                                         rp.original_max_pos);
        auto it = inv_freq_.find(key);
        if (it != inv_freq_.end()) return it->second;
        std::vector<double> f(head_dim / 2);
        for (int32_t i = 0; i < head_dim / 2; i++) f[i] = rope_inv_freq(i, head_dim, rp);
        double * d = (double *) upload_copy(f.data(), f.size() * sizeof(double));
        inv_freq_[key] = d;
        return d;
    }

    struct Step {
        bool seen = false;  // run eagerly once
        cudaGraphExec_t exec = nullptr;
    };
    int32_t device_;
    cudaStream_t stream_ = nullptr;
    W4A4Mma w4a4_mma_ = W4A4Mma::I8;  // the w4a4 tensor-core path of this device (linear-w4a4.cuh)
    bool device_sampling_ = true, exact_codes_ = false;  // MERGEQUANT_CUDA_EXACT_CODES=1: attention_quant.cuh
    void * sample_mem_ = nullptr;
    void * attq_ws_ = nullptr;
    size_t attq_ws_bytes_ = 0;
    size_t sample_bytes_ = 0;
    int32_t * sample_host_ = nullptr;  // pinned: the id the sampler picked
    bool graphs_ = true, capturing_ = false;
    std::map<const void *, Step> steps_;
    void * scratch_ = nullptr;
    size_t scratch_bytes_ = 0;
    void * att_ws_ = nullptr;
    size_t att_ws_bytes_ = 0;
    std::map<std::tuple<int32_t, float, float, float, float, int32_t>, double *> inv_freq_;
};

bool backend_cuda_built() { return true; }

std::unique_ptr<Backend> backend_cuda_create(int32_t device, std::string & why) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        why = err != cudaSuccess ? std::string("no usable CUDA device (") + cudaGetErrorString(err) + ")"
                                 : std::string("no CUDA device found");
        cudaGetLastError();  // clear the sticky error of a failed query
        return nullptr;
    }
    if (device < 0 || device >= count) {
        why = "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " present)";
        return nullptr;
    }
    cudaDeviceProp prop;
    cuda_check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    if (prop.major < 8) {
        why = std::string("CUDA device ") + prop.name + " is sm_" + std::to_string(prop.major * 10 + prop.minor) +
              "; the CUDA backend needs sm_80 or newer (mma.sync tensor-core kernels)";
        return nullptr;
    }
    try {
        return std::unique_ptr<Backend>(new BackendCuda(device));
    } catch (const Error & e) {
        why = e.what();
        return nullptr;
    }
}

}  // namespace mq
