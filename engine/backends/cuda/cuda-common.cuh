// Helpers shared by the CUDA backend's ops: error checks that throw mq::Error naming the failed call.
#pragma once

#include "../../src/mq-error.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

namespace mq {

inline void cuda_check(cudaError_t err, const char * what) {
    if (err != cudaSuccess) {
        throw Error(std::string("CUDA: ") + what + " failed: " + cudaGetErrorString(err));
    }
}

// after every launch: a bad configuration is reported here, not at the next synchronization
inline void cuda_check_launch(const char * kernel) {
    cuda_check(cudaGetLastError(), kernel);
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The device current on the calling host thread. CUDA's current device is per host thread, so the backend binds
// its device (cuda_bind_device) wherever a call may arrive from a thread other than the one that created it.
inline int cuda_current_device() {
    int d = 0;
    cuda_check(cudaGetDevice(&d), "cudaGetDevice");
    return d;
}
inline void cuda_bind_device(int device) {
    if (cuda_current_device() != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
}

// the current device's multiprocessor count (a cached attribute: cheap)
inline int cuda_sm_count() {
    int sms = 0;
    cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, cuda_current_device()),
               "cudaDeviceGetAttribute(multiprocessors)");
    return sms;
}

// Per-device one-time settings (a kernel's dynamic shared-memory opt-in holds for the device current when it is
// set): f() runs once for each device it is called on (devices 0..63; any other device gets it every call).
// Two threads may both run it the first time: f must be idempotent, as cudaFuncSetAttribute is.
template <class F> void cuda_once_per_device(std::atomic<uint64_t> & done, F && f) {
    const int d = cuda_current_device();
    const uint64_t bit = d >= 0 && d < 64 ? uint64_t(1) << d : 0;
    if (bit && (done.load(std::memory_order_acquire) & bit)) return;
    f();
    done.fetch_or(bit, std::memory_order_release);
}

// Programmatic dependent launch (sm_90+; no-ops elsewhere and for kernels launched without the attribute).
// The decode path's kernels are launched with it (launch_pdl) and call pdl_trigger() first: that only lets
// the next kernel's blocks be scheduled early (once every block of this grid has started). Each one then
// calls pdl_wait(), which returns once the kernel before has completed and its writes are visible (and so,
// transitively, every earlier kernel's), before it reads any input or writes anything. The small ops wait
// at once: that hides their launch latency. The GEMVs first prefetch their weights (written by no kernel)
// into L2, so the weight stream starts while the kernel before still runs.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void prefetch_l2(const void * p) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// PDL mode, read once: MERGEQUANT_CUDA_PDL = 0 (plain launches), 1 (PDL, no prefetch), 2 (PDL and L2 weight
// prefetch; the default on sm_90+ devices; devices below sm_90 always get 0)
int cuda_pdl_mode();

// launch with the programmatic-stream-serialization attribute when cuda_pdl_mode() > 0
template <typename... KArgs, typename... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st, const char * what,
                Args... args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cfg.attrs = attr;
    cfg.numAttrs = cuda_pdl_mode() > 0 ? 1 : 0;
    cuda_check(cudaLaunchKernelEx(&cfg, kernel, (KArgs) args...), what);
}

// clamp(rint(x), lo, hi) (round half to even; NaN gives 0)
__device__ __forceinline__ int32_t round_clamp(float x, int32_t lo, int32_t hi) {
    const float r = rintf(x);
    if (!(r >= (float) lo)) return r != r ? 0 : lo;
    return r > (float) hi ? hi : (int32_t) r;
}

// an input slot's code: part `part` of `parts` of the channel value z (docs/numerics.md, in_map)
__device__ __forceinline__ int8_t slot_code(float z, int32_t part, int32_t parts) {
    const int32_t t = round_clamp(z, -8 * parts, 7 * parts) + part;
    return (int8_t) ((t >= 0 ? t : t - parts + 1) / parts);  // floordiv
}

// silu(g) * u = g / (1 + exp(-g)) * u in float64, rounded once: the CPU backend's value (docs/numerics.md)
__device__ __forceinline__ float swiglu_value(float g, float u) {
    const double gd = g;
    return (float) (gd / (1.0 + exp(-gd)) * (double) u);
}

// r = 1 / sqrt(Σ x² / dim + eps) of one row, shared by the whole block (blockDim a multiple of 32, ≤ 1024).
// All in float64, rounded once, as on the CPU backend (docs/numerics.md), so both give the same fp32 r.
__device__ __forceinline__ float block_rms_factor(const float * __restrict__ xr, int32_t dim, float eps) {
    double ss = 0.0;
    for (int32_t i0 = 0; i0 < dim; i0 += 8 * blockDim.x) {
        // 8 loads issued before their math: a decode step is latency-bound here (GPU issue is in order)
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int32_t i = i0 + u * blockDim.x + threadIdx.x;
            v[u] = i < dim ? xr[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) ss += (double) v[u] * v[u];
    }
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    __shared__ double part[32];
    __shared__ float inv;
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int i = 0; i < (int) (blockDim.x >> 5); i++) s += part[i];
        inv = (float) (1.0 / sqrt(s / dim + (double) eps));
    }
    __syncthreads();
    return inv;
}

}  // namespace mq
