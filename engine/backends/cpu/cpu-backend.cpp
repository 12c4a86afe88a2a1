// The CPU backend: the reference implementation of every op, multithreaded, with SIMD inner loops
// (AVX-512 or AVX2+F16C when the compiler targets them, plain C++ otherwise). fp32 activations,
// fp32 accumulation, fp16 or int8 KV cache (docs/numerics.md).
#include "cpu-threadpool.h"
#include "cpu-attention.h"
#include "cpu-ops.h"
#include "cpu-quant.h"

#include "../../src/mq-backend.h"
#include "../../src/mq-error.h"
#include "../../src/mq-file.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace mq {

static void split_range(int64_t n, int32_t ith, int32_t nth, int64_t & begin, int64_t & end) {
    int64_t per = (n + nth - 1) / nth;
    begin = std::min<int64_t>(n, per * ith);
    end = std::min<int64_t>(n, begin + per);
}

// The float values that feed a rounding to int4 are computed in float64 and rounded once to fp32, so
// they equal the simulator's bit for bit whatever the summation order (docs/numerics.md).

// r = 1 / sqrt(mean(x²) + eps), the RMSNorm factor of one row
static float rms_factor(const float * x, int32_t dim, float eps) {
    const double ss = cpu_dot_f64(x, x, dim);
    return (float) (1.0 / std::sqrt(ss / dim + (double) eps));
}

// silu(g) * u = g / (1 + exp(-g)) * u
static inline float swiglu_value(float g, float u) {
    const double gd = g;
    return (float) (gd / (1.0 + std::exp(-gd)) * (double) u);
}

class BackendCpu : public Backend {
public:
    explicit BackendCpu(int32_t n_threads) : pool_(n_threads) {}

    std::string name() const override { return "cpu"; }

    void * alloc(size_t bytes) override {
        void * p = nullptr;
        if (posix_memalign(&p, 64, std::max<size_t>(bytes, 64)) != 0) {
            throw Error("out of memory allocating " + std::to_string(bytes) + " bytes");
        }
        return p;
    }
    void free(void * p) override { std::free(p); }
    void upload(void * dst, const void * src, size_t bytes) override { memcpy(dst, src, bytes); }
    void download(void * dst, const void * src, size_t bytes) override { memcpy(dst, src, bytes); }
    void synchronize() override {}

    // the CPU reads every weight straight from the mapping; only the low-rank branch is widened to fp32: A (its
    // float64 dot with the codes is exact) and B transposed, so lora[r] = Σ_i B[r, i]·l[i] runs in float64 as
    // rank vector updates over the rows r, summed in the order i = 0, 1, ...
    struct LoraF32 {
        std::vector<float> a;   // [rank, kp]
        std::vector<float> bt;  // [rank, n]
    };

    void prepare_linear(Linear & lin) override {
        if (lin.scheme != "f16" && lin.scheme != "w4a16g" && lin.scheme != "w4a4d" && lin.scheme != "w4a4") {
            throw Error("linear '" + lin.name + "': the CPU backend does not support scheme '" + lin.scheme + "'");
        }
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
    void release_linear(Linear & lin) override {
        if (lin.rank > 0) {
            delete (LoraF32 *) lin.prepared;
        }
        lin.prepared = nullptr;
    }

    void * upload_copy(const void * src, size_t bytes) override {
        void * p = alloc(bytes);
        memcpy(p, src, bytes);
        return p;
    }

    void embed_f16(const void * table, const int32_t * ids, int32_t n, int32_t dim, float * out) override {
        const uint16_t * t = (const uint16_t *) table;
        for (int32_t i = 0; i < n; i++) {
            cpu_f16_to_f32(t + (size_t) ids[i] * dim, out + (size_t) i * dim, dim);
        }
    }

    void rmsnorm(const float * x, const float * w, int32_t n_rows, int32_t dim, float eps, float * out) override {
        run_rows(n_rows, [&](int32_t ith, int32_t nth) {
            int64_t b, e;
            split_range(n_rows, ith, nth, b, e);
            for (int64_t r = b; r < e; r++) {
                const float * xr = x + r * dim;
                float * o = out + r * dim;
                // y = (x * r) * w
                const float inv = rms_factor(xr, dim, eps);
                for (int32_t i = 0; i < dim; i++) {
                    o[i] = xr[i] * inv * w[i];
                }
            }
        });
    }

    void linear(const Linear & lin, const float * x, int32_t m, float * y, bool accumulate) override {
        const int64_t n = lin.n, k = lin.k;
        if (lin.scheme == "f16") {
            const uint16_t * w = lin.tensors[0]->as<uint16_t>();
            run_row_blocks(n, [&](int64_t r0, int64_t r1) { cpu_gemm_f16(w, x, y, m, n, k, r0, r1, accumulate); });
        } else if (lin.scheme == "w4a16g") {
            run_row_blocks(n, [&](int64_t r0, int64_t r1) {
                cpu_gemm_w4a16g(lin.qweight->data, lin.scale->as<uint16_t>(), x, y, m, n, k, lin.group, r0, r1,
                                accumulate);
            });
        } else if (lin.scheme == "w4a4d") {
            // per-token dynamic quantization: a = clamp(rint(x * (7 / amax))), y = (acc * scale) * (amax / 7)
            std::vector<int8_t> & codes = scratch_codes(m * lin.kp);
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
            int_gemm_epilogue(lin, codes.data(), m, y, accumulate, step.data());
        } else {
            throw Error("linear '" + lin.name + "': scheme '" + lin.scheme + "' takes integer codes, not floats");
        }
    }

    void rmsnorm_quant(const float * x, const Linear & c, int32_t m, int32_t dim, float eps, int8_t * out) override {
        const float * in_scale = c.in_scale->as<float>();
        const int32_t * in_map = c.in_map->as<int32_t>();
        run_rows(m, [&](int32_t ith, int32_t nth) {
            int64_t b, e;
            split_range(m, ith, nth, b, e);
            std::vector<float> z(dim);
            for (int64_t r = b; r < e; r++) {
                const float * xr = x + r * dim;
                // z_j = (x_j * r) * in_scale_j
                const float inv = rms_factor(xr, dim, eps);
                for (int32_t i = 0; i < dim; i++) {
                    z[i] = (xr[i] * inv) * in_scale[i];
                }
                cpu_expand_slots(z.data(), in_map, c.kp, out + r * c.kp);
            }
        });
    }

    void quantize_codes(const float * x, int32_t m, int32_t k, const Linear & c, int8_t * out) override {
        for (int32_t t = 0; t < m; t++) {
            cpu_round_codes(x + (size_t) t * k, k, c.kp, out + (size_t) t * c.kp);
        }
    }

    void swiglu_quant(const float * gu, const Linear & c, int32_t m, int32_t n_ff, int8_t * out) override {
        const int32_t * in_map = c.in_map->as<int32_t>();
        std::vector<float> z(n_ff);
        for (int32_t t = 0; t < m; t++) {
            const float * g = gu + (size_t) t * 2 * n_ff;
            const float * u = g + n_ff;
            for (int32_t j = 0; j < n_ff; j++) {
                z[j] = swiglu_value(g[j], u[j]);
            }
            cpu_expand_slots(z.data(), in_map, c.kp, out + (size_t) t * c.kp);
        }
    }

    void int_gemm(const Linear & lin, const int8_t * a, int32_t m, int32_t * acc) override {
        if (lin.kp == 0) {
            throw Error("linear '" + lin.name + "': scheme '" + lin.scheme + "' has no integer GEMM");
        }
        const int64_t h = lin.kp / 2;
        std::vector<int8_t> even(m * h), odd(m * h);
        std::vector<int32_t> sums(m);
        CodesPrepared prep{even.data(), odd.data(), sums.data()};
        cpu_codes_prepare(a, m, lin.kp, prep);
        run_row_blocks(lin.n, [&](int64_t r0, int64_t r1) {
            cpu_gemm_w4a4(lin.qweight->data, prep, m, lin.kp, lin.n, r0, r1, acc);
        });
    }

    void linear_codes(const Linear & lin, const int8_t * a, int32_t m, float * y, bool accumulate) override {
        if (lin.scheme != "w4a4") {
            throw Error("linear '" + lin.name + "': scheme '" + lin.scheme + "' does not take integer codes");
        }
        int_gemm_epilogue(lin, a, m, y, accumulate, nullptr);
    }

    void rope(float * qkv, int32_t n_tokens, int32_t row_stride, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
              const int32_t * pos, const RopeParams & rp) override {
        const int32_t half = head_dim / 2;
        std::vector<double> inv_freq(half);
        for (int32_t i = 0; i < half; i++) {
            inv_freq[i] = rope_inv_freq(i, head_dim, rp);
        }
        for (int32_t t = 0; t < n_tokens; t++) {
            float * row = qkv + (size_t) t * row_stride;
            for (int32_t i = 0; i < half; i++) {
                // angle in float64 so long positions stay exact; cos/sin rounded to fp32
                const double ang = (double) pos[t] * inv_freq[i];
                const float c = (float) std::cos(ang), sn = (float) std::sin(ang);
                for (int32_t h = 0; h < n_head + n_head_kv; h++) {
                    float * v = row + (size_t) h * head_dim;
                    const float a = v[i], b = v[i + half];
                    // rotate_half: (a, b) -> (a cos - b sin, b cos + a sin)
                    v[i] = a * c - b * sn;
                    v[i + half] = b * c + a * sn;
                }
            }
        }
    }

    void kv_store(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                  const int32_t * pos, const KvScales & sc, void * k_cache, void * v_cache) override {
        // K/V cache <- fp16(k), fp16(v), or int8 codes clamp(rint(x * inv_c), -127, 127) (docs/numerics.md)
        const int32_t kv_dim = s.n_head_kv * s.head_dim;
        const int32_t q_dim = s.n_head * s.head_dim;
        const bool i8 = s.kv_type == KV_TYPE_I8;
        if (i8 && (!sc.k_inv || !sc.v_inv)) {
            throw Error("kv_store: the int8 KV cache needs its scales");
        }
        for (int32_t t = 0; t < n_tokens; t++) {
            const float * kv = qkv + (size_t) t * row_stride + q_dim;  // k [kv_dim], then v [kv_dim]
            const size_t off = (size_t) pos[t] * kv_dim;
            if (i8) {
                cpu_f32_to_i8_scaled(kv, sc.k_inv, (int8_t *) k_cache + off, kv_dim);
                cpu_f32_to_i8_scaled(kv + kv_dim, sc.v_inv, (int8_t *) v_cache + off, kv_dim);
            } else {
                cpu_f32_to_f16(kv, (uint16_t *) k_cache + off, kv_dim);
                cpu_f32_to_f16(kv + kv_dim, (uint16_t *) v_cache + off, kv_dim);
            }
        }
    }

    void attention(const float * qkv, int32_t n_tokens, int32_t row_stride, const AttentionShape & s,
                   const int32_t * pos, const KvScales & sc, const void * k_cache, const void * v_cache,
                   float * out) override {
        // qc = fp32(fp16(q) * c), c = fp32(1/sqrt(hd)); over cache rows 0..pos: s_j = qc · k_j, p_j = exp(s_j - max),
        // o = (Σ p_j v_j) / Σ p_j; the sums and exp in float64, o rounded once to fp32 (docs/numerics.md).
        // k_j, v_j are the cache rows as fp32: fp16 widened, or int8 codes times their steps float(code) * s_c.
        const int32_t hd = s.head_dim, kv_dim = s.n_head_kv * hd, group = s.n_head / s.n_head_kv;
        const float scale = (float) (1.0 / std::sqrt((double) hd));
        const bool i8 = s.kv_type == KV_TYPE_I8;
        if (i8 && (!sc.k_scale || !sc.v_scale)) {
            throw Error("attention: the int8 KV cache needs its scales");
        }
        // one task per (token, kv head), for the query heads that read it; a chunk takes every nth task so
        // the long causal rows of the last tokens spread over all chunks
        const int64_t n_work = (int64_t) n_tokens * s.n_head_kv;
        pool_.run([&](int32_t ith, int32_t nth) {
            std::vector<float> q((size_t) group * hd);
            std::vector<uint16_t> qh((size_t) group * hd);
            for (int64_t w = ith; w < n_work; w += nth) {
                const int32_t t = (int32_t) (w / s.n_head_kv), kvh = (int32_t) (w % s.n_head_kv);
                const size_t h0 = (size_t) kvh * group * hd;
                cpu_f32_to_f16(qkv + (size_t) t * row_stride + h0, qh.data(), (int64_t) group * hd);
                cpu_f16_to_f32(qh.data(), q.data(), (int64_t) group * hd);
                for (float & v : q) {
                    v *= scale;
                }
                const size_t off = (size_t) kvh * hd;
                const KvRows rows{i8 ? (const void *) ((const int8_t *) k_cache + off)
                                     : (const void *) ((const uint16_t *) k_cache + off),
                                  i8 ? (const void *) ((const int8_t *) v_cache + off)
                                     : (const void *) ((const uint16_t *) v_cache + off),
                                  i8 ? sc.k_scale + off : nullptr, i8 ? sc.v_scale + off : nullptr, kv_dim, i8};
                cpu_attention_heads(q.data(), group, hd, rows, pos[t] + 1,
                                    out + (size_t) t * s.n_head * hd + h0);
            }
        });
    }

    void swiglu(const float * gu, int32_t m, int32_t n_ff, float * out) override {
        for (int32_t r = 0; r < m; r++) {
            const float * g = gu + (size_t) r * 2 * n_ff;
            const float * u = g + n_ff;
            float * o = out + (size_t) r * n_ff;
            for (int32_t j = 0; j < n_ff; j++) {
                o[j] = swiglu_value(g[j], u[j]);
            }
        }
    }

private:
    // acc = a · qᵀ (int32, exact), then y = float(acc) * scale[n] (+ low-rank branch), times the token's
    // dynamic step when `step` is given; accumulate adds to y
    void int_gemm_epilogue(const Linear & lin, const int8_t * a, int32_t m, float * y, bool accumulate,
                           const float * step) {
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
        std::vector<double> l;
        if (lora) {
            l.resize((size_t) m * lin.rank);
            std::vector<float> af(kp);
            for (int32_t t = 0; t < m; t++) {
                for (int64_t s = 0; s < kp; s++) {
                    af[s] = a[t * kp + s];
                }
                for (int64_t i = 0; i < lin.rank; i++) {
                    l[t * lin.rank + i] = cpu_dot_f64(lora->a.data() + i * kp, af.data(), kp);
                }
            }
        }
        // thread_local names inside the job would resolve to each worker's own copy: pass pointers
        int32_t * accp = acc.data();
        run_row_blocks(n, [&](int64_t r0, int64_t r1) {
            cpu_gemm_w4a4(lin.qweight->data, prep, m, kp, n, r0, r1, accp);
            thread_local std::vector<double> lsum;  // this worker's lora[r0 .. r1) of one token
            lsum.resize(r1 - r0);
            for (int32_t t = 0; t < m; t++) {
                if (lora) {
                    std::fill(lsum.begin(), lsum.end(), 0.0);
                    for (int64_t i = 0; i < lin.rank; i++) {
                        cpu_axpy_f64(l[t * lin.rank + i], lora->bt.data() + i * n + r0, lsum.data(), r1 - r0);
                    }
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

    std::vector<int8_t> & scratch_codes(size_t n) {
        thread_local std::vector<int8_t> codes;
        codes.resize(n);
        return codes;
    }

    // rows of a linear split across threads in blocks of 16, so each thread streams its own weights once
    void run_row_blocks(int64_t n, const std::function<void(int64_t, int64_t)> & fn) {
        const int64_t block = 16, n_blocks = (n + block - 1) / block;
        pool_.run([&](int32_t ith, int32_t nth) {
            int64_t b, e;
            split_range(n_blocks, ith, nth, b, e);
            if (b < e) {
                fn(b * block, std::min(n, e * block));
            }
        });
    }

    // a job over rows; a single row is not worth waking the other threads for
    void run_rows(int64_t n_rows, const std::function<void(int32_t, int32_t)> & fn) {
        if (n_rows < 2) {
            fn(0, 1);
        } else {
            pool_.run(fn);
        }
    }

    ThreadPool pool_;
};

double rope_inv_freq(int32_t i, int32_t head_dim, const RopeParams & rp) {
    // theta^(-2i/d) in float64, with Llama-3 frequency scaling when configured (docs/numerics.md)
    const double f = std::pow((double) rp.theta, -(2.0 * i) / head_dim);
    if (rp.factor <= 0.0f) {
        return f;
    }
    const double pi = 3.14159265358979323846;
    const double wavelen = 2.0 * pi / f;
    double smooth = ((double) rp.original_max_pos / wavelen - rp.low_freq_factor) /
                    ((double) rp.high_freq_factor - rp.low_freq_factor);
    smooth = std::min(1.0, std::max(0.0, smooth));
    return (1.0 - smooth) * f / rp.factor + smooth * f;
}

std::unique_ptr<Backend> backend_cpu_create(int32_t n_threads) {
    return std::unique_ptr<Backend>(new BackendCpu(n_threads));
}

}  // namespace mq
