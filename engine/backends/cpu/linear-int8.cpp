// Schemes w8a8, w4a8, w4a8g and w8a8s on the CPU (docs/numerics.md, "Dynamic int8 activations"): the linear quantizes
// each token of its fp32 input to int8 codes itself (amax, then one multiply and a rounding per value), runs the
// exact int32 GEMM over the file's integer weights (kernels/gemm-int8.cpp: GEMV for one token, blocks of rows and
// tokens for several) and applies y = ((float(acc) * scale[n]) * (amax / qmax)) (+ bias[n]). w8a8s quantizes with
// its static per-channel steps and shift instead and runs the same int8 GEMM.
#include "cpu-backend.h"
#include "cpu-simd.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

namespace mq::cpu {

// w8a8's weight row sums Σ_k w[n, k], the offset of the AVX-512 path's biased activations (made once at load;
// released by release_row_sums, as w4a8's)
static void prepare_w8a8(Backend &, Linear & lin) {
    int32_t * sums = new int32_t[lin.n];
    const int8_t * w = lin.qweight->as<int8_t>();
    for (int64_t r = 0; r < lin.n; r++) {
        int32_t s = 0;
        for (int64_t i = 0; i < lin.k; i++) {
            s += w[r * lin.k + i];
        }
        sums[r] = s;
    }
    lin.prepared = sums;
}

// w4a8/w4a8g's integer weight row sums Σ_k q[n, k] · g[n, k / group], likewise
static void prepare_w4a8(Backend &, Linear & lin) {
    int32_t * sums = new int32_t[lin.n];
    const int64_t h = lin.kp / 2, group = lin.gscale ? lin.group : lin.kp, ng = lin.kp / group;
    for (int64_t r = 0; r < lin.n; r++) {
        const uint8_t * q = lin.qweight->data + r * h;
        int32_t s = 0;
        for (int64_t i = 0; i < h; i++) {
            const int32_t lo = q[i] & 0xF, hi = q[i] >> 4;
            const int32_t g = lin.gscale ? lin.gscale->as<uint8_t>()[r * ng + 2 * i / group] : 1;
            s += g * ((lo - 16 * (lo >= 8)) + (hi - 16 * (hi >= 8)));
        }
        sums[r] = s;
    }
    lin.prepared = sums;
}

static void release_row_sums(Backend &, Linear & lin) {
    delete[] (int32_t *) lin.prepared;
    lin.prepared = nullptr;
}

static int64_t round64(int64_t k) {
    return (k + 63) / 64 * 64;
}

// the activation operand of the int4-weight GEMM: even and odd codes apart and each group's code sum, in buffers
// of the calling thread that grow to the largest call and are reused (no allocation per call)
struct Int8Operand {
    int8_t * even;
    int8_t * odd;
    int32_t * gsum;
    Int8Prepared view() const { return {even, odd, gsum}; }
};

static int64_t w4a8_group(const Linear & lin) {
    return lin.gscale ? lin.group : lin.kp;  // w4a8: one group of the whole (padded) row
}

static Int8Operand prepare_operand(const Linear & lin, const int8_t * a, int32_t m) {
    const int64_t kp = lin.kp, h = kp / 2, group = w4a8_group(lin), ng = kp / group;
    thread_local std::vector<int8_t> even, odd;
    thread_local std::vector<int32_t> gsum;
    even.resize((size_t) m * h);
    odd.resize((size_t) m * h);
    gsum.assign((size_t) m * ng, 0);
    Int8Operand op{even.data(), odd.data(), gsum.data()};
    for (int32_t t = 0; t < m; t++) {
        const int8_t * src = a + (size_t) t * kp;
        for (int64_t i = 0; i < h; i++) {
            op.even[t * h + i] = src[2 * i];
            op.odd[t * h + i] = src[2 * i + 1];
        }
        for (int64_t i = 0; i < kp; i++) {
            op.gsum[t * ng + i / group] += src[i];
        }
    }
    return op;
}

// the int8-weight schemes: qweight I8 [n, k] read by cpu_gemm_w8a8
static bool int8_weights(const Linear & lin) {
    return lin.scheme == "w8a8" || lin.scheme == "w8a8s";
}

// acc [m, n] = a · wᵀ for codes a [m, ·] with rows `stride` apart (w8a8: a multiple of 64, zeros beyond k; the
// 4-bit-weight schemes: lin.kp), rows split across the threads in blocks; `epilogue(r0, r1)`, when given, runs in
// the same job on the rows just summed
static void gemm_rows(Backend & be, const Linear & lin, const int8_t * a, int64_t stride, int32_t m, int32_t * acc,
                      const std::function<void(int64_t, int64_t)> & epilogue) {
    if (int8_weights(lin)) {
        const int8_t * w = lin.qweight->as<int8_t>();
        const int32_t * wsum = (const int32_t *) lin.prepared;
        cpu_of(be).run_row_blocks(lin.n, [&](int64_t r0, int64_t r1) {
            cpu_gemm_w8a8(w, wsum, a, stride, m, lin.k, lin.n, r0, r1, acc);
            if (epilogue) {
                epilogue(r0, r1);
            }
        });
        return;
    }
    const Int8Prepared view = prepare_operand(lin, a, m).view();
    const uint8_t * gs = lin.gscale ? lin.gscale->as<uint8_t>() : nullptr;
    const int64_t group = w4a8_group(lin);
    cpu_of(be).run_row_blocks(lin.n, [&](int64_t r0, int64_t r1) {
        cpu_gemm_w4a8(lin.qweight->data, gs, group, (const int32_t *) lin.prepared, view, m, lin.kp, lin.n, r0, r1, acc);
        if (epilogue) {
            epilogue(r0, r1);
        }
    });
}

// the rows of the codes the GEMM reads: w8a8's padded to a multiple of 64 (the kernels' unit of K)
static int64_t code_stride(const Linear & lin) {
    return int8_weights(lin) ? round64(lin.k) : lin.kp;
}

// the integer core on given codes a [m, lin.kp] (for tests)
static void int_gemm(Backend & be, const Linear & lin, const int8_t * a, int32_t m, int32_t * acc) {
    const int64_t stride = code_stride(lin);
    std::vector<int8_t> padded((size_t) m * stride, 0);
    for (int32_t t = 0; t < m; t++) {
        std::copy(a + (size_t) t * lin.kp, a + (size_t) (t + 1) * lin.kp, padded.begin() + (size_t) t * stride);
    }
    gemm_rows(be, lin, padded.data(), stride, m, acc, nullptr);
}

static void run_int8(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    const int64_t k = lin.k, n = lin.n, stride = code_stride(lin);
    // per-token dynamic quantization: a = clamp(rint(x * (qmax / amax)), -qmax, qmax), step = amax / qmax
    // (buffers of the calling thread, reused across calls; the jobs get pointers, since a thread_local name inside
    // a job would resolve to each worker's own copy)
    thread_local std::vector<int8_t> codes_buf;
    thread_local std::vector<float> step_buf;
    thread_local std::vector<int32_t> acc_buf;
    codes_buf.resize((size_t) m * stride);
    step_buf.resize(m);
    acc_buf.resize((size_t) m * n);
    int8_t * codes = codes_buf.data();
    float * step = step_buf.data();
    int32_t * acc = acc_buf.data();
    cpu_of(be).run_rows(m, [&](int32_t ith, int32_t nth) {  // the tokens of a prefill split across the threads
        int64_t b, e;
        split_range(m, ith, nth, b, e);
        for (int64_t t = b; t < e; t++) {
            const float amax = cpu_quant_row_i8(x + t * k, k, stride, lin.qmax, codes + t * stride);
            step[t] = amax / (float) lin.qmax;
        }
    });
    const float * scale = lin.scale->as<float>();
    const float * bias = lin.bias ? lin.bias->as<float>() : nullptr;
    const int32_t * accp = acc;
    const float * stepp = step;
    gemm_rows(be, lin, codes, stride, m, acc, [&](int64_t r0, int64_t r1) {
        for (int32_t t = 0; t < m; t++) {
            for (int64_t r = r0; r < r1; r++) {
                float v = ((float) accp[t * n + r] * scale[r]) * stepp[t];
                if (bias) {
                    v = v + bias[r];
                }
                y[t * n + r] = accumulate ? y[t * n + r] + v : v;
            }
        }
    });
}

// w8a8s (docs/numerics.md, "Static int8 activations"): a = clamp(rint((x[k] - shift[k]) * in_scale[k]), -qmax, qmax)
// (one fp32 subtraction and one multiply per value; zeros from k to the stride), the same GEMM as w8a8, and
// y = (float(acc) * scale[n]) + bias[n]
static void run_w8a8s(Backend & be, const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) {
    const int64_t k = lin.k, n = lin.n, stride = code_stride(lin);
    thread_local std::vector<int8_t> codes_buf;
    thread_local std::vector<int32_t> acc_buf;
    codes_buf.resize((size_t) m * stride);
    acc_buf.resize((size_t) m * n);
    int8_t * codes = codes_buf.data();
    int32_t * acc = acc_buf.data();
    const float * inv = lin.in_scale->as<float>();
    const float * shift = lin.shift->as<float>();
    const float qmax = (float) lin.qmax;
    cpu_of(be).run_rows(m, [&](int32_t ith, int32_t nth) {
        int64_t b, e;
        split_range(m, ith, nth, b, e);
        for (int64_t t = b; t < e; t++) {
            const float * xr = x + t * k;
            int8_t * a = codes + t * stride;
            for (int64_t i = 0; i < k; i++) {
                const float v = std::nearbyint((xr[i] - shift[i]) * inv[i]);
                a[i] = v != v ? (int8_t) 0 : (int8_t) (v < -qmax ? -qmax : (v > qmax ? qmax : v));  // NaN: 0, as CUDA
            }
            std::fill(a + k, a + stride, (int8_t) 0);
        }
    });
    const float * scale = lin.scale->as<float>();
    const float * bias = lin.bias->as<float>();
    const int32_t * accp = acc;
    gemm_rows(be, lin, codes, stride, m, acc, [&](int64_t r0, int64_t r1) {
        for (int32_t t = 0; t < m; t++) {
            for (int64_t r = r0; r < r1; r++) {
                const float v = ((float) accp[t * n + r] * scale[r]) + bias[r];
                y[t * n + r] = accumulate ? y[t * n + r] + v : v;
            }
        }
    });
}

const LinearKernels linear_w8a8 = {"w8a8", 0, 0, prepare_w8a8, release_row_sums, run_int8, nullptr, int_gemm};
const LinearKernels linear_w4a8 = {"w4a8", 0, 0, prepare_w4a8, release_row_sums, run_int8, nullptr, int_gemm};
const LinearKernels linear_w4a8g = {"w4a8g", 0, 64, prepare_w4a8, release_row_sums, run_int8, nullptr, int_gemm};
const LinearKernels linear_w8a8s = {"w8a8s", 0, 0, prepare_w8a8, release_row_sums, run_w8a8s, nullptr, int_gemm};

}  // namespace mq::cpu
