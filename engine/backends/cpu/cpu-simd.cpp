// Picks the CPU kernels' instruction set once per process (cpu-simd.h): the best the CPU supports (cpuid, and the
// OS saving the AVX-512 state, as the compiler's feature checks test), or MERGEQUANT_CPU's.
#include "cpu-simd.h"

#include "../../src/mq-error.h"

#include <cstdlib>
#include <string>

#if defined(MQ_CPU_X86)
#include <cpuid.h>
#define MQ_CPU_ISA avx512
#include "kernels/kernels.h"
#undef MQ_CPU_ISA
#define MQ_CPU_ISA avx2
#include "kernels/kernels.h"
#undef MQ_CPU_ISA
#endif
#define MQ_CPU_ISA scalar
#include "kernels/kernels.h"
#undef MQ_CPU_ISA

namespace mq {

#define MQ_KERNEL_TABLE(set)                                                                                     \
    CpuKernels {                                                                                                 \
        #set, set::f16_to_f32, set::f32_to_f16, set::i8_to_f32_scaled, set::f32_to_i8_scaled, set::dot_f32,      \
            set::dot_f64, set::axpy_f64, set::gemm_f16, set::gemm_w4a4, set::gemm_w4a16g,      \
            set::attention_heads, set::lora_rows, set::quant_row_i8, set::gemm_w8a8, set::gemm_w4a8,           \
            set::attention_tokens, set::expand_slots, set::gemm_w4a4_tiles, set::lora_first, set::swiglu_row      \
    }

#if defined(MQ_CPU_X86)
// F16C (CPUID leaf 1, ECX bit 29): read directly, since not every compiler's __builtin_cpu_supports knows it
static bool cpu_has_f16c() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
#endif

// 2: avx512, 1: avx2, 0: scalar
static int cpu_best_level() {
#if defined(MQ_CPU_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        return 2;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c()) {
        return 1;
    }
#endif
    return 0;
}

static CpuKernels cpu_select() {
    static const char * names[3] = {"scalar", "avx2", "avx512"};
    const int best = cpu_best_level();
    int level = best;
    const char * env = std::getenv("MERGEQUANT_CPU");
    if (env && *env) {
        level = -1;
        for (int i = 0; i < 3; i++) {
            if (std::string(env) == names[i]) {
                level = i;
            }
        }
        if (level < 0) {
            throw Error(std::string("invalid MERGEQUANT_CPU '") + env + "': expected avx512, avx2 or scalar");
        }
        if (level > best) {
            throw Error(std::string("MERGEQUANT_CPU=") + env + ": this CPU supports at most '" + names[best] + "'");
        }
    }
#if defined(MQ_CPU_X86)
    if (level == 2) {
        return MQ_KERNEL_TABLE(avx512);
    }
    if (level == 1) {
        return MQ_KERNEL_TABLE(avx2);
    }
#endif
    return MQ_KERNEL_TABLE(scalar);
}

const CpuKernels & cpu_kernels() {
    static const CpuKernels k = cpu_select();
    return k;
}

}  // namespace mq
