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
// float64 dot with the codes is exact), A transposed (the blocked GEMM's form) and B transposed, so lora[r] = Σ_i B[r, i]·l[i] runs in float64 as
// vector sums over blocks of rows r (kernels/lora.cpp), in the order i = 0, 1, ...
struct LoraF32 {
    std::vector<float> a;   // [rank, kp]
    std::vector<float> at;  // [kp, rank]: Aᵀ, for the blocked GEMM's first product over a block of tokens
    std::vector<float> bt;  // [rank, n]
};

static void prepare_w4a4(Backend &, Linear & lin) {
    if (lin.rank > 0) {
        LoraF32 * l = new LoraF32();
        l->a.resize(lin.rank * lin.kp);
        l->bt.resize(lin.n * lin.rank);
        cpu_f16_to_f32(lin.lora_a->as<uint16_t>(), l->a.data(), (int64_t) l->a.size());
        l->at.resize(lin.rank * lin.kp);
        for (int64_t i = 0; i < lin.rank; i++) {
            for (int64_t s = 0; s < lin.kp; s++) {
                l->at[s * lin.rank + i] = l->a[i * lin.kp + s];
            }
        }
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

// the blocked GEMM (W4a4Tiles, kernels/gemm-int4.cpp) takes blocks of this many tokens and more; a decode step
// (and any short batch) takes the row kernels, which stream the weights once with no repacking
static constexpr int32_t TILES_MIN_M = 4;

static bool use_tiles(int32_t m) {
    return m >= TILES_MIN_M && cpu_kernels().gemm_w4a4_tiles != nullptr;
}

// the blocked GEMM over all of lin's units, the threads splitting the output columns: Σ a per token and the
// low-rank branch's first product (split by tokens) first
static void run_tiles(Backend & be, const Linear & lin, const int8_t * a, int32_t m, W4a4Tiles g) {
    const int64_t kp = lin.kp;
    thread_local std::vector<int32_t> sums;
    thread_local std::vector<double> l;
    sums.resize(m);
    const LoraF32 * lora = lin.rank > 0 && !g.acc ? (const LoraF32 *) lin.prepared : nullptr;
    if (lora) {
        l.resize((size_t) m * lin.rank);
    }
    int32_t * sp = sums.data();
    double * lp = l.data();
    cpu_of(be).run_rows(m, [&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(m, ith, nth, b, e);
        for (int64_t t = b; t < e; t++) {
            int32_t s = 0;
            for (int64_t i = 0; i < kp; i++) {
                s += a[t * kp + i];
            }
            sp[t] = s;
        }
        if (lora && b < e) {
            cpu_kernels().lora_first(lora->at.data(), a, kp, lin.rank, b, e, lp);
        }
    });
    g.qw = lin.qweight->data;
    g.n = lin.n;
    g.kp = kp;
    g.m = m;
    g.a = a;
    g.a_sum = sp;
    g.scale = lin.scale->as<float>();
    if (lora) {
        g.l = lp;
        g.bt = lora->bt.data();
        g.rank = lin.rank;
    }
    const int64_t units = g.n_ff > 0 ? g.n_ff / 16 : (lin.n + 31) / 32;
    const auto tiles = cpu_kernels().gemm_w4a4_tiles;
    cpu_of(be).pool().run([&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(units, ith, nth, b, e);
        if (b < e) {
            tiles(g, b, e);
        }
    });
}

// acc = a · qᵀ (int32, exact), then y = float(acc) * scale[n] (+ low-rank branch), times the token's
// dynamic step when `step` is given; accumulate adds to y
static void int_gemm_epilogue(Backend & be, const Linear & lin, const int8_t * a, int32_t m, float * y,
                              bool accumulate, const float * step) {
    if (use_tiles(m)) {
        W4a4Tiles g{};
        g.step = step;
        g.y = y;
        g.accumulate = accumulate;
        run_tiles(be, lin, a, m, g);
        return;
    }
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
    if (use_tiles(m)) {
        W4a4Tiles g{};
        g.acc = acc;
        run_tiles(be, lin, a, m, g);
        return;
    }
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

// the static W4A4 MLP's middle: gate/up's GEMM with SwiGLU in its epilogue (z into gu, [m, n_ff]), then z into
// down's input slots, the tokens split across the threads; short batches and other shapes take the two ops
void linear_codes_swiglu_quant(Backend & be, const Linear & gate_up, const int8_t * a, int32_t m, const Linear & down,
                               int32_t n_ff, float * gu, int8_t * out) {
    if (!use_tiles(m) || gate_up.kernels->linear_codes != run_w4a4 || n_ff % 16 != 0 || gate_up.n != 2 * n_ff) {
        be.linear_codes_then_swiglu_quant(gate_up, a, m, down, n_ff, gu, out);
        return;
    }
    W4a4Tiles g{};
    g.y = gu;
    g.n_ff = n_ff;
    run_tiles(be, gate_up, a, m, g);
    const int32_t * in_map = down.in_map->as<int32_t>();
    cpu_of(be).run_rows(m, [&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(m, ith, nth, b, e);
        for (int64_t t = b; t < e; t++) {
            cpu_expand_slots(gu + t * n_ff, in_map, down.kp, out + t * down.kp);
        }
    });
}

const LinearKernels linear_w4a4d = {"w4a4d", 0, 0, nullptr, nullptr, run_w4a4d, nullptr, int_gemm};
const LinearKernels linear_w4a4 = {"w4a4", 0, 0, prepare_w4a4, release_w4a4, nullptr, run_w4a4, int_gemm};

}  // namespace mq::cpu
