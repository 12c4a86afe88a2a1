// What every backend shares around its tables: binding a linear to its scheme and kernels (with the one error a
// backend that lacks a scheme gives), the unfused forms of the optional ops, and the CUDA entry points of a build
// without the CUDA backend.
#include "mq-backend.h"

#include "mq-error.h"
#include "mq-schemes.h"

namespace mq {

const LinearKernels * Backend::kernels_for(const std::string & scheme) const {
    for (const LinearKernels & k : kernels_) {
        if (scheme == k.scheme) {
            return &k;
        }
    }
    return nullptr;
}

void Backend::prepare_linear(Linear & lin) {
    const Scheme * def = scheme_find(lin.scheme);
    if (!def) {
        throw Error("linear '" + lin.name + "': unknown scheme '" + lin.scheme + "' (this engine runs " +
                    scheme_names() + ")");
    }
    const LinearKernels * k = kernels_for(lin.scheme);
    if (!k) {
        std::string have;
        for (const LinearKernels & e : kernels_) {
            have += (have.empty() ? "" : ", ") + std::string(e.scheme);
        }
        throw Error("linear '" + lin.name + "': the " + name() + " backend has no kernels for scheme '" + lin.scheme +
                    "' (it runs " + have + ")");
    }
    if (k->k_multiple > 0 && lin.k % k->k_multiple != 0) {
        throw Error("linear '" + lin.name + "': the " + name() + " backend's " + lin.scheme + " kernels need K a multiple of " +
                    std::to_string(k->k_multiple) + " (K = " + std::to_string(lin.k) + ")");
    }
    if (k->group_multiple > 0 && lin.group % k->group_multiple != 0) {
        throw Error("linear '" + lin.name + "': the " + name() + " backend's " + lin.scheme +
                    " kernels need the group size a multiple of " + std::to_string(k->group_multiple) + " (group = " +
                    std::to_string(lin.group) + ")");
    }
    lin.def = def;
    lin.kernels = k;
    if (k->prepare) {
        k->prepare(*this, lin);
    }
}

void Backend::release_linear(Linear & lin) {
    if (lin.kernels && lin.kernels->release) {
        lin.kernels->release(*this, lin);
    }
    lin.prepared = nullptr;
}

static const LinearKernels & bound(const Linear & lin, const std::string & backend) {
    if (!lin.kernels) {
        throw Error("linear '" + lin.name + "' was not prepared on the " + backend + " backend");
    }
    return *lin.kernels;
}

void Backend::linear(const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    const LinearKernels & k = bound(lin, name());
    if (!k.linear) {
        throw Error("linear '" + lin.name + "': scheme '" + lin.scheme + "' takes integer codes, not floats");
    }
    k.linear(*this, lin, x, m, y, accumulate);
}

void Backend::linear_codes(const Linear & lin, const int8_t * a, int32_t m, float * y, bool accumulate) {
    const LinearKernels & k = bound(lin, name());
    if (!k.linear_codes) {
        throw Error("linear '" + lin.name + "': scheme '" + lin.scheme + "' does not take integer codes");
    }
    k.linear_codes(*this, lin, a, m, y, accumulate);
}

void Backend::int_gemm(const Linear & lin, const int8_t * a, int32_t m, int32_t * acc) {
    const LinearKernels & k = bound(lin, name());
    if (!k.int_gemm) {
        throw Error("linear '" + lin.name + "': scheme '" + lin.scheme + "' has no integer GEMM");
    }
    k.int_gemm(*this, lin, a, m, acc);
}

void Backend::attention_quant(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                              const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache,
                              float * out, const Linear & consumer, int8_t * codes) {
    if (ops_.attention_quant) {
        ops_.attention_quant(*this, qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache, out, consumer, codes);
    } else {
        attention_then_quantize(qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache, out, consumer, codes);
    }
}

void Backend::attention_then_quantize(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                                      const int32_t * pos, const KvScales & sc, const void * k_cache,
                                      const void * v_cache, float * out, const Linear & consumer, int8_t * codes) {
    attention(qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache, out);
    quantize_codes(out, n_tokens, s.n_head * s.head_dim, consumer, codes);
}

void Backend::rope_kv_store(float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                            const int32_t * pos, const RopeParams & rp, const KvScales & sc, void * k_cache,
                            void * v_cache) {
    if (ops_.rope_kv_store) {
        ops_.rope_kv_store(*this, qkv, n_tokens, row_stride, s, pos, rp, sc, k_cache, v_cache);
    } else {
        rope(qkv, n_tokens, row_stride, s.n_head, s.n_head_kv, s.head_dim, pos, rp);
        kv_store(qkv, n_tokens, row_stride, s, pos, sc, k_cache, v_cache);
    }
}

void Backend::linear_codes_swiglu_quant(const Linear & gate_up, const int8_t * a, int32_t m, const Linear & down,
                                        int32_t n_ff, float * gu, int8_t * out) {
    if (ops_.linear_codes_swiglu_quant) {
        ops_.linear_codes_swiglu_quant(*this, gate_up, a, m, down, n_ff, gu, out);
    } else {
        linear_codes_then_swiglu_quant(gate_up, a, m, down, n_ff, gu, out);
    }
}

void Backend::linear_codes_then_swiglu_quant(const Linear & gate_up, const int8_t * a, int32_t m, const Linear & down,
                                             int32_t n_ff, float * gu, int8_t * out) {
    linear_codes(gate_up, a, m, gu, false);
    swiglu_quant(gu, down, m, n_ff, out);
}

#ifndef MERGEQUANT_HAVE_CUDA
bool backend_cuda_built() {
    return false;
}

std::unique_ptr<Backend> backend_cuda_create(int32_t, std::string & why) {
    why = "this build of mergequant has no CUDA backend (rebuild with MERGEQUANT_CUDA=ON and a CUDA compiler)";
    return nullptr;
}
#endif

}  // namespace mq
