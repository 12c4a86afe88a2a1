// The SIMD kernels of the CPU backend, declared for one instruction set: the translation units of this folder
// are compiled once per set (CMakeLists.txt: avx512 = x86-64-v4 + VNNI, avx2 = x86-64-v3, scalar = the baseline),
// each into namespace mq::<set> by MQ_CPU_ISA; cpu-simd.cpp includes this header once per set and picks one
// table at startup. No include guard: it is meant to be included once per set.
// These translation units define no inline function or template instance that another one also defines (no std
// containers, no inline wrappers): such a copy would be compiled with this set's instructions, and the linker may
// pick it for the whole program, where a CPU without the set would fault on it.
#include "../cpu-simd.h"

#include <cstdint>

#ifndef MQ_CPU_ISA
#error "kernels.h needs MQ_CPU_ISA (avx512, avx2 or scalar)"
#endif

namespace mq::MQ_CPU_ISA {

void f16_to_f32(const uint16_t * x, float * y, int64_t n);
void f32_to_f16(const float * x, uint16_t * y, int64_t n);
void i8_to_f32_scaled(const int8_t * x, const float * s, float * y, int64_t n);
void f32_to_i8_scaled(const float * x, const float * inv, int8_t * y, int64_t n);
float dot_f32(const float * a, const float * b, int64_t n);
double dot_f64(const float * a, const float * b, int64_t n);
void axpy_f64(double a, const float * x, double * y, int64_t n);
void gemm_f16(const uint16_t * w, const float * x, float * y, int64_t m, int64_t n, int64_t k, int64_t n_begin,
              int64_t n_end, bool accumulate);
void gemm_w4a4(const uint8_t * qw, const CodesPrepared & a, int64_t m, int64_t kp, int64_t n, int64_t r0, int64_t r1,
               int32_t * acc);
void gemm_w4a16g(const uint8_t * qw, const uint16_t * scale, const float * x, float * y, int64_t m, int64_t n,
                 int64_t k, int64_t group, int64_t r0, int64_t r1, bool accumulate);
void lora_rows(const double * l, int64_t rank, const float * bt, int64_t n, int64_t r0, int64_t r1, double * out);
void lora_first(const float * at, const int8_t * codes, int64_t kp, int64_t rank, int64_t t0, int64_t t1, double * l);
void expand_slots(const float * z, const int32_t * in_map, int64_t kp, int8_t * a);
void swiglu_row(const float * g, const float * u, float * out, int64_t n);
// the blocked GEMM where the set has one (gemm-int4.cpp), else null
extern void (*const gemm_w4a4_tiles)(const W4a4Tiles & g, int64_t u0, int64_t u1);
void attention_heads(const float * q, int32_t g, int32_t hd, const KvRows & kv, int32_t n_kv, float * out);
// gemm-int8.cpp: the dynamic int8-activation schemes (w8a8, w4a8, w4a8g)
float quant_row_i8(const float * x, int64_t k, int64_t kp, int32_t qmax, int8_t * a);
void gemm_w8a8(const int8_t * w, const int32_t * wsum, const int8_t * a, int64_t ka, int64_t m, int64_t k, int64_t n,
               int64_t r0, int64_t r1, int32_t * acc);
void gemm_w4a8(const uint8_t * qw, const uint8_t * gscale, int64_t group, const int32_t * wsum, const Int8Prepared & a,
               int64_t m, int64_t kp, int64_t n, int64_t r0, int64_t r1, int32_t * acc);
// where the set has it (attention.cpp), else null
extern bool (*const attention_tokens)(const float * q, int64_t q_stride, int32_t nq, const int32_t * n_kv, int32_t g,
                                      int32_t hd, const KvRows & kv, float * out, int64_t out_stride);

}  // namespace mq::MQ_CPU_ISA
