// Schemes w4a4 and w4a4d on the CPU: the exact int4 x int4 -> int32 GEMM over the file's packed weights
// (kernels/gemm-int4.cpp), then y = float(acc) * scale[n] (+ the low-rank branch of w4a4) (* the token's step of
// w4a4d). w4a4 takes the codes its producer made (quantize.cpp); w4a4d rounds each token itself.
#include "cpu-backend.h"
#include "cpu-simd.h"
#include "quantize.h"

#include <algorithm>
#include <vector>

namespace mq::cpu {

// the CPU reads every weight straight from the mapping; only the low-rank branch is widened to fp32: A (its
// float64 dot with the codes is exact) and B transposed, so lora[r] = Σ_i B[r, i]·l[i] runs in float64 as
// vector sums over blocks of rows r (kernels/lora.cpp), in the order i = 0, 1, ...
struct LoraF32 {
    std::vector<float> a;   // [rank, kp]
    std::vector<float> bt;  // [rank, n]
};

static void prepare_w4a4(Backend &, Linear & lin) {
    if (lin.rank > 0) {
        LoraF32 * l = new LoraF32();
        l->a.resize(lin.rank * lin.kp);
        l->bt.resize(lin.n * lin.rank);
        cpu_f16_to_f32(lin.lora_a->as<uint16_t>(), l->a.data(), (int64_t) l->a.size());
        std::vector<float> b32((size_t) lin.n * lin.rank);
        cpu_f16_to_f32(lin.lora_b->as<uint16_t>(), b32.data(), (int64_t) b32.size());
        for (int64_t r = 0; r < lin.n; r++) {
            for (int64_t i = 0; i < lin.rank; i++) {
                l->bt[i * lin.n + r] = b32[r * lin.rank + i];
            }
        }
        lin.prepared = l;
    }
}
static void release_w4a4(Backend &, Linear & lin) {
    if (lin.rank > 0) {
        delete (LoraF32 *) lin.prepared;
    }
    lin.prepared = nullptr;
}

// acc = a · qᵀ (int32, exact), then y = float(acc) * scale[n] (+ low-rank branch), times the token's
// dynamic step when `step` is given; accumulate adds to y
static void int_gemm_epilogue(Backend & be, const Linear & lin, const int8_t * a, int32_t m, float * y,
                              bool accumulate, const float * step) {
    const int64_t n = lin.n, kp = lin.kp, h = kp / 2;
    thread_local std::vector<int8_t> even, odd;
    thread_local std::vector<int32_t> sums, acc;
    even.resize(m * h);
    odd.resize(m * h);
    sums.resize(m);
    acc.resize((size_t) m * n);
    CodesPrepared prep{even.data(), odd.data(), sums.data()};
    cpu_codes_prepare(a, m, kp, prep);
    const float * scale = lin.scale->as<float>();
    const LoraF32 * lora = lin.rank > 0 ? (const LoraF32 *) lin.prepared : nullptr;
    // low-rank branch in float64, rounded once: l[t, i] = Σ_s A[i, s] · a[t, s] is exact there (fp16 times
    // int4), then lora[t, r] = fp32(Σ_i B[r, i] · l[t, i])
    // (the tokens of a prefill split across the threads)
    std::vector<double> l;
    if (lora) {
        l.resize((size_t) m * lin.rank);
        cpu_of(be).run_rows(m, [&](int32_t ith, int32_t nth) {
            int64_t b, e;
            split_range(m, ith, nth, b, e);
            std::vector<float> af(kp);
            for (int64_t t = b; t < e; t++) {
                for (int64_t s = 0; s < kp; s++) {
                    af[s] = a[t * kp + s];
                }
                for (int64_t i = 0; i < lin.rank; i++) {
                    l[t * lin.rank + i] = cpu_dot_f64(lora->a.data() + i * kp, af.data(), kp);
                }
            }
        });
    }
    // thread_local names inside the job would resolve to each worker's own copy: pass pointers
    int32_t * accp = acc.data();
    cpu_of(be).run_row_blocks(n, [&](int64_t r0, int64_t r1) {
        cpu_gemm_w4a4(lin.qweight->data, prep, m, kp, n, r0, r1, accp);
        thread_local std::vector<double> lsum;  // this worker's lora[r0 .. r1) of one token
        lsum.resize(r1 - r0);
        for (int32_t t = 0; t < m; t++) {
            if (lora) {
                cpu_lora_rows(l.data() + t * lin.rank, lin.rank, lora->bt.data(), n, r0, r1, lsum.data());
            }
            for (int64_t r = r0; r < r1; r++) {
                float v = (float) accp[t * n + r] * scale[r];
                if (lora) {
                    v += (float) lsum[r - r0];
                }
                if (step) {
                    v *= step[t];
                }
                y[t * n + r] = accumulate ? y[t * n + r] + v : v;
            }
        }
    });
}

static void int_gemm(Backend & be, const Linear & lin, const int8_t * a, int32_t m, int32_t * acc) {
    const int64_t h = lin.kp / 2;
    std::vector<int8_t> even(m * h), odd(m * h);
    std::vector<int32_t> sums(m);
    CodesPrepared prep{even.data(), odd.data(), sums.data()};
    cpu_codes_prepare(a, m, lin.kp, prep);
    cpu_of(be).run_row_blocks(lin.n, [&](int64_t r0, int64_t r1) {
        cpu_gemm_w4a4(lin.qweight->data, prep, m, lin.kp, lin.n, r0, r1, acc);
    });
}

static void run_w4a4(Backend & be, const Linear & lin, const int8_t * a, int32_t m, float * y, bool accumulate) {
    int_gemm_epilogue(be, lin, a, m, y, accumulate, nullptr);
}

static void run_w4a4d(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    const int64_t k = lin.k;
    // per-token dynamic quantization: a = clamp(rint(x * (7 / amax))), y = (acc * scale) * (amax / 7)
    thread_local std::vector<int8_t> codes;
    codes.resize((size_t) m * lin.kp);
    std::vector<float> step(m), z(k);
    for (int32_t t = 0; t < m; t++) {
        const float * xr = x + (size_t) t * k;
        float amax = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            amax = std::max(amax, std::fabs(xr[i]));
        }
        std::fill(z.begin(), z.end(), 0.0f);
        if (amax > 0.0f) {
            const float inv = 7.0f / amax;
            for (int64_t i = 0; i < k; i++) {
                z[i] = xr[i] * inv;
            }
        }
        cpu_round_codes(z.data(), k, lin.kp, codes.data() + (size_t) t * lin.kp);
        step[t] = amax / 7.0f;
    }
    int_gemm_epilogue(be, lin, codes.data(), m, y, accumulate, step.data());
}

const LinearKernels linear_w4a4d = {"w4a4d", 0, 0, nullptr, nullptr, run_w4a4d, nullptr, int_gemm};
const LinearKernels linear_w4a4 = {"w4a4", 0, 0, prepare_w4a4, release_w4a4, nullptr, run_w4a4, int_gemm};

}  // namespace mq::cpu
