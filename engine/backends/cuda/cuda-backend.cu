// The CUDA backend: the ops of mq-backend.h on one GPU, every launch on the backend's own stream.
// fp32 activations, fp16 or int8 KV cache, int4 codes one per int8 between the static W4A4 ops (docs/numerics.md);
// weights uploaded once by each scheme's prepare, in the file's layout. Each op lives in its own <op>.cu with a
// header declaring its launcher; this file holds the backend object (cuda-backend.cuh) and its two tables: the
// ops, glued to their launchers, and the scheme kernels (linear-<scheme>.cu).
// Decode steps are captured in a CUDA graph per context and replayed (run_step); MERGEQUANT_CUDA_GRAPHS=0
// turns that off (every step launched op by op), for comparisons.
#include "cuda-backend.cuh"

#include "attention-quant.cuh"
#include "attention.cuh"
#include "embed.cuh"
#include "kv-store.cuh"
#include "quantize.cuh"
#include "rmsnorm.cuh"
#include "rope.cuh"
#include "sampling.cuh"
#include "swiglu.cuh"

#include "../../src/mq-rope.h"
#include "../../src/mq-sampling.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
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

// the launchers take an int8 cache where the steps are given, fp16 where they are null
static KvScales kv_scales_of(const AttentionShape & s, const KvScales & sc) {
    if (s.kv_type != KV_TYPE_I8) return KvScales();
    if (!sc.k_scale || !sc.k_inv || !sc.v_scale || !sc.v_inv) {
        throw Error("CUDA: the int8 KV cache needs the steps of k and of v and their inverses");
    }
    return sc;
}

// --- the ops: each the launcher of the file of its name ------------------------------------------------------

static void op_embed(Backend & be, const EmbedTable & table, const int32_t * ids, int32_t n, int32_t dim, float * out) {
    cuda_embed(table, ids, n, dim, out, cuda_of(be).stream());
}

static void op_rmsnorm(Backend & be, const float * x, const float * w, int32_t n_rows, int32_t dim, float eps,
                       float * out) {
    cuda_rmsnorm(x, w, n_rows, dim, eps, out, cuda_of(be).stream());
}

static void op_rmsnorm_quant(Backend & be, const float * x, const Linear & c, int32_t m, int32_t dim, float eps,
                             int8_t * out) {
    const CudaLinear4 & p = cuda_linear4(c);
    if (!p.in_scale || !p.in_map) {
        throw Error("linear '" + c.name + "': rmsnorm_quant needs the consumer's in_scale and in_map");
    }
    cuda_rmsnorm_quant(x, p.in_scale, p.in_map, m, dim, c.kp, eps, out, cuda_of(be).stream());
}

static void op_quantize_codes(Backend & be, const float * x, int32_t m, int32_t k, const Linear & c, int8_t * out) {
    cuda_quantize_codes(x, m, k, c.kp, out, cuda_of(be).stream());
}

static void op_rope(Backend & be, float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv,
                    int32_t head_dim, const int32_t * pos, const RopeParams & rp) {
    BackendCuda & b = cuda_of(be);
    cuda_rope(qkv, n_tokens, row_stride, n_head, n_head_kv, head_dim, pos, b.inv_freq_for(head_dim, rp), b.stream());
}

static void op_kv_store(Backend & be, const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                        const int32_t * pos, const KvScales & sc, void * k_cache, void * v_cache) {
    const KvScales k = kv_scales_of(s, sc);
    cuda_kv_store(qkv, n_tokens, row_stride, s.n_head * s.head_dim, s.n_head_kv * s.head_dim, pos, k.k_inv, k.v_inv,
                  k_cache, v_cache, cuda_of(be).stream());
}

static void op_rope_kv_store(Backend & be, float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                             const int32_t * pos, const RopeParams & rp, const KvScales & sc, void * k_cache,
                             void * v_cache) {
    BackendCuda & b = cuda_of(be);
    const KvScales k = kv_scales_of(s, sc);
    cuda_rope_kv_store(qkv, n_tokens, row_stride, s.n_head, s.n_head_kv, s.head_dim, pos, b.inv_freq_for(s.head_dim, rp),
                       k.k_inv, k.v_inv, k_cache, v_cache, b.stream());
}

static void op_attention(Backend & be, const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                         const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache,
                         float * out) {
    BackendCuda & b = cuda_of(be);
    const KvScales k = kv_scales_of(s, sc);
    void * ws = b.attention_workspace_for(cuda_attention_workspace(n_tokens, s.n_head, s.head_dim, s.n_ctx));
    cuda_attention(qkv, n_tokens, row_stride, s.n_head, s.n_head_kv, s.head_dim, s.n_ctx, pos, k_cache, v_cache,
                   k.k_scale, k.v_scale, ws, out, b.stream());
}

static void op_attention_quant(Backend & be, const float * qkv, int32_t n_tokens, int32_t row_stride,
                               const AttentionShape & s, const int32_t * pos, const KvScales & sc, const void * k_cache,
                               const void * v_cache, float * out, const Linear & c, int8_t * codes) {
    BackendCuda & b = cuda_of(be);
    if (!b.exact_codes()) {  // the default: the fp32 attention's codes (within the tolerances of docs/numerics.md)
        b.attention_then_quantize(qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache, out, c, codes);
        return;
    }
    b.attention(qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache, out);
    const KvScales k = kv_scales_of(s, sc);
    void * ws = b.attention_quant_workspace_for(cuda_attention_quant_workspace(n_tokens, s.n_head));
    cuda_attention_quant(out, qkv, n_tokens, row_stride, s.n_head, s.n_head_kv, s.head_dim, pos, k_cache, v_cache,
                         k.k_scale, k.v_scale, c.kp, ws, b.attention_quant_workspace_bytes(), codes, b.stream());
}

static void op_swiglu(Backend & be, const float * gu, int32_t m, int32_t n_ff, float * out) {
    cuda_swiglu(gu, m, n_ff, out, cuda_of(be).stream());
}

static void op_swiglu_quant(Backend & be, const float * gu, const Linear & c, int32_t m, int32_t n_ff, int8_t * out) {
    const CudaLinear4 & p = cuda_linear4(c);
    if (!p.in_map) throw Error("linear '" + c.name + "': swiglu_quant needs the consumer's in_map");
    cuda_swiglu_quant(gu, p.in_map, m, n_ff, c.kp, out, cuda_of(be).stream());
}

static int32_t op_sample(Backend & be, const float * logits, int32_t n_vocab, const SamplingParams & sp, double u,
                         const std::vector<int32_t> & penalty_ids) {
    BackendCuda & b = cuda_of(be);
    b.bind();
    // [work: n_vocab floats | the picked id | penalty ids]
    const size_t work_bytes = ((size_t) n_vocab * sizeof(float) + 255) / 256 * 256;
    const size_t n_pen = sp.repetition_penalty != 1.0f ? penalty_ids.size() : 0;
    uint8_t * mem = (uint8_t *) b.sample_buffer_for(work_bytes + 256 + n_pen * sizeof(int32_t));
    int32_t * out = (int32_t *) (mem + work_bytes), * pen = (int32_t *) (mem + work_bytes + 256);
    int32_t * host = b.sample_host();
    if (n_pen > 0) {
        cuda_check(cudaMemcpyAsync(pen, penalty_ids.data(), n_pen * sizeof(int32_t), cudaMemcpyHostToDevice, b.stream()),
                   "cudaMemcpyAsync (penalty ids)");
    }
    cuda_sample(logits, n_vocab, sp, u, pen, (int32_t) n_pen, (float *) mem, out, b.stream());
    cuda_check(cudaMemcpyAsync(host, out, sizeof(int32_t), cudaMemcpyDeviceToHost, b.stream()),
               "cudaMemcpyAsync (sampled id)");
    b.synchronize();
    return *host;
}

static const BackendOps & cuda_ops() {
    static const BackendOps ops = {
        op_embed,                           // embed.cu
        op_rmsnorm,                         // rmsnorm.cu
        op_rmsnorm_quant,                   // quantize.cu
        op_quantize_codes,                  // quantize.cu
        op_rope,                            // rope.cu
        op_kv_store,                        // kv-store.cu
        op_attention,                       // attention.cu
        op_attention_quant,                 // attention-quant.cu
        op_swiglu,                          // swiglu.cu
        op_swiglu_quant,                    // quantize.cu
        cuda_op_linear_codes_swiglu_quant,  // linear-w4a4.cu
        op_sample,                          // sampling.cu
        op_rope_kv_store,                   // kv-store.cu (rope.cuh's rotation)
    };
    return ops;
}

static const std::vector<LinearKernels> & cuda_schemes() {
    static const std::vector<LinearKernels> table = {
        cuda_linear_f16_kernels,     // linear-f16.cu
        cuda_linear_w4a16g_kernels,  // linear-w4a16g.cu
        cuda_linear_w4a4d_kernels,   // linear-w4a4.cu
        cuda_linear_w4a4_kernels,    // linear-w4a4.cu
        cuda_linear_w8a8_kernels,    // linear-int8.cu
        cuda_linear_w8a8s_kernels,   // linear-int8.cu
        cuda_linear_w4a8_kernels,    // linear-int8.cu (the int4-weight GEMV/GEMM of linear-w4a8.cu)
        cuda_linear_w4a8g_kernels,   // linear-int8.cu (likewise)
    };
    return table;
}

// --- the backend object ----------------------------------------------------------------------------------------

BackendCuda::BackendCuda(int32_t device) : Backend(cuda_ops(), cuda_schemes()), device_(device) {
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    const char * env = std::getenv("MERGEQUANT_CUDA_GRAPHS");
    graphs_ = !(env && std::strcmp(env, "0") == 0);
    w4a4_mma_ = cuda_w4a4_mma_default();
    // MERGEQUANT_CUDA_SAMPLING=0 samples on the host instead (for comparisons)
    const char * smp = std::getenv("MERGEQUANT_CUDA_SAMPLING");
    if (smp && std::strcmp(smp, "0") == 0) {
        ops_.sample = nullptr;
    }
    const char * exact = std::getenv("MERGEQUANT_CUDA_EXACT_CODES");
    exact_codes_ = exact && std::strcmp(exact, "1") == 0;
}

BackendCuda::~BackendCuda() {
    cudaSetDevice(device_);
    for (auto & kv : steps_) if (kv.second.exec) cudaGraphExecDestroy(kv.second.exec);
    for (auto & kv : inv_freq_) cudaFree(kv.second);
    if (scratch_) cudaFree(scratch_);
    if (att_ws_) cudaFree(att_ws_);
    if (sample_mem_) cudaFree(sample_mem_);
    if (attq_ws_) cudaFree(attq_ws_);
    if (sample_host_) cudaFreeHost(sample_host_);
    cudaStreamDestroy(stream_);
}

void * BackendCuda::alloc(size_t bytes) {
    bind();
    void * p = nullptr;
    const cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 256));
    if (err != cudaSuccess) {
        throw Error("CUDA: out of device memory allocating " + std::to_string(bytes) + " bytes (" +
                    cudaGetErrorString(err) + ")");
    }
    return p;
}

void BackendCuda::free(void * p) {
    bind();
    cuda_check(cudaFree(p), "cudaFree");
}

void BackendCuda::upload(void * dst, const void * src, size_t bytes) {
    bind();
    cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "upload (cudaMemcpyAsync)");
    cuda_check(cudaStreamSynchronize(stream_), "upload (synchronize)");
}

void BackendCuda::download(void * dst, const void * src, size_t bytes) {
    bind();
    cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "download (cudaMemcpyAsync)");
    cuda_check(cudaStreamSynchronize(stream_), "download (synchronize)");
}

void BackendCuda::synchronize() {
    bind();
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
}

// First call per key: run the ops eagerly, so one-time work (scratch growth, kernel attributes) happens
// outside a capture. Second call: capture them into a graph and launch it. Later calls: launch it. The
// graph holds the buffer pointers of the capture, so it is dropped when the scratch buffer moves.
void BackendCuda::run_step(const void * key, const std::function<void()> & record) {
    bind();
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

void BackendCuda::forget_step(const void * key) {
    auto it = steps_.find(key);
    if (it == steps_.end()) return;
    if (it->second.exec) cudaGraphExecDestroy(it->second.exec);
    steps_.erase(it);
}

void * BackendCuda::grow(void *& buf, size_t & held, size_t bytes, bool zero, const char * what) {
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

int32_t * BackendCuda::sample_host() {
    if (!sample_host_) cuda_check(cudaMallocHost(&sample_host_, sizeof(int32_t)), "cudaMallocHost");
    return sample_host_;
}

const double * BackendCuda::inv_freq_for(int32_t head_dim, const RopeParams & rp) {
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

// --- the 4-bit schemes' device tensors (shared by linear-w4a16g.cu and linear-w4a4.cu) ---------------------------

void cuda_prepare_linear4(Backend & be, Linear & lin) {
    BackendCuda & b = cuda_of(be);
    if (!lin.qweight || !lin.scale || lin.kp % 64 != 0 || (lin.rank > 0 && (!lin.lora_a || !lin.lora_b))) {
        throw Error("linear '" + lin.name + "': " + lin.scheme + " needs qweight, scale (and lora_a/lora_b when rank "
                    "> 0) and kp % 64 == 0 (kp = " + std::to_string(lin.kp) + ")");
    }
    CudaLinear4 * p = new CudaLinear4();
    p->qweight = b.copy_tensor(lin.qweight);
    p->scale = (float *) b.copy_tensor(lin.scale);
    p->in_scale = (float *) b.copy_tensor(lin.in_scale);
    p->in_map = (int32_t *) b.copy_tensor(lin.in_map);
    if (lin.rank > 0) {
        p->lora_a = b.copy_tensor(lin.lora_a);
        p->lora_b = b.copy_tensor(lin.lora_b);
        p->lora_l = (double *) b.alloc((size_t) W4A4_GEMV_MAX_M * lin.rank * sizeof(double));
        const size_t sync_bytes = (1 + (size_t) (lin.n + 7) / 8) * sizeof(unsigned long long);  // LoraGemv::sync
        p->lora_sync = (unsigned long long *) b.alloc(sync_bytes);
        cuda_check(cudaMemsetAsync(p->lora_sync, 0, sync_bytes, b.stream()), "cudaMemsetAsync (low-rank counters)");
    }
    lin.prepared = p;
}

void cuda_release_linear4(Backend & be, Linear & lin) {
    CudaLinear4 * p = (CudaLinear4 *) lin.prepared;
    if (!p) return;
    for (void * d : {p->qweight, (void *) p->scale, (void *) p->in_scale, (void *) p->in_map, p->lora_a, p->lora_b,
                     (void *) p->lora_l, (void *) p->lora_sync, (void *) p->swiglu_start, (void *) p->swiglu_slots}) {
        if (d) be.free(d);
    }
    delete p;
    lin.prepared = nullptr;
}

bool BackendCuda::free_device_memory(size_t & bytes) {
    size_t total = 0;
    return cudaSetDevice(device_) == cudaSuccess && cudaMemGetInfo(&bytes, &total) == cudaSuccess;
}

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
