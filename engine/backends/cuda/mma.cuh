// Tensor-core building blocks of the linear ops: fragment formats, 16-byte loads, cp.async.
//
// Every matrix kernel reads rows of A (activations [M][K]) and B (weights [N][K]), both row-major along K,
// in chunks of 64 bytes. In a warp, lane = 4·g + t (g = groupID 0..7, t = threadID_in_group 0..3, the PTX
// ISA's names, section 9.7.14.5 "Matrix fragments for mma.m16n8k*"); thread t of a quad holds bytes
// [16t, 16t+16) of its row's chunk as one uint4 = four 32-bit words w[0..3]. A thread holds the chunk of A
// rows g and g+8 (the rows its A fragment covers) and of B row g (the column its B fragment covers).
//
// The MMA sums over k, so any permutation of k applied to both A and B gives the same dot products. Each
// format assigns the chunk's words to fragment registers with one fixed permutation for A and B alike, so
// rows are used as stored in the model file, with no repacking and no shuffles:
//
//   FmtI4 (int4 codes, two per byte, low nibble = even k; 128 k per chunk; INT8 tensor cores, sm_80+):
//     mma.m16n8k32 .s8 (PTX 9.7.14.5.9): A regs a0..a3 hold (row g, k 4t..4t+3), (row g+8, k 4t..),
//     (row g, k 16+4t..), (row g+8, k 16+4t..); B regs b0, b1 hold (k 4t.., col g), (k 16+4t.., col g).
//     Step j (0..3) takes word w[j] (8 nibbles: k = 32t+8j .. 32t+8j+7) and splits it in registers:
//       lo = (w << 4) & 0xF0F0F0F0 -> int8 lanes 16·x of the even k,  hi = w & 0xF0F0F0F0 -> the odd k
//     (a signed nibble in the high half of a byte reads as int8 16·x). lo feeds the "4t.." registers and
//     hi the "16+4t.." ones. Each product is 256·a·w: the int32 sum is exactly 256 times the true one
//     (|16a·16w| <= 16384, no overflow for K < 131072), so acc >> 8 is exact.
//   FmtS4 (the same int4 rows, 128 k per chunk; native INT4 tensor cores of sm_80/86/89; on sm_90 the s4 MMA
//     compiles but is emulated, ~29x slower than s8, so FmtI4 is taken there): mma.m16n8k64 .s4 (PTX
//     9.7.14.5.10): A regs a0..a3 hold (row g, k 8t..8t+7), (row g+8, k 8t..), (row g, k 32+8t..),
//     (row g+8, k 32+8t..), eight nibbles a register, the lowest k in the low nibble: exactly a word of the
//     file's layout. B regs b0, b1 hold (k 8t.., col g), (k 32+8t.., col g). Step s (0, 1) gives w[2s] to the
//     "8t.." registers and w[2s+1] to the "32+8t.." ones; no unpacking, and the int32 sum is the true one.
//   FmtF16 (fp16, 32 k per chunk): mma.m16n8k16 .f16 -> .f32 (PTX 9.7.14.5.8): A regs hold (row g, k 2t,
//     2t+1), (row g+8, k 2t..), (row g, k 8+2t..), (row g+8, k 8+2t..); B regs (k 2t.., col g),
//     (k 8+2t.., col g). Step s (0, 1) gives w[2s] to the "2t.." registers and w[2s+1] to the "8+2t.." ones.
//   FmtA8W4 (int8 activation codes, int4 weights: w4a8, w4a8g; 128 k per chunk = 128 bytes of an A row, 64 of a
//     B row; INT8 tensor cores): mma.m16n8k32 .s8 as FmtI4, but a thread holds k 16t..16t+15 and 64+16t..64+16t+15
//     of the chunk, so that steps 0, 1 sum over the chunk's first 64 k only and steps 2, 3 over the second (a group
//     of 64 k ends on a step). Of A it holds the 16-byte pieces at bytes 16t and 64+16t (r[0], r[1]), of B the
//     8-byte pieces at bytes 8t and 32+8t side by side in one uint4 (words 0, 1 from 8t; 2, 3 from 32+8t). Step s
//     (0..3) splits B word w[s] (k = 64(s/2) + 16t + 8(s%2) .. +7) as FmtI4 does (lo: 16·q of the even k -> b0,
//     hi: of the odd k -> b1) and sorts A's 8 bytes of the same k (words 2(s%2), 2(s%2)+1 of r[s/2]) with
//     byte_perm into the even k (a0 row g, a1 row g+8) and the odd k (a2, a3). Each product is 16·a·q: the int32
//     sum is 16 times the true one (|16·a·q| <= 16256, no overflow for K <= 131072), so acc >> 4 is exact.
//     The fragments only ask that r[0], r[1] hold the A bytes of the 32 k whose nibbles are B's words 0..3, in
//     the same order: where no group ends inside a chunk (w4a8; w4a8g with group % 128 == 0) the decode GEMV
//     gives a thread k 32t..32t+31 instead, one 16-byte B piece at byte 16t and the 32 A bytes at 32t (FmtI4's
//     load pattern; the steps then mix both halves of the chunk, which one group scale covers).
//
// The accumulator fragment is the same for all: c0, c1 = (row g, col 2t, 2t+1), c2, c3 = (row g+8, ...).
#pragma once

#include <cstdint>

namespace mq {

__device__ __forceinline__ uint32_t mma_word(const uint4 & v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

struct FmtI4 {
    using acc_t = int32_t;
    static constexpr int k_per_chunk = 128;
    static constexpr int steps = 4;
    static constexpr int shift = 8;  // acc = 256 · sum
    static constexpr int a_bytes = 64;  // bytes of an A row per chunk (as of a B row)
    __device__ __forceinline__ static uint32_t lo(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }
    __device__ __forceinline__ static uint32_t hi(uint32_t w) { return w & 0xF0F0F0F0u; }
    __device__ __forceinline__ static void a_frag(const uint4 & r0, const uint4 & r8, int s, uint32_t a[4]) {
        const uint32_t w0 = mma_word(r0, s), w8 = mma_word(r8, s);
        a[0] = lo(w0), a[1] = lo(w8), a[2] = hi(w0), a[3] = hi(w8);
    }
    __device__ __forceinline__ static void b_frag(const uint4 & r, int s, uint32_t b[2]) {
        const uint32_t w = mma_word(r, s);
        b[0] = lo(w), b[1] = hi(w);
    }
    __device__ __forceinline__ static void mma(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) {
        asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

// step s: words 2s and 2s+1 of each row's chunk, as they are (FmtS4, FmtF16)
struct FragWordPairs {
    __device__ __forceinline__ static void a_frag(const uint4 & r0, const uint4 & r8, int s, uint32_t a[4]) {
        a[0] = mma_word(r0, 2 * s), a[1] = mma_word(r8, 2 * s), a[2] = mma_word(r0, 2 * s + 1),
        a[3] = mma_word(r8, 2 * s + 1);
    }
    __device__ __forceinline__ static void b_frag(const uint4 & r, int s, uint32_t b[2]) {
        b[0] = mma_word(r, 2 * s), b[1] = mma_word(r, 2 * s + 1);
    }
};

struct FmtS4 : FragWordPairs {
    using acc_t = int32_t;
    static constexpr int k_per_chunk = 128;
    static constexpr int steps = 2;
    static constexpr int shift = 0;
    static constexpr int a_bytes = 64;
    __device__ __forceinline__ static void mma(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) {
        asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

// FmtI8 (int8 codes, one per byte; 64 k per chunk; INT8 tensor cores): mma.m16n8k32 .s8 as FmtI4, but the words
// are int8 lanes already: step s (0, 1) gives w[2s] to the "4t.." registers and w[2s+1] to the "16+4t.." ones, the
// same assignment for A and B, and the int32 sum is the true one (w8a8: activations and weights in [-127, 127])
struct FmtI8 : FragWordPairs {
    using acc_t = int32_t;
    static constexpr int k_per_chunk = 64;
    static constexpr int steps = 2;
    static constexpr int shift = 0;
    static constexpr int a_bytes = 64;
    __device__ __forceinline__ static void mma(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) {
        FmtI4::mma(c, a, b);
    }
};

struct FmtA8W4 {
    using acc_t = int32_t;
    static constexpr int k_per_chunk = 128;
    static constexpr int steps = 4;
    static constexpr int shift = 4;  // acc = 16 · sum
    static constexpr int a_bytes = 128;
    static constexpr bool grouped = false;
    __device__ __forceinline__ static void a_frag(const uint4 (&r0)[2], const uint4 (&r8)[2], int s, uint32_t a[4]) {
        const uint4 & p0 = r0[s >> 1];
        const uint4 & p8 = r8[s >> 1];
        const uint32_t x0 = (s & 1) ? p0.z : p0.x, y0 = (s & 1) ? p0.w : p0.y;
        const uint32_t x8 = (s & 1) ? p8.z : p8.x, y8 = (s & 1) ? p8.w : p8.y;
        a[0] = __byte_perm(x0, y0, 0x6420), a[1] = __byte_perm(x8, y8, 0x6420);
        a[2] = __byte_perm(x0, y0, 0x7531), a[3] = __byte_perm(x8, y8, 0x7531);
    }
    __device__ __forceinline__ static void b_frag(const uint4 & r, int s, uint32_t b[2]) {
        const uint32_t w = mma_word(r, s);
        b[0] = FmtI4::lo(w), b[1] = FmtI4::hi(w);
    }
    __device__ __forceinline__ static void mma(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) {
        FmtI4::mma(c, a, b);
    }
};
// w4a8g: the same fragments; the kernels sum each 64 k (two steps) apart, shift that sum back (>> 4) and add it
// times the group scale of its column, gscale[n, k / group]: acc is then the true sum (shift 0)
struct FmtA8W4G : FmtA8W4 {
    static constexpr int shift = 0;
    static constexpr bool grouped = true;
};

struct FmtF16 : FragWordPairs {
    using acc_t = float;
    static constexpr int k_per_chunk = 32;
    static constexpr int steps = 2;
    static constexpr int shift = 0;
    static constexpr int a_bytes = 64;
    __device__ __forceinline__ static void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

// Weights are read once per call: streamed past L1. `volatile` plus __launch_bounds__(.., 1) on the
// kernels keep a batch of loads issued back to back before the math that uses them (measured in the
// kernel lab: otherwise the compiler sinks each load next to its use and few bytes are in flight).
__device__ __forceinline__ uint4 ld_stream(const void * p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 ld_stream8(const void * p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
// activations are re-read by every block: cached in L1
__device__ __forceinline__ uint4 ld_cached(const void * p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros (rows or K past the end)
__device__ __forceinline__ void cp_async16(void * smem, const void * gmem, int src_bytes) {
    const uint32_t s = (uint32_t) __cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
// 8 bytes global -> shared (through L1: .cg takes 16 bytes only); src_bytes = 0 writes zeros
__device__ __forceinline__ void cp_async8(void * smem, const void * gmem, int src_bytes) {
    const uint32_t s = (uint32_t) __cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

}  // namespace mq
