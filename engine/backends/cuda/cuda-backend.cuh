// The CUDA backend's object: one GPU, one stream, the buffers the ops share (scratch, workspaces), the decode
// step's graphs. Its ops are the launchers of the files of their names (rmsnorm.cu, ...), listed in the op table
// of cuda-backend.cu; each scheme's kernels and their LinearKernels entry live in linear-<scheme>.cu.
#pragma once

#include "cuda-common.cuh"
#include "linear-w4a4.cuh"

#include "../../src/mq-backend.h"
#include "../../src/mq-file.h"

#include <cuda_runtime.h>

#include <map>
#include <tuple>

namespace mq {

// device copies of a 4-bit linear's tensors (absent ones stay nullptr): w4a4 has them all, w4a4d qweight and
// scale, w4a16g qweight and its fp16 group scales in `scale`
struct CudaLinear4 {
    void * qweight = nullptr;
    float * scale = nullptr;
    float * in_scale = nullptr;
    int32_t * in_map = nullptr;
    void * lora_a = nullptr;
    void * lora_b = nullptr;
    // the decode GEMV's fused low-rank branch (LoraGemv): l [W4A4_GEMV_MAX_M, rank] and its two counters
    double * lora_l = nullptr;
    unsigned long long * lora_sync = nullptr;
    // as the consumer of a fused gate/up + SwiGLU (made at its first use): its in_map by source channel
    int32_t * swiglu_start = nullptr;
    int4 * swiglu_slots = nullptr;
};

class BackendCuda : public Backend {
public:
    explicit BackendCuda(int32_t device);
    ~BackendCuda() override;

    std::string name() const override { return "cuda"; }
    // a 2048-token prompt in one pass: every pass reads all the weights again, and the int8 / f16 GEMMs reach
    // their speed from a few hundred rows up (docs/engine.md)
    int32_t default_n_batch() const override { return 2048; }
    bool free_device_memory(size_t & bytes) override;
    void * alloc(size_t bytes) override;
    void free(void * p) override;
    void upload(void * dst, const void * src, size_t bytes) override;
    void download(void * dst, const void * src, size_t bytes) override;
    void synchronize() override;
    void run_step(const void * key, const std::function<void()> & record) override;
    void forget_step(const void * key) override;

    // makes this backend's device the calling thread's current one (CUDA's current device is per host thread:
    // a model may be used from a thread other than the one that loaded it); the memory calls and run_step do it
    void bind() const { cuda_bind_device(device_); }
    cudaStream_t stream() const { return stream_; }
    W4A4Mma w4a4_mma() const { return w4a4_mma_; }  // the w4a4 tensor-core path of this device (linear-w4a4.cuh)
    bool exact_codes() const { return exact_codes_; }  // MERGEQUANT_CUDA_EXACT_CODES=1: attention-quant.cuh
    // a device copy of a tensor of the file (nullptr for nullptr)
    void * copy_tensor(const TensorView * t) { return t ? upload_copy(t->data, t->nbytes) : nullptr; }
    // grows a device buffer (the scratch buffer, the workspaces); captured steps that point into the old one are
    // dropped (and captured again at their next call). zero: fill the new buffer with zeros.
    void * grow(void *& buf, size_t & held, size_t bytes, bool zero, const char * what);
    // the shared scratch buffer, at least `bytes` long (valid until the next op that asks for scratch)
    void * scratch_for(size_t bytes) { return grow(scratch_, scratch_bytes_, bytes, false, "scratch buffer"); }
    // the split attention's tickets must start at zero (its kernels leave them so)
    void * attention_workspace_for(size_t bytes) {
        return grow(att_ws_, att_ws_bytes_, bytes, true, "attention workspace");
    }
    void * attention_quant_workspace_for(size_t bytes) {
        return grow(attq_ws_, attq_ws_bytes_, bytes, true, "attention_quant workspace");
    }
    size_t attention_quant_workspace_bytes() const { return attq_ws_bytes_; }
    // [work: n_vocab floats | the picked id | penalty ids] for the sampler, and a pinned int for the id
    void * sample_buffer_for(size_t bytes) { return grow(sample_mem_, sample_bytes_, bytes, false, "sampling buffer"); }
    int32_t * sample_host();
    // the float64 RoPE frequencies of mq-rope.h, uploaded once per configuration
    const double * inv_freq_for(int32_t head_dim, const RopeParams & rp);

private:
    struct Step {
        bool seen = false;  // run eagerly once
        cudaGraphExec_t exec = nullptr;
    };
    int32_t device_;
    cudaStream_t stream_ = nullptr;
    W4A4Mma w4a4_mma_ = W4A4Mma::I8;
    bool exact_codes_ = false;
    void * sample_mem_ = nullptr;
    size_t sample_bytes_ = 0;
    int32_t * sample_host_ = nullptr;  // pinned: the id the sampler picked
    void * attq_ws_ = nullptr;
    size_t attq_ws_bytes_ = 0;
    bool graphs_ = true, capturing_ = false;
    std::map<const void *, Step> steps_;
    void * scratch_ = nullptr;
    size_t scratch_bytes_ = 0;
    void * att_ws_ = nullptr;
    size_t att_ws_bytes_ = 0;
    std::map<std::tuple<int32_t, float, float, float, float, int32_t>, double *> inv_freq_;
};

inline BackendCuda & cuda_of(Backend & be) {
    return static_cast<BackendCuda &>(be);
}

// lin's device tensors (a 4-bit scheme prepared on the CUDA backend); throws naming the linear otherwise
inline const CudaLinear4 & cuda_linear4(const Linear & lin) {
    if (!lin.prepared || lin.scheme == "f16") {
        throw Error("linear '" + lin.name + "': scheme '" + lin.scheme + "' is not a prepared 4-bit linear");
    }
    return *(const CudaLinear4 *) lin.prepared;
}
// copies a 4-bit linear's tensors to the device (prepare of w4a16g, w4a4d, w4a4) and frees them (release)
void cuda_prepare_linear4(Backend & be, Linear & lin);
void cuda_release_linear4(Backend & be, Linear & lin);

// the scheme table's entries, each in linear-<scheme>.cu
extern const LinearKernels cuda_linear_f16_kernels, cuda_linear_w4a16g_kernels, cuda_linear_w4a4d_kernels,
    cuda_linear_w4a4_kernels, cuda_linear_w8a8_kernels, cuda_linear_w8a8s_kernels,
    cuda_linear_w4a8_kernels, cuda_linear_w4a8g_kernels;
// the fused op of the static W4A4 MLP (linear-w4a4.cu)
void cuda_op_linear_codes_swiglu_quant(Backend & be, const Linear & gate_up, const int8_t * a, int32_t m,
                                       const Linear & down, int32_t n_ff, float * gu, int8_t * out);

}  // namespace mq
