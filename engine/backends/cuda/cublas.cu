// cuBLAS for the f16 and int8 prefill GEMMs, loaded at run time (cublas.cuh). The few entry points are declared here from
// cuBLAS's C API (v2), so building needs no cuBLAS headers and the engine no cuBLAS at link or load time.
#include "cublas.cuh"
#include "cuda-common.cuh"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace mq {

namespace {

// cuBLAS v2 C API values (cublas_api.h, library_types.h)
constexpr int CUBLAS_OP_N = 0, CUBLAS_OP_T = 1;
constexpr int CUDA_R_32F_ = 0, CUDA_R_16F_ = 2, CUDA_R_8I_ = 3, CUDA_R_32I_ = 10;
constexpr int CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32I = 72;
constexpr int CUBLAS_GEMM_DEFAULT = -1;
using handle_t = void *;
using create_fn = int (*)(handle_t *);
using set_stream_fn = int (*)(handle_t, cudaStream_t);
using gemm_ex_fn = int (*)(handle_t, int, int, int, int, int, const void *, const void *, int, int, const void *, int,
                           int, const void *, void *, int, int, int, int);

// the library, loaded once, and one handle per device (a cuBLAS handle belongs to the device current when it is
// created), each made at its device's first GEMM; calls on one handle take turns
struct Cublas {
    create_fn create = nullptr;
    set_stream_fn set_stream = nullptr;
    gemm_ex_fn gemm_ex = nullptr;
    std::mutex mu;
    std::map<int, handle_t> handles;  // by device; nullptr: creating it failed
};

Cublas * cublas_load() {
    static Cublas * lib = []() -> Cublas * {
        const char * off = std::getenv("MERGEQUANT_CUBLAS");
        if (off && std::string(off) == "0") return nullptr;
        const char * path = std::getenv("MERGEQUANT_CUBLAS_LIB");
        void * so = nullptr;
        for (const char * name : {path, "libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
            if (name && *name && (so = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
        }
        if (!so) return nullptr;
        auto c = new Cublas();
        c->create = (create_fn) dlsym(so, "cublasCreate_v2");
        c->set_stream = (set_stream_fn) dlsym(so, "cublasSetStream_v2");
        c->gemm_ex = (gemm_ex_fn) dlsym(so, "cublasGemmEx");
        if (!c->create || !c->set_stream || !c->gemm_ex) {
            delete c;
            return nullptr;
        }
        return c;
    }();
    return lib;
}

// the current device's handle (c->mu held), or nullptr where cuBLAS cannot make one
handle_t cublas_handle(Cublas * c) {
    const int dev = cuda_current_device();
    auto it = c->handles.find(dev);
    if (it == c->handles.end()) {
        handle_t h = nullptr;
        if (c->create(&h) != 0) h = nullptr;
        it = c->handles.emplace(dev, h).first;
    }
    return it->second;
}

}  // namespace

bool cuda_cublas_gemm_f16(const __half * w, int64_t n, int64_t k, const __half * x, int32_t m, float * y, float beta,
                          cudaStream_t st) {
    Cublas * c = cublas_load();
    if (!c) return false;
    std::lock_guard<std::mutex> lock(c->mu);
    handle_t handle = cublas_handle(c);
    if (!handle) return false;
    // column-major view: yᵀ [n, m] = wᵀ' · xᵀ with w [n, k] row-major read as the k x n column-major matrix, transposed
    const float alpha = 1.0f;
    int err = c->set_stream(handle, st);
    if (err == 0) {
        err = c->gemm_ex(handle, CUBLAS_OP_T, CUBLAS_OP_N, (int) n, m, (int) k, &alpha, w, CUDA_R_16F_, (int) k, x,
                         CUDA_R_16F_, (int) k, &beta, y, CUDA_R_32F_, (int) n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    if (err != 0) throw Error("CUDA f16 GEMM: cublasGemmEx failed with status " + std::to_string(err));
    cuda_check_launch("cublasGemmEx");
    return true;
}

bool cuda_cublas_available() {
    return cublas_load() != nullptr;
}

int cuda_cublas_gemm_i8(const int8_t * w, int64_t n, int64_t k, const int8_t * x, int32_t m, int32_t * c, int64_t ldc,
                        cudaStream_t st) {
    Cublas * cb = cublas_load();
    if (!cb) return -1;
    std::lock_guard<std::mutex> lock(cb->mu);
    handle_t handle = cublas_handle(cb);
    if (!handle) return -1;
    // the f16 GEMM's column-major view (TN: the layout cuBLAS's int8 kernels take), int32 alpha and beta
    const int32_t alpha = 1, beta = 0;
    int err = cb->set_stream(handle, st);
    if (err == 0) {
        err = cb->gemm_ex(handle, CUBLAS_OP_T, CUBLAS_OP_N, (int) n, m, (int) k, &alpha, w, CUDA_R_8I_, (int) k, x,
                          CUDA_R_8I_, (int) k, &beta, c, CUDA_R_32I_, (int) ldc, CUBLAS_COMPUTE_32I, CUBLAS_GEMM_DEFAULT);
    }
    if (err == 0) cuda_check_launch("cublasGemmEx (int8)");
    return err;
}

}  // namespace mq
