// Compares every op of the CUDA backend with the CPU backend (the reference) on random inputs, then,
// when model files are given, the logits of a prefill and of single-token decode steps on both backends.
// Integer and copy results must match exactly; float results within the tolerances of docs/numerics.md.
//
//   test-cuda-ops [model.mq ...]        prints one line per check and "N passed, M failed"
#include "../../src/mq-backend.h"
#include "../../src/mq-context.h"
#include "../../src/mq-error.h"
#include "../../src/mq-file.h"
#include "../../src/mq-model.h"
#include "../../src/mq-vocab.h"
#include "cublas.cuh"
#include "gemm-cublas-i8.cuh"
#include "linear-w4a4.cuh"
#include "sampling.cuh"
#include "../../src/mq-sampling.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

using namespace mq;

static int g_pass = 0, g_fail = 0;
static void report(const std::string & what, bool ok, const std::string & detail = "") {
    (ok ? g_pass : g_fail)++;
    printf("  %-60s %-24s %s\n", what.c_str(), detail.c_str(), ok ? "ok" : "FAILED");
}

static uint16_t f32_to_f16(float f) {  // round to nearest even, normal range only (test data)
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, absx = x & 0x7FFFFFFF;
    if (absx < 0x38800000) return (uint16_t) sign;
    uint32_t r = absx - 0x38000000;
    r += 0x0FFF + ((r >> 13) & 1);
    return (uint16_t) (sign | (r >> 13));
}

struct Pair {  // the same buffer on both backends
    Backend & cpu;
    Backend & gpu;
    void * c = nullptr;
    void * g = nullptr;
    size_t bytes;
    Pair(Backend & cb, Backend & gb, const void * host, size_t n) : cpu(cb), gpu(gb), bytes(n) {
        c = cpu.alloc(n);
        g = gpu.alloc(n);
        if (host) {
            cpu.upload(c, host, n);
            gpu.upload(g, host, n);
        }
    }
    ~Pair() {
        cpu.free(c);
        gpu.free(g);
    }
    template <class T> std::vector<T> host_cpu() const {
        std::vector<T> v(bytes / sizeof(T));
        cpu.download(v.data(), c, bytes);
        return v;
    }
    template <class T> std::vector<T> host_gpu() const {
        std::vector<T> v(bytes / sizeof(T));
        gpu.download(v.data(), g, bytes);
        return v;
    }
};

// ‖a − b‖ / ‖a‖, and whether every value is finite
static double rel_err(const std::vector<float> & ref, const std::vector<float> & got, bool & finite) {
    double num = 0, den = 0;
    finite = true;
    for (size_t i = 0; i < ref.size(); i++) {
        finite &= std::isfinite(got[i]);
        num += ((double) got[i] - ref[i]) * ((double) got[i] - ref[i]);
        den += (double) ref[i] * ref[i];
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

static void check_close(const std::string & what, const Pair & p, double tol) {
    bool finite;
    const double e = rel_err(p.host_cpu<float>(), p.host_gpu<float>(), finite);
    char d[64];
    snprintf(d, sizeof d, "rel.err %.2e", e);
    report(what, finite && e <= tol, d);
}

static std::vector<float> randn(size_t n, std::mt19937 & rng, float sd = 1.0f) {
    std::normal_distribution<float> nd(0.0f, sd);
    std::vector<float> v(n);
    for (auto & x : v) x = nd(rng);
    return v;
}

// One round of rope, kv_store and attention (see test_ops) on a cache of type kt. int8: per-channel steps
// s_c in [2, 4] / 127 (the rotated values are N(0, 1): some of them clip) and their inverses fp32(1 / s_c),
// as the model loader makes them; the caches must be identical bytes, the attention within 1e-5.
static void test_attention(Backend & cpu, Backend & gpu, int round, KvType kt, std::mt19937 & rng) {
    const int H = 4, Hkv = 2, hd = round == 2 ? 96 : round ? 128 : 64, T = round == 1 ? 300 : 40, n_ctx = 512;
    const int stride = (H + 2 * Hkv) * hd, kv_dim = Hkv * hd;
    RopeParams rp{10000.0f, 0.0f, 0.0f, 0.0f, 0};
    if (round == 1) rp = RopeParams{500000.0f, 8.0f, 1.0f, 4.0f, 8192};
    AttentionShape as{H, Hkv, hd, n_ctx, kt};
    const size_t cache_bytes = (size_t) n_ctx * kv_dim * kv_elem_size(kt);
    std::vector<uint8_t> zeros(cache_bytes, 0);
    Pair kc(cpu, gpu, zeros.data(), cache_bytes), vc(cpu, gpu, zeros.data(), cache_bytes);
    // [k scale | k inv | v scale | v inv], fp32 [kv_dim] each
    std::vector<float> steps(4 * (size_t) kv_dim);
    for (int w = 0; w < 2; w++) {
        for (int c = 0; c < kv_dim; c++) {
            const float st = std::uniform_real_distribution<float>(2.0f, 4.0f)(rng) / 127.0f;
            steps[(2 * w) * kv_dim + c] = st;
            steps[(2 * w + 1) * kv_dim + c] = 1.0f / st;
        }
    }
    Pair ps(cpu, gpu, steps.data(), steps.size() * 4);
    auto scales = [&](void * base) {
        KvScales k;
        if (kt == KV_TYPE_I8) {
            const float * f = (const float *) base;
            k.k_scale = f, k.k_inv = f + kv_dim, k.v_scale = f + 2 * kv_dim, k.v_inv = f + 3 * kv_dim;
        }
        return k;
    };
    const KvScales sc_c = scales(ps.c), sc_g = scales(ps.g);
    const std::string type = kt == KV_TYPE_I8 ? " int8" : " fp16";
    for (int step = 0; step < 3; step++) {
        const int n = step == 0 ? T : step == 1 ? 1 : 5, pos0 = step == 0 ? 0 : step == 1 ? T : T + 1;
        auto qkv = randn((size_t) n * stride, rng);
        // v in the range of o_proj's int4 codes; in the hd 96 round every v row the same half-integers, so that
        // with the fp16 cache every attention output lies on a rounding boundary (attention_quant's exact path)
        for (int t = 0; t < n; t++)
            for (int i = 0; i < kv_dim; i++) {
                float & v = qkv[(size_t) t * stride + (H + Hkv) * hd + i];
                v = round == 2 ? (float) (i % 16) - 7.5f : 6.0f * v;
            }
        std::vector<int32_t> pos(n);
        for (int i = 0; i < n; i++) pos[i] = pos0 + i;
        Pair pq(cpu, gpu, qkv.data(), qkv.size() * 4), pp(cpu, gpu, pos.data(), n * 4),
            out(cpu, gpu, nullptr, (size_t) n * H * hd * 4);
        const std::string tag =
            " hd=" + std::to_string(hd) + " n=" + std::to_string(n) + " pos0=" + std::to_string(pos0);
        {  // the fused op against the GPU's own two launches: the same rotated values and cache bytes
            Pair q1(cpu, gpu, qkv.data(), qkv.size() * 4), q2(cpu, gpu, qkv.data(), qkv.size() * 4);
            Pair k1(cpu, gpu, zeros.data(), cache_bytes), v1(cpu, gpu, zeros.data(), cache_bytes),
                k2(cpu, gpu, zeros.data(), cache_bytes), v2(cpu, gpu, zeros.data(), cache_bytes);
            gpu.rope((float *) q1.g, n, stride, H, Hkv, hd, (int32_t *) pp.g, rp);
            gpu.kv_store((float *) q1.g, n, stride, as, (int32_t *) pp.g, sc_g, k1.g, v1.g);
            gpu.rope_kv_store((float *) q2.g, n, stride, as, (int32_t *) pp.g, rp, sc_g, k2.g, v2.g);
            const auto a = q1.host_gpu<float>(), b = q2.host_gpu<float>();
            report("rope_kv_store" + type + tag, memcmp(a.data(), b.data(), a.size() * 4) == 0 &&
                                                     k1.host_gpu<uint8_t>() == k2.host_gpu<uint8_t>() &&
                                                     v1.host_gpu<uint8_t>() == v2.host_gpu<uint8_t>(),
                   "the same values and" + type + " cache bytes as rope + kv_store");
        }
        cpu.rope((float *) pq.c, n, stride, H, Hkv, hd, (int32_t *) pp.c, rp);
        gpu.rope((float *) pq.g, n, stride, H, Hkv, hd, (int32_t *) pp.g, rp);
        // float64 angles, fp32 cos/sin and products rounded on their own on both: equal but for a last-bit
        // difference of cos/sin between the two libraries' float64 functions (rare)
        check_close("rope" + tag, pq, 1e-6);
        {
            const auto rc = pq.host_cpu<float>(), rg = pq.host_gpu<float>();
            size_t same = 0;
            for (size_t i = 0; i < rc.size(); i++) same += rc[i] == rg[i];
            report("rope" + tag + " bit-identical values", same >= rc.size() * 0.999,
                   std::to_string(100.0 * same / rc.size()) + "%");
        }
        // the attention inputs must be the same on both sides: continue from the CPU's rotated qkv
        const auto rotated = pq.host_cpu<float>();
        gpu.upload(pq.g, rotated.data(), rotated.size() * 4);
        cpu.kv_store((float *) pq.c, n, stride, as, (int32_t *) pp.c, sc_c, kc.c, vc.c);
        gpu.kv_store((float *) pq.g, n, stride, as, (int32_t *) pp.g, sc_g, kc.g, vc.g);
        report("kv_store" + type + tag, kc.host_cpu<uint8_t>() == kc.host_gpu<uint8_t>() &&
                                            vc.host_cpu<uint8_t>() == vc.host_gpu<uint8_t>(), type + " caches exact");
        cpu.attention((float *) pq.c, n, stride, as, (int32_t *) pp.c, sc_c, kc.c, vc.c, (float *) out.c);
        gpu.attention((float *) pq.g, n, stride, as, (int32_t *) pp.g, sc_g, kc.g, vc.g, (float *) out.g);
        check_close("attention" + type + tag, out, 1e-5);
        // its output rounded to int4 codes: the CPU's exactly (the GPU mends the values near x.5 in float64)
        Linear consumer;
        consumer.name = "o_proj", consumer.scheme = "w4a4", consumer.kp = (H * hd + 63) / 64 * 64;
        Pair codes(cpu, gpu, nullptr, (size_t) n * consumer.kp);
        cpu.attention_quant((float *) pq.c, n, stride, as, (int32_t *) pp.c, sc_c, kc.c, vc.c, (float *) out.c, consumer,
                            (int8_t *) codes.c);
        gpu.attention_quant((float *) pq.g, n, stride, as, (int32_t *) pp.g, sc_g, kc.g, vc.g, (float *) out.g, consumer,
                            (int8_t *) codes.g);
        const auto cc = codes.host_cpu<int8_t>(), cg = codes.host_gpu<int8_t>();
        const auto oc = out.host_cpu<float>(), og = out.host_gpu<float>();
        size_t same_codes = 0, nonzero = 0;
        std::string first;
        for (size_t i = 0; i < cc.size(); i++) {
            same_codes += cc[i] == cg[i], nonzero += cc[i] != 0;
            if (cc[i] != cg[i] && first.empty()) {
                const size_t t = i / consumer.kp, c = i % consumer.kp;
                char d[160];
                snprintf(d, sizeof d, "; first: token %zu channel %zu codes %d/%d o %.9g/%.9g", t, c, cc[i], cg[i],
                         oc[t * H * hd + c], og[t * H * hd + c]);
                first = d;
            }
        }
        // (with the int8 cache the steps clip v, and long contexts average o towards 0: codes may all be 0)
        report("attention_quant" + type + tag, same_codes == cc.size() && (kt == KV_TYPE_I8 || nonzero > cc.size() / 8),
               std::to_string(cc.size() - same_codes) + " of " + std::to_string(cc.size()) + " codes differ" + first);
    }
}

static void test_ops(Backend & cpu, Backend & gpu) {
    std::mt19937 rng(1234);
    printf("ops, CPU vs CUDA:\n");
    {  // embedding: exact
        const int V = 1000, D = 576, n = 37;
        std::vector<uint16_t> table(V * D);
        for (auto & h : table) h = f32_to_f16(randn(1, rng)[0]);
        std::vector<int32_t> ids(n);
        for (auto & i : ids) i = (int32_t) (rng() % V);
        Pair t(cpu, gpu, table.data(), table.size() * 2), id(cpu, gpu, ids.data(), n * 4), out(cpu, gpu, nullptr, n * D * 4);
        cpu.embed_f16(t.c, (int32_t *) id.c, n, D, (float *) out.c);
        gpu.embed_f16(t.g, (int32_t *) id.g, n, D, (float *) out.g);
        report("embed_f16 n=37 D=576", out.host_cpu<float>() == out.host_gpu<float>(), "exact");
        // the rows of a quantized (tied) output matrix: w8a8 int8 codes x fp32 row scale, w4a16g packed int4 x
        // fp16 group scale (group 64)
        std::vector<int8_t> q8((size_t) V * D);
        for (auto & q : q8) q = (int8_t) ((int) (rng() % 255) - 127);
        std::vector<float> s8(V);
        for (auto & v : s8) v = 0.001f + (float) (rng() % 1000) * 1e-5f;
        std::vector<uint8_t> q4((size_t) V * D / 2);
        for (auto & q : q4) q = (uint8_t) (rng() & 0xFF);
        std::vector<uint16_t> s4((size_t) V * (D / 64));
        for (auto & h : s4) h = f32_to_f16(0.01f + (float) (rng() % 100) * 1e-4f);
        Pair t8(cpu, gpu, q8.data(), q8.size()), ts8(cpu, gpu, s8.data(), s8.size() * 4);
        Pair t4(cpu, gpu, q4.data(), q4.size()), ts4(cpu, gpu, s4.data(), s4.size() * 2);
        for (int kind : {1, 2}) {
            EmbedTable tc, tg;
            tc.kind = tg.kind = kind == 1 ? EMBED_I8_ROW : EMBED_I4_GROUP;
            tc.data = kind == 1 ? t8.c : t4.c, tg.data = kind == 1 ? t8.g : t4.g;
            tc.scale = kind == 1 ? ts8.c : ts4.c, tg.scale = kind == 1 ? ts8.g : ts4.g;
            tc.group = tg.group = kind == 1 ? 0 : 64;
            Pair o2(cpu, gpu, nullptr, n * D * 4);
            cpu.embed(tc, (int32_t *) id.c, n, D, (float *) o2.c);
            gpu.embed(tg, (int32_t *) id.g, n, D, (float *) o2.g);
            report(std::string(kind == 1 ? "embed w8a8 rows" : "embed w4a16g rows") + " n=37 D=576",
                   o2.host_cpu<float>() == o2.host_gpu<float>(), "exact");
        }
    }
    {  // rmsnorm
        const int rows = 7, D = 576;
        auto x = randn(rows * D, rng, 3.0f), w = randn(D, rng);
        Pair px(cpu, gpu, x.data(), x.size() * 4), pw(cpu, gpu, w.data(), D * 4), out(cpu, gpu, nullptr, x.size() * 4);
        cpu.rmsnorm((float *) px.c, (float *) pw.c, rows, D, 1e-5f, (float *) out.c);
        gpu.rmsnorm((float *) px.g, (float *) pw.g, rows, D, 1e-5f, (float *) out.g);
        check_close("rmsnorm rows=7 D=576", out, 1e-6);
    }
    {  // swiglu
        const int m = 5, F = 1536;
        auto gu = randn(m * 2 * F, rng, 2.0f);
        Pair pg(cpu, gpu, gu.data(), gu.size() * 4), out(cpu, gpu, nullptr, m * F * 4);
        cpu.swiglu((float *) pg.c, m, F, (float *) out.c);
        gpu.swiglu((float *) pg.g, m, F, (float *) out.g);
        check_close("swiglu m=5 F=1536", out, 1e-6);
    }
    // linear f16: decode (GEMV) and prefill (GEMM) sizes, shapes off the tiles, both accumulate modes
    for (auto shape : std::vector<std::array<int, 2>>{{960, 576}, {200, 1544}, {3072, 576}, {576, 1536}}) {
        const int N = shape[0], K = shape[1];
        std::vector<uint16_t> w((size_t) N * K);
        for (auto & h : w) h = f32_to_f16(randn(1, rng, 0.05f)[0]);
        TensorView tv;
        tv.name = "test.weight";
        tv.dtype = DTYPE_F16;
        tv.shape = {N, K};
        tv.data = (const uint8_t *) w.data();
        tv.nbytes = w.size() * 2;
        Linear lc, lg;
        lc.name = lg.name = "test";
        lc.scheme = lg.scheme = "f16";
        lc.n = lg.n = N;
        lc.k = lg.k = K;
        lc.tensors = lg.tensors = {&tv};
        cpu.prepare_linear(lc);
        gpu.prepare_linear(lg);
        for (int m : {1, 3, 8, 9, 40, 300}) {
            for (bool acc : {false, true}) {
                auto x = randn((size_t) m * K, rng, 2.0f), y0 = randn((size_t) m * N, rng);
                Pair px(cpu, gpu, x.data(), x.size() * 4), py(cpu, gpu, y0.data(), y0.size() * 4);
                cpu.linear(lc, (float *) px.c, m, (float *) py.c, acc);
                gpu.linear(lg, (float *) px.g, m, (float *) py.g, acc);
                check_close("linear f16 N=" + std::to_string(N) + " K=" + std::to_string(K) + " m=" + std::to_string(m) +
                                (acc ? " accumulate" : ""),
                            py, 1e-5);
            }
        }
        cpu.release_linear(lc);
        gpu.release_linear(lg);
    }
    // rope, kv_store, attention: a prefill of T tokens, GQA 4 heads / 2 kv heads, T = 300 in the second
    // round (several key tiles), llama3 frequency scaling there
    // (prefill: the tiled kernel for hd 64 and 128, the split kernel with one range for hd 96; then a decode
    // token and a 5-token chunk: the split kernel); each with an fp16 and an int8 cache
    for (int round = 0; round < 3; round++) {
        for (KvType kt : {KV_TYPE_F16, KV_TYPE_I8}) {
            test_attention(cpu, gpu, round, kt, rng);
        }
    }
}

// The 4-bit schemes with float inputs, w4a16g (fp16 group scales, groups of 64 and 128) and w4a4d
// (per-token dynamic int4 codes, K not a multiple of 64 so the padding slots are used), at decode (GEMV)
// and prefill (GEMM) sizes, both accumulate modes. Random packed codes and scales.
static void test_linear_4bit(Backend & cpu, Backend & gpu) {
    printf("linear w4a16g / w4a4d, CPU vs CUDA:\n");
    std::mt19937 rng(555);
    struct Case {
        const char * scheme;
        int n, k;
    };
    for (const Case & cs : {Case{"w4a16g", 960, 576}, Case{"w4a16g", 200, 1536}, Case{"w4a16g", 3072, 1024},
                            Case{"w4a4d", 960, 576}, Case{"w4a4d", 200, 1000}, Case{"w4a4d", 4096, 11008}}) {
        const bool g16 = std::string(cs.scheme) == "w4a16g";
        const int N = cs.n, K = cs.k, kp = g16 ? K : (K + 63) / 64 * 64, group = K % 128 == 0 ? 128 : 64;
        std::vector<uint8_t> q((size_t) N * kp / 2);
        for (auto & b : q) b = (uint8_t) rng();
        if (!g16) {  // padding slots hold code 0
            for (int r = 0; r < N; r++)
                for (int s = K; s < kp; s += 2) q[(size_t) r * kp / 2 + s / 2] = 0;
        }
        std::vector<uint16_t> s16((size_t) N * (K / group));
        for (auto & h : s16) h = f32_to_f16(std::uniform_real_distribution<float>(1e-3f, 2e-2f)(rng));
        std::vector<float> s32(N);
        for (auto & f : s32) f = std::uniform_real_distribution<float>(1e-3f, 2e-2f)(rng);
        TensorView tq, ts;
        tq.name = "test.qweight", tq.dtype = DTYPE_U8, tq.shape = {N, kp / 2}, tq.data = q.data(), tq.nbytes = q.size();
        ts.name = "test.scale";
        if (g16) {
            ts.dtype = DTYPE_F16, ts.shape = {N, K / group}, ts.data = (const uint8_t *) s16.data(), ts.nbytes = s16.size() * 2;
        } else {
            ts.dtype = DTYPE_F32, ts.shape = {N}, ts.data = (const uint8_t *) s32.data(), ts.nbytes = s32.size() * 4;
        }
        Linear lc, lg;
        for (Linear * l : {&lc, &lg}) {
            l->name = "test", l->scheme = cs.scheme, l->n = N, l->k = K, l->kp = kp, l->group = g16 ? group : 0;
            l->qweight = &tq, l->scale = &ts;
        }
        cpu.prepare_linear(lc);
        gpu.prepare_linear(lg);
        for (int m : {1, 3, 8, 9, 40, 300}) {
            if ((int64_t) m * N * K > 2000000000LL) continue;  // keeps the CPU reference short
            for (bool acc : {false, true}) {
                auto x = randn((size_t) m * K, rng, 2.0f), y0 = randn((size_t) m * N, rng);
                Pair px(cpu, gpu, x.data(), x.size() * 4), py(cpu, gpu, y0.data(), y0.size() * 4);
                cpu.linear(lc, (float *) px.c, m, (float *) py.c, acc);
                gpu.linear(lg, (float *) px.g, m, (float *) py.g, acc);
                const std::string what = std::string("linear ") + cs.scheme + " N=" + std::to_string(N) + " K=" +
                                         std::to_string(K) + (g16 ? " g=" + std::to_string(group) : "") + " m=" +
                                         std::to_string(m) + (acc ? " accumulate" : "");
                if (!g16 && !acc) {  // same codes, exact GEMM, the same fp32 multiplies
                    report(what, py.host_cpu<float>() == py.host_gpu<float>(), "bit-exact");
                } else {
                    check_close(what, py, 1e-5);
                }
            }
        }
        cpu.release_linear(lc);
        gpu.release_linear(lg);
    }
}

// One int8-input linear (lc on the CPU, lg on the GPU, the same tensors) compared bit for bit at GEMV and GEMM
// sizes, both accumulate modes, inputs N(0, x_sd) with channel 7 times `outlier` and an all-zero token where m > 2;
// int8 weights with a K the CUDA kernels do not take (K % 16 != 0) must be refused at prepare, naming the backend
// (the int4-weight schemes pad K to kp in the file: every K is taken). Releases both.
static void compare_int8_linear(Backend & cpu, Backend & gpu, Linear & lc, Linear & lg, const std::string & shape,
                                std::mt19937 & rng, float x_sd, float outlier) {
    const int64_t N = lc.n, K = lc.k;
    const std::string what = "linear " + lc.scheme + " " + shape;
    const bool int4_weights = lc.scheme == "w4a8" || lc.scheme == "w4a8g";
    if (K % 16 != 0 && !int4_weights) {
        bool refused = false;
        try {
            gpu.prepare_linear(lg);
        } catch (const Error & e) {
            refused = std::string(e.what()).find("cuda") != std::string::npos;
        }
        report(what + " refused by the CUDA backend", refused);
        if (!refused && lg.prepared) gpu.release_linear(lg);
        return;
    }
    cpu.prepare_linear(lc);
    gpu.prepare_linear(lg);
    for (int m : {1, 3, 8, 9, 16, 17, 40, 300}) {
        if ((int64_t) m * N * K > 2000000000LL) continue;
        for (bool acc : {false, true}) {
            auto x = randn((size_t) (m * K), rng, x_sd), y0 = randn((size_t) (m * N), rng);
            if (m > 2) {  // an outlier channel and an all-zero token
                for (int t = 0; t < m; t++) x[(size_t) (t * K + 7)] *= outlier;
                std::fill(x.begin() + K, x.begin() + 2 * K, 0.0f);
            }
            Pair px(cpu, gpu, x.data(), x.size() * 4), py(cpu, gpu, y0.data(), y0.size() * 4);
            cpu.linear(lc, (float *) px.c, m, (float *) py.c, acc);
            gpu.linear(lg, (float *) px.g, m, (float *) py.g, acc);
            report(what + " m=" + std::to_string(m) + (acc ? " accumulate" : ""),
                   py.host_cpu<float>() == py.host_gpu<float>(), "bit-exact");
        }
    }
    cpu.release_linear(lc);
    gpu.release_linear(lg);
}

// Scheme w8a8 (per-token dynamic int8 inputs, int8 weights, the 6-bit variant, an optional bias), GEMV and GEMM
// sizes, both accumulate modes: the same codes, the exact int32 sum and the same fp32 operations in the same order
// give bit-identical outputs. K not a multiple of 16 is refused by the CUDA backend at prepare, naming it.
static void test_linear_w8a8(Backend & cpu, Backend & gpu) {
    printf("linear w8a8, CPU vs CUDA:\n");
    std::mt19937 rng(777);
    struct Case {
        int n, k, bits;
        bool bias;
    };
    for (const Case & cs : {Case{960, 576, 8, false}, Case{200, 1536, 6, true}, Case{4096, 4096, 8, true},
                            Case{96, 1008, 8, false}, Case{1000, 1000, 8, false}}) {
        const int N = cs.n, K = cs.k, qmax = (1 << (cs.bits - 1)) - 1;
        std::vector<int8_t> q((size_t) N * K);
        for (auto & b : q) b = (int8_t) ((int) (rng() % (2 * qmax + 1)) - qmax);
        std::vector<float> s32(N), b32(N);
        for (auto & f : s32) f = std::uniform_real_distribution<float>(1e-3f, 2e-2f)(rng);
        for (auto & f : b32) f = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
        TensorView tq, ts, tb;
        tq.name = "test.qweight", tq.dtype = DTYPE_I8, tq.shape = {N, K}, tq.data = (const uint8_t *) q.data(), tq.nbytes = q.size();
        ts.name = "test.scale", ts.dtype = DTYPE_F32, ts.shape = {N}, ts.data = (const uint8_t *) s32.data(), ts.nbytes = N * 4;
        tb.name = "test.bias", tb.dtype = DTYPE_F32, tb.shape = {N}, tb.data = (const uint8_t *) b32.data(), tb.nbytes = N * 4;
        Linear lc, lg;
        for (Linear * l : {&lc, &lg}) {
            l->name = "test", l->scheme = "w8a8", l->n = N, l->k = K, l->kp = K, l->qmax = qmax;
            l->qweight = &tq, l->scale = &ts, l->bias = cs.bias ? &tb : nullptr;
        }
        const std::string shape = "N=" + std::to_string(N) + " K=" + std::to_string(K) + " bits=" + std::to_string(cs.bits) +
                                  (cs.bias ? " bias" : "");
        compare_int8_linear(cpu, gpu, lc, lg, shape, rng, 2.0f, 40.0f);
    }
}

// Scheme w8a8s (static per-channel int8 inputs with a shift, OutlierTune): int8 weights, in_scale over four
// decades, shifts of either sign, the required bias, 8 and 6 bits, GEMV and GEMM sizes, both accumulate modes:
// the same codes (one fp32 subtraction and multiply each), the exact int32 sum and the same fp32 epilogue give
// bit-identical outputs. Inputs far past the range (clamped codes) and an all-zero token included.
static void test_linear_w8a8s(Backend & cpu, Backend & gpu) {
    printf("linear w8a8s, CPU vs CUDA:\n");
    std::mt19937 rng(4242);
    struct Case {
        int n, k, bits;
    };
    for (const Case & cs : {Case{960, 576, 8}, Case{3072, 576, 6}, Case{576, 1536, 8}, Case{200, 1008, 6}, Case{64, 1000, 8}}) {
        const int N = cs.n, K = cs.k, qmax = (1 << (cs.bits - 1)) - 1;
        std::vector<int8_t> q((size_t) N * K);
        for (auto & b : q) b = (int8_t) ((int) (rng() % (2 * qmax + 1)) - qmax);
        std::vector<float> s32(N), b32(N), inv(K), sh(K);
        for (auto & f : s32) f = std::uniform_real_distribution<float>(1e-3f, 2e-2f)(rng);
        for (auto & f : b32) f = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
        for (auto & f : inv) f = std::pow(10.0f, std::uniform_real_distribution<float>(-1.0f, 3.0f)(rng));
        for (auto & f : sh) f = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
        TensorView tq, ts, tb, ti, tz;
        tq.name = "test.qweight", tq.dtype = DTYPE_I8, tq.shape = {N, K}, tq.data = (const uint8_t *) q.data(), tq.nbytes = q.size();
        ts.name = "test.scale", ts.dtype = DTYPE_F32, ts.shape = {N}, ts.data = (const uint8_t *) s32.data(), ts.nbytes = N * 4;
        tb.name = "test.bias", tb.dtype = DTYPE_F32, tb.shape = {N}, tb.data = (const uint8_t *) b32.data(), tb.nbytes = N * 4;
        ti.name = "test.in_scale", ti.dtype = DTYPE_F32, ti.shape = {K}, ti.data = (const uint8_t *) inv.data(), ti.nbytes = K * 4;
        tz.name = "test.shift", tz.dtype = DTYPE_F32, tz.shape = {K}, tz.data = (const uint8_t *) sh.data(), tz.nbytes = K * 4;
        Linear lc, lg;
        for (Linear * l : {&lc, &lg}) {
            l->name = "test", l->scheme = "w8a8s", l->n = N, l->k = K, l->kp = K, l->qmax = qmax;
            l->qweight = &tq, l->scale = &ts, l->bias = &tb, l->in_scale = &ti, l->shift = &tz;
        }
        const std::string shape = "N=" + std::to_string(N) + " K=" + std::to_string(K) + " bits=" + std::to_string(cs.bits);
        compare_int8_linear(cpu, gpu, lc, lg, shape, rng, 0.05f, 1000.0f);
    }
}

// Schemes w4a8 (per-channel int4 weights, K padded to kp) and w4a8g (int4 codes times integer group scales of 64,
// 128 or 192 k: groups that split a 128-k chunk or not): per-token int8 inputs, GEMV and GEMM sizes, both accumulate modes, N and K off the tiles (a last half
// chunk of 32 bytes, N not a multiple of 16), with and without a bias: the same codes, the exact int32 sum and the
// same fp32 epilogue give bit-identical outputs. Codes span [-8, 7] and group scales [1, 16] (the extremes included).
static void test_linear_w4a8(Backend & cpu, Backend & gpu) {
    printf("linear w4a8 / w4a8g, CPU vs CUDA:\n");
    std::mt19937 rng(8484);
    struct Case {
        int n, k, group;  // group 0: w4a8
        bool bias;
    };
    for (const Case & cs : {Case{960, 576, 0, false}, Case{200, 1000, 0, true}, Case{4096, 4096, 0, false},
                            Case{130, 11008, 0, true}, Case{960, 576, 64, false}, Case{576, 1536, 128, true},
                            Case{4096, 4096, 128, false}, Case{200, 1216, 64, true}, Case{130, 11008, 128, false},
                            Case{300, 1152, 192, false}}) {
        const int N = cs.n, K = cs.k, kp = (K + 63) / 64 * 64, ng = cs.group ? K / cs.group : 0;
        std::vector<uint8_t> q((size_t) N * kp / 2);
        for (int r = 0; r < N; r++)
            for (int i = 0; i < kp; i++) {  // w4a8: code 0 past K
                const int c = i < K ? (int) (rng() % 16) - 8 : 0;
                uint8_t & b = q[(size_t) r * kp / 2 + i / 2];
                b = (uint8_t) (i % 2 ? (b & 0x0F) | ((c & 15) << 4) : (c & 15));
            }
        std::vector<uint8_t> gs((size_t) N * std::max(ng, 1));
        for (auto & v : gs) v = (uint8_t) (1 + rng() % 16);
        std::vector<float> s32(N), b32(N);
        for (auto & f : s32) f = std::uniform_real_distribution<float>(1e-3f, 2e-2f)(rng);
        for (auto & f : b32) f = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
        TensorView tq, tg, ts, tb;
        tq.name = "test.qweight", tq.dtype = DTYPE_U8, tq.shape = {N, kp / 2}, tq.data = q.data(), tq.nbytes = q.size();
        tg.name = "test.gscale", tg.dtype = DTYPE_U8, tg.shape = {N, ng}, tg.data = gs.data(), tg.nbytes = (size_t) N * ng;
        ts.name = "test.scale", ts.dtype = DTYPE_F32, ts.shape = {N}, ts.data = (const uint8_t *) s32.data(), ts.nbytes = N * 4;
        tb.name = "test.bias", tb.dtype = DTYPE_F32, tb.shape = {N}, tb.data = (const uint8_t *) b32.data(), tb.nbytes = N * 4;
        Linear lc, lg;
        for (Linear * l : {&lc, &lg}) {
            l->name = "test", l->scheme = cs.group ? "w4a8g" : "w4a8", l->n = N, l->k = K, l->kp = kp, l->qmax = 127;
            l->group = cs.group, l->qweight = &tq, l->scale = &ts, l->gscale = cs.group ? &tg : nullptr;
            l->bias = cs.bias ? &tb : nullptr;
        }
        const std::string shape = "N=" + std::to_string(N) + " K=" + std::to_string(K) +
                                  (cs.group ? " g=" + std::to_string(cs.group) : "") + (cs.bias ? " bias" : "");
        compare_int8_linear(cpu, gpu, lc, lg, shape, rng, 2.0f, 40.0f);
    }
}

// The static W4A4 ops on a synthetic linear: in_map with split channels (parts 1..3) and padding slots,
// a low-rank branch in the second round. Codes must agree >= 99.9% (exactly, here: same fp32 inputs and
// the same formulas), int_gemm exactly, linear_codes bit for bit (the low-rank branch too: float64 on both).
static void test_w4a4_ops(Backend & cpu, Backend & gpu) {
    printf("static w4a4 ops, CPU vs CUDA:\n");
    std::mt19937 rng(4321);
    // rounds 2 and 3: inputs as wide as a 7B model's (kp 4544 and 7040, the GEMV's K loop several rounds deep, a
    // partial last round) with a rank-16 branch, at the GEMV's sizes of m only; rounds 4 and 5: the converter's
    // rank 32 (ffn_down, attn_output) and a rank above the cuBLAS epilogue's staging (72: the branch computed
    // into `add` first), at prefill sizes; rounds 6 and 7: rank 12 (no multiple of 8: the any-rank epilogue, the
    // down-projection's last column tile part empty) and the converter's rank 16 at prefill sizes
    for (int round = 0; round < 8; round++) {
        const int D = round == 2 ? 4096 : round == 3 ? 6400 : 576,
                  N = round == 0 ? 960 : round == 1 || round >= 4 ? 200 : 256,
                  rank = round == 0 ? 0 : round == 1 ? 8 : round == 4 ? 32 : round == 5 ? 72 : round == 6 ? 12 : 16;
        // slots: every channel once, 40 channels split in 2 or 3 parts, then padding to a multiple of 64
        std::vector<int32_t> in_map;
        for (int j = 0; j < D; j++) {
            const int parts = j % 15 == 0 ? 2 + (j / 15) % 2 : 1;
            for (int k = 0; k < parts; k++) in_map.insert(in_map.end(), {j, k, parts});
        }
        while (in_map.size() / 3 % 64 != 0) in_map.insert(in_map.end(), {-1, 0, 1});
        const int kp = (int) in_map.size() / 3;
        std::vector<uint8_t> q((size_t) N * kp / 2);
        for (auto & b : q) b = (uint8_t) rng();
        std::vector<float> scale(N), in_scale(D);
        for (auto & f : scale) f = std::uniform_real_distribution<float>(1e-3f, 1e-2f)(rng);
        for (auto & f : in_scale) f = std::uniform_real_distribution<float>(0.5f, 6.0f)(rng);
        std::vector<uint16_t> la((size_t) rank * kp), lb((size_t) N * rank);
        for (auto & h : la) h = f32_to_f16(randn(1, rng, 0.05f)[0]);
        for (auto & h : lb) h = f32_to_f16(randn(1, rng, 0.05f)[0]);
        auto view = [](const char * name, DType t, std::vector<int64_t> shape, const void * d, size_t bytes) {
            TensorView v;
            v.name = name, v.dtype = t, v.shape = shape, v.data = (const uint8_t *) d, v.nbytes = bytes;
            return v;
        };
        TensorView tq = view("q", DTYPE_U8, {N, kp / 2}, q.data(), q.size()), ts = view("s", DTYPE_F32, {N}, scale.data(), N * 4),
                   ti = view("i", DTYPE_F32, {D}, in_scale.data(), D * 4),
                   tm = view("m", DTYPE_I32, {kp, 3}, in_map.data(), in_map.size() * 4),
                   ta = view("a", DTYPE_F16, {rank, kp}, la.data(), la.size() * 2),
                   tb = view("b", DTYPE_F16, {N, rank}, lb.data(), lb.size() * 2);
        Linear lc, lg;
        for (Linear * l : {&lc, &lg}) {
            l->name = "test.w4a4", l->scheme = "w4a4", l->n = N, l->k = D, l->kp = kp, l->rank = rank;
            l->qweight = &tq, l->scale = &ts, l->in_scale = &ti, l->in_map = &tm;
            if (rank) l->lora_a = &ta, l->lora_b = &tb;
        }
        cpu.prepare_linear(lc);
        gpu.prepare_linear(lg);
        // a gate/up linear [2·D rows] on the same slots, whose SwiGLU output feeds this linear's D channels
        const int NG = 2 * D;
        std::vector<uint8_t> qg((size_t) NG * kp / 2);
        for (auto & b : qg) b = (uint8_t) rng();
        std::vector<float> scale_g(NG);
        for (auto & f : scale_g) f = std::uniform_real_distribution<float>(1e-3f, 1e-2f)(rng);
        std::vector<uint16_t> lbg((size_t) NG * rank);
        for (auto & h : lbg) h = f32_to_f16(randn(1, rng, 0.05f)[0]);
        TensorView tqg = view("qg", DTYPE_U8, {NG, kp / 2}, qg.data(), qg.size()),
                   tsg = view("sg", DTYPE_F32, {NG}, scale_g.data(), NG * 4),
                   tbg = view("bg", DTYPE_F16, {NG, rank}, lbg.data(), lbg.size() * 2);
        Linear gc, gg;
        for (Linear * l : {&gc, &gg}) {
            l->name = "test.gate_up", l->scheme = "w4a4", l->n = NG, l->k = D, l->kp = kp, l->rank = rank;
            l->qweight = &tqg, l->scale = &tsg, l->in_scale = &ti, l->in_map = &tm;
            if (rank) l->lora_a = &ta, l->lora_b = &tbg;
        }
        cpu.prepare_linear(gc);
        gpu.prepare_linear(gg);
        const std::string tag = " N=" + std::to_string(N) + " kp=" + std::to_string(kp) + " rank=" + std::to_string(rank);
        auto same_codes = [&](const std::string & what, const Pair & p) {
            const auto a = p.host_cpu<int8_t>(), b = p.host_gpu<int8_t>();
            size_t same = 0;
            for (size_t i = 0; i < a.size(); i++) same += a[i] == b[i];
            char d[64];
            snprintf(d, sizeof d, "%.4f%% identical", 100.0 * same / a.size());
            report(what, same >= a.size() * 0.999, d);
        };
        for (int m : round < 2 ? std::vector<int>{1, 5, 16, 40, 160}
                     : round < 4 ? std::vector<int>{1, 5, 16}
                     : round == 4 ? std::vector<int>{1, 16, 64, 300} : std::vector<int>{40, 64, 300}) {  // 5, 6, 7
            auto x = randn((size_t) m * D, rng, 2.0f);
            Pair px(cpu, gpu, x.data(), x.size() * 4), codes(cpu, gpu, nullptr, (size_t) m * kp);
            cpu.rmsnorm_quant((float *) px.c, lc, m, D, 1e-5f, (int8_t *) codes.c);
            gpu.rmsnorm_quant((float *) px.g, lg, m, D, 1e-5f, (int8_t *) codes.g);
            same_codes("rmsnorm_quant m=" + std::to_string(m) + tag, codes);
            auto gu = randn((size_t) m * 2 * D, rng, 2.0f);
            Pair pg(cpu, gpu, gu.data(), gu.size() * 4), codes2(cpu, gpu, nullptr, (size_t) m * kp);
            cpu.swiglu_quant((float *) pg.c, lc, m, D, (int8_t *) codes2.c);
            gpu.swiglu_quant((float *) pg.g, lg, m, D, (int8_t *) codes2.g);
            same_codes("swiglu_quant m=" + std::to_string(m) + tag, codes2);
            auto xo = randn((size_t) m * D, rng, 4.0f);
            Pair po(cpu, gpu, xo.data(), xo.size() * 4), codes3(cpu, gpu, nullptr, (size_t) m * kp);
            cpu.quantize_codes((float *) po.c, m, D, lc, (int8_t *) codes3.c);
            gpu.quantize_codes((float *) po.g, m, D, lg, (int8_t *) codes3.g);
            same_codes("quantize_codes m=" + std::to_string(m) + tag, codes3);
            // from here on both sides use the CPU's codes
            const auto a = codes.host_cpu<int8_t>();
            gpu.upload(codes.g, a.data(), a.size());
            Pair acc(cpu, gpu, nullptr, (size_t) m * N * 4);
            cpu.int_gemm(lc, (int8_t *) codes.c, m, (int32_t *) acc.c);
            gpu.int_gemm(lg, (int8_t *) codes.g, m, (int32_t *) acc.g);
            report("int_gemm m=" + std::to_string(m) + tag, acc.host_cpu<int32_t>() == acc.host_gpu<int32_t>(), "exact");
            for (bool accumulate : {false, true}) {
                auto y0 = randn((size_t) m * N, rng);
                Pair py(cpu, gpu, y0.data(), y0.size() * 4);
                cpu.linear_codes(lc, (int8_t *) codes.c, m, (float *) py.c, accumulate);
                gpu.linear_codes(lg, (int8_t *) codes.g, m, (float *) py.g, accumulate);
                const std::string what = "linear_codes m=" + std::to_string(m) + tag + (accumulate ? " accumulate" : "");
                report(what, py.host_cpu<float>() == py.host_gpu<float>(), "bit-exact");
            }
            // gate/up → SwiGLU → this linear's codes: fused in the GEMV epilogue on the GPU at m <= 16
            Pair gus(cpu, gpu, nullptr, (size_t) m * NG * 4), down_codes(cpu, gpu, nullptr, (size_t) m * kp);
            cpu.linear_codes_swiglu_quant(gc, (int8_t *) codes.c, m, lc, D, (float *) gus.c, (int8_t *) down_codes.c);
            gpu.linear_codes_swiglu_quant(gg, (int8_t *) codes.g, m, lg, D, (float *) gus.g, (int8_t *) down_codes.g);
            const auto dc = down_codes.host_cpu<int8_t>(), dg = down_codes.host_gpu<int8_t>();
            size_t nonzero = 0;
            for (int8_t v : dc) nonzero += v != 0;
            report("linear_codes_swiglu_quant m=" + std::to_string(m) + tag + (m <= W4A4_GEMV_MAX_M ? " (fused)" : ""),
                   dc == dg && nonzero > dc.size() / 4, std::to_string(nonzero) + " nonzero codes, exact");
        }
        cpu.release_linear(lc);
        gpu.release_linear(lg);
        cpu.release_linear(gc);
        gpu.release_linear(gg);
    }
}

// The w4a4 linear launcher on its own, at sizes up to a Llama-2-7B down projection, against the integer
// reference: float(Σ_k a·q) * scale[n] must be bit-identical.
static void test_linear_w4a4() {
    printf("w4a4 linear launcher vs integer reference:\n");
    std::mt19937 rng(99);
    auto nib = [](const std::vector<uint8_t> & v, size_t row_bytes, size_t r, size_t k) {
        const int u = (v[r * row_bytes + k / 2] >> ((k & 1) * 4)) & 15;
        return u >= 8 ? u - 16 : u;
    };
    for (auto shape : std::vector<std::array<int, 2>>{{960, 576}, {200, 1600}, {1024, 4224}, {4096, 11008}}) {
        const int N = shape[0], K = shape[1], kb = K / 2;
        std::vector<uint8_t> q((size_t) N * kb);
        for (auto & b : q) b = (uint8_t) rng();
        std::vector<float> scale(N);
        for (auto & f : scale) f = std::uniform_real_distribution<float>(1e-4f, 1e-2f)(rng);
        void *dq, *ds, *da, *dc, *dy;
        cudaMalloc(&dq, q.size());
        cudaMalloc(&ds, N * 4);
        cudaMemcpy(dq, q.data(), q.size(), cudaMemcpyHostToDevice);
        cudaMemcpy(ds, scale.data(), N * 4, cudaMemcpyHostToDevice);
        for (int m : {1, 5, 16, 17, 200}) {
            if ((int64_t) m * N * K > 400000000) continue;  // keeps the CPU reference short
            std::vector<uint8_t> a((size_t) m * kb);
            for (auto & b : a) b = (uint8_t) rng();
            std::vector<float> y0((size_t) m * N), ref((size_t) m * N), got((size_t) m * N);
            for (auto & f : y0) f = std::normal_distribution<float>()(rng);
            std::vector<int8_t> codes((size_t) m * K);
            for (int r = 0; r < m; r++)
                for (int k = 0; k < K; k++) codes[(size_t) r * K + k] = (int8_t) nib(a, kb, r, k);
            cudaMalloc(&da, a.size());
            cudaMalloc(&dc, codes.size());
            cudaMalloc(&dy, y0.size() * 4);
            cudaMemcpy(da, a.data(), a.size(), cudaMemcpyHostToDevice);
            cudaMemcpy(dc, codes.data(), codes.size(), cudaMemcpyHostToDevice);
            for (bool acc : {false, true}) {
                for (int r = 0; r < m; r++)
                    for (int n = 0; n < N; n++) {
                        int32_t s = 0;
                        for (int k = 0; k < K; k++) s += nib(a, kb, r, k) * nib(q, kb, n, k);
                        const float v = (float) s * scale[n];
                        ref[(size_t) r * N + n] = acc ? y0[(size_t) r * N + n] + v : v;
                    }
                // packed codes, and at GEMV sizes also int8 codes one per byte (the decode step's input)
                // both tensor-core paths: int4 unpacked to int8 (sm_90) and the native s4 MMA (sm_80-89; emulated
                // on sm_90, where this checks its fragment layout)
                for (W4A4Mma mma : {W4A4Mma::I8, W4A4Mma::S4})
                for (bool codes8 : {false, true}) {
                    if (codes8 && m > W4A4_GEMV_MAX_M) continue;
                    cudaMemcpy(dy, y0.data(), y0.size() * 4, cudaMemcpyHostToDevice);
                    cuda_linear_w4a4(dq, (const float *) ds, nullptr, nullptr, N, K, codes8 ? dc : da, codes8, m,
                                     (float *) dy, acc, mma, 0);
                    cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost);
                    report("linear w4a4 " + std::string(mma == W4A4Mma::S4 ? "s4" : "i8") + " N=" + std::to_string(N) +
                               " K=" + std::to_string(K) + " m=" + std::to_string(m) + (codes8 ? " int8 codes" : "") +
                               (acc ? " accumulate" : ""),
                           memcmp(ref.data(), got.data(), ref.size() * 4) == 0, "bit-exact");
                }
            }
            cudaFree(da);
            cudaFree(dc);
            cudaFree(dy);
        }
        cudaFree(dq);
        cudaFree(ds);
    }
    const cudaError_t err = cudaDeviceSynchronize();
    report("w4a4 launches without CUDA errors", err == cudaSuccess, cudaGetErrorString(err));
}

// The static W4A4 model on a long prompt. One int4 code that flips at a rounding boundary (the CUDA
// attention runs in fp32, docs/numerics.md) changes that token's residual stream in every later layer, so
// long-prompt logits of the two backends need not agree to 1e-3. What
// must hold: the first layer's codes agree >= 99.9%, and given the same codes, every linear of the model
// gives the same result on both backends (int_gemm exactly, linear_codes bit for bit, with or without a
// low-rank branch), on the GEMM path (all 300 rows) and on the GEMV path (16 rows).
static void test_w4a4_long_prompt(const std::shared_ptr<const Model> & mc, const std::shared_ptr<const Model> & mg,
                                  const std::vector<int32_t> & prompt, const ContextParams & cp) {
    const int32_t n_layer = mc->config().n_layer, V = mc->config().n_vocab, m = (int32_t) prompt.size();
    std::map<std::string, std::vector<int8_t>> codes[2];
    Context tc(mc, cp), tg(mg, cp);
    for (int side = 0; side < 2; side++) {
        (side ? tg : tc).set_code_trace([&codes, side](const std::string & name, const std::vector<int8_t> & host, int32_t,
                                                       int64_t) {
            auto & v = codes[side][name];
            v.insert(v.end(), host.begin(), host.end());
        });
    }
    const auto lc = tc.eval(prompt, true), lg = tg.eval(prompt, true);
    double mx = 0, md = 0;
    for (size_t i = 0; i < lc.size(); i++) {
        mx = std::max(mx, (double) std::fabs(lc[i]));
        md = std::max(md, (double) std::fabs(lc[i] - lg[i]));
    }
    std::string shares;
    for (int32_t l = 0; l < n_layer; l++) {
        size_t same = 0, total = 0;
        for (const Linear * lin : {&mc->layers[l].attn_qkv, &mc->layers[l].attn_output, &mc->layers[l].ffn_gate_up,
                                   &mc->layers[l].ffn_down}) {
            const auto & a = codes[0][lin->name];
            const auto & b = codes[1][lin->name];
            size_t s = 0;
            for (size_t i = 0; i < a.size() && i < b.size(); i++) s += a[i] == b[i];
            if (l == 0) {
                char d[64];
                snprintf(d, sizeof d, "%.4f%% identical", a.empty() ? 0.0 : 100.0 * s / a.size());
                report("first layer codes, " + lin->name + " input, " + std::to_string(m) + " tokens",
                       !a.empty() && a.size() == b.size() && s >= a.size() * 0.999, d);
            }
            same += s, total += a.size();
        }
        char d[32];
        snprintf(d, sizeof d, " %d:%.2f%%", l, total ? 100.0 * same / total : 0.0);
        shares += d;
    }
    printf("  (info) prefill %d random ids: logits max|diff|/max %.2e over %d x %d; codes identical per layer:\n  %s\n",
           m, md / mx, m, V, shares.c_str());
    // the CPU's codes into both backends' linears
    Backend & bc = mc->backend();
    Backend & bg = mg->backend();
    for (int32_t l : {0, n_layer / 2, n_layer - 1}) {
        for (const Linear * lin_c : {&mc->layers[l].attn_qkv, &mc->layers[l].attn_output, &mc->layers[l].ffn_gate_up,
                                     &mc->layers[l].ffn_down}) {
            const Linear & lin_g = *(&mg->layers[l].attn_qkv + (lin_c - &mc->layers[l].attn_qkv));
            const auto & a = codes[0][lin_c->name];
            for (int32_t rows : {m, 16}) {
                const size_t nb = (size_t) rows * lin_c->kp;
                Pair pa(bc, bg, a.data(), nb), acc(bc, bg, nullptr, (size_t) rows * lin_c->n * 4),
                    y(bc, bg, nullptr, (size_t) rows * lin_c->n * 4);
                bc.int_gemm(*lin_c, (int8_t *) pa.c, rows, (int32_t *) acc.c);
                bg.int_gemm(lin_g, (int8_t *) pa.g, rows, (int32_t *) acc.g);
                const std::string tag = lin_c->name + " m=" + std::to_string(rows) + " (CPU codes)";
                report("int_gemm " + tag, acc.host_cpu<int32_t>() == acc.host_gpu<int32_t>(), "exact");
                bc.linear_codes(*lin_c, (int8_t *) pa.c, rows, (float *) y.c, false);
                bg.linear_codes(lin_g, (int8_t *) pa.g, rows, (float *) y.g, false);
                // the low-rank branch runs in float64 rounded once on both (docs/numerics.md): bit-exact too
                report("linear_codes " + tag + (lin_c->rank ? " rank " + std::to_string(lin_c->rank) : ""),
                       y.host_cpu<float>() == y.host_gpu<float>(), "bit-exact");
            }
        }
    }
}

// One model with one KV cache type on both backends (see test_model); mn: the CUDA model without graphs.
static void test_model_kv(const std::string & path, const std::shared_ptr<const Model> & mc,
                          const std::shared_ptr<const Model> & mg, const std::shared_ptr<const Model> & mn, KvType kt) {
    const int32_t V = mc->config().n_vocab;
    bool w4a4 = false;
    for (const LayerWeights & L : mc->layers) w4a4 |= L.static_w4a4;
    printf("model %s, %s KV cache, CPU vs CUDA:\n", path.c_str(), kv_type_name(kt));
    std::mt19937 rng(7);
    ContextParams cp;
    cp.n_ctx = 512;
    cp.kv_type = kt;
    Context cc(mc, cp), cg(mg, cp);
    auto argmax = [V](const std::vector<float> & a, size_t r) {
        size_t best = 0;
        for (size_t i = 1; i < (size_t) V; i++)
            if (a[r * V + i] > a[r * V + best]) best = i;
        return (int32_t) best;
    };
    auto compare = [&](const std::string & what, const std::vector<float> & a, const std::vector<float> & b) {
        // max-abs difference over max-abs logit (docs/numerics.md), and the argmax of every row
        double mx = 0, md = 0;
        bool same_argmax = true;
        for (size_t r = 0; r < a.size() / V; r++) {
            for (size_t i = 0; i < (size_t) V; i++) {
                const size_t j = r * V + i;
                mx = std::max(mx, (double) std::fabs(a[j]));
                md = std::max(md, (double) std::fabs(a[j] - b[j]));
            }
            same_argmax &= argmax(a, r) == argmax(b, r);
        }
        char d[64];
        snprintf(d, sizeof d, "max|diff|/max %.2e", md / mx);
        report(what + (same_argmax ? "" : " (argmax differs)"), md / mx <= 1e-3 && (!w4a4 || same_argmax), d);
    };
    std::vector<int32_t> prompt(300);
    for (auto & t : prompt) t = (int32_t) (rng() % V);
    std::vector<int32_t> steps(64);
    for (auto & t : steps) t = (int32_t) (rng() % V);
    if (!w4a4) {
        compare("prefill 300 tokens, all logits", cc.eval(prompt, true), cg.eval(prompt, true));
        for (int i = 0; i < 8; i++) {
            compare("decode step " + std::to_string(i + 1), cc.eval({steps[i]}, false), cg.eval({steps[i]}, false));
        }
    } else {
        const std::string text = "The capital of France is";
        const auto ids = mc->vocab().encode(text, true, false);
        auto a = cc.eval(ids, true), b = cg.eval(ids, true);
        compare("prefill '" + text + "' (" + std::to_string(ids.size()) + " tokens), all logits", a, b);
        for (int i = 0; i < 16; i++) {  // greedy: both sides take the CPU's token
            const int32_t next = argmax(a, a.size() / V - 1);
            a = cc.eval({next}, false);
            b = cg.eval({next}, false);
            compare("greedy decode step " + std::to_string(i + 1), a, b);
        }
        if (kt == KV_TYPE_F16) test_w4a4_long_prompt(mc, mg, prompt, cp);
    }
    // decode steps after the long prompt, replaying a CUDA graph from the second step on, against the same
    // steps launched op by op: the logits must be identical; the graph's time per step is reported
    Context cgr(mg, cp), cn(mn, cp);
    cgr.eval(prompt, false);
    cn.eval(prompt, false);
    bool same = true;
    for (int i = 0; i < 8; i++) same &= cgr.eval({steps[i]}, false) == cn.eval({steps[i]}, false);
    report("decode logits with and without the CUDA graph", same, "bit-identical");
    double ms[2];
    for (int variant = 0; variant < 2; variant++) {
        Context & c = variant ? cn : cgr;
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 8; i < 64; i++) c.eval({steps[i]}, false);
        ms[variant] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 56;
    }
    printf("  decode step: %.3f ms with the CUDA graph, %.3f ms op by op (%.2fx)\n", ms[0], ms[1], ms[1] / ms[0]);
}

// The device sampler against mq::Sampler::pick (the host's rules) on the same logits and draw: the same token
// wherever it decides, and a host fallback (-1) only where the rules reach past its 1024 candidates.
static void test_sampling(Backend & gpu) {
    std::mt19937 rng(7);
    const char * names[] = {"peaked", "flat", "ties"};
    for (int32_t n : {100, 49152}) {
        // three logit shapes: peaked (typical), flat (a nucleus wider than 1024 tokens), many exact ties
        for (int shape = 0; shape < 3; shape++) {
            std::vector<float> logits(n);
            for (auto & l : logits) {
                const float g = std::normal_distribution<float>()(rng);
                l = shape == 0 ? 4.0f * g : shape == 1 ? 0.01f * g : std::round(2.0f * g) / 2.0f;
            }
            std::vector<int32_t> history;
            for (int i = 0; i < 50; i++) history.push_back((int32_t) (rng() % n));
            std::vector<int32_t> distinct = history;
            std::sort(distinct.begin(), distinct.end());
            distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
            float * dl = (float *) gpu.alloc(n * sizeof(float));
            gpu.upload(dl, logits.data(), n * sizeof(float));
            int same = 0, total = 0, fallback = 0, bad_fallback = 0;
            std::string first_bad;
            for (float temp : {0.0f, 0.7f, 1.5f})
            for (int32_t top_k : {0, 1, 40, 1024, 2000, n})
            for (float top_p : {1.0f, 0.9f, 0.5f})
            for (float min_p : {0.0f, 0.05f})
            for (float pen : {1.0f, 1.3f})
            for (double u : {0.0, 0.37, 0.999}) {
                SamplingParams sp;
                sp.temperature = temp, sp.top_k = top_k, sp.top_p = top_p, sp.min_p = min_p, sp.repetition_penalty = pen;
                const int32_t want = Sampler(sp).pick(logits.data(), n, history, u);
                const int32_t got = gpu.sample(dl, n, sp, u, distinct);
                total++;
                const bool all = top_k == 0 || top_k >= n;
                // must go to the host: 1024 < top_k < n, or the whole vocabulary with no cut at all; may: a
                // top-p/min-p cut past the 1024 best (the flat and tied shapes)
                const bool must = temp > 0 && ((top_k > SAMPLE_CAP && top_k < n) ||
                                               (all && n > SAMPLE_CAP && top_p == 1.0f && min_p == 0.0f));
                const bool may = must || (temp > 0 && all && n > SAMPLE_CAP && shape != 0);
                if (got < 0) {
                    fallback++;
                    bad_fallback += !may;
                } else if (got == want && !must) {
                    same++;
                } else if (first_bad.empty()) {
                    first_bad = "T=" + std::to_string(temp) + " k=" + std::to_string(top_k) + " p=" + std::to_string(top_p) +
                                " min_p=" + std::to_string(min_p) + " pen=" + std::to_string(pen) + " u=" +
                                std::to_string(u) + ": got " + std::to_string(got) + " want " + std::to_string(want);
                }
            }
            gpu.free(dl);
            report("sample n=" + std::to_string(n) + " " + names[shape] + " logits (" + std::to_string(total) + " settings)",
                   same + fallback == total && bad_fallback == 0,
                   std::to_string(same) + " same, " + std::to_string(fallback) + " to host" +
                       (first_bad.empty() ? "" : "; " + first_bad));
        }
    }
}

// logits of one model on both backends. f16 models: a prefill of 300 random ids (all logits), then
// single-token decode steps. Static W4A4 models: a short real prompt and greedy decode steps, then the
// long-prompt checks above. Then decode with and without the CUDA graph (bit-identical) and its timing.
// All of it with the fp16 cache, and again with the int8 cache where the file has its scales.
static void test_model(const std::string & path) {
    ModelParams pc, pg;
    pc.device = "cpu";
    pg.device = "cuda";
    auto mc = std::make_shared<const Model>(path, pc);
    auto mg = std::make_shared<const Model>(path, pg);
    setenv("MERGEQUANT_CUDA_GRAPHS", "0", 1);
    auto mn = std::make_shared<const Model>(path, pg);
    unsetenv("MERGEQUANT_CUDA_GRAPHS");
    test_model_kv(path, mc, mg, mn, KV_TYPE_F16);
    if (mc->has_kv_scales()) test_model_kv(path, mc, mg, mn, KV_TYPE_I8);
}

int main(int argc, char ** argv) {
    try {
        std::string why;
        setenv("MERGEQUANT_CUDA_EXACT_CODES", "1", 1);  // attention_quant's exact path (the default is fp32 codes)
        auto gpu = backend_cuda_create(0, why);
        if (!gpu) {
            printf("no CUDA backend: %s\n", why.c_str());
            return 1;
        }
        auto cpu = backend_cpu_create(default_thread_count());
        // which prefill GEMM the integer schemes take from m = 64 (gemm-cublas-i8.cuh): the tests below run
        // whichever it is; MERGEQUANT_REQUIRE_CUBLAS=1 makes a missing cuBLAS a failure (MERGEQUANT_CUBLAS=0: the
        // tiled GEMM everywhere)
        const bool cublas = cuda_cublas_available();
        printf("integer prefill GEMM from m = 64: %s\n", cuda_cublas_i8_enabled(64) ? "cuBLAS int8" : "the tiled mma.sync GEMM");
        const char * req = std::getenv("MERGEQUANT_REQUIRE_CUBLAS");
        if (req && std::string(req) == "1") report("cuBLAS found (MERGEQUANT_REQUIRE_CUBLAS=1)", cublas);
        test_ops(*cpu, *gpu);
        test_w4a4_ops(*cpu, *gpu);
        test_linear_4bit(*cpu, *gpu);
        test_linear_w8a8(*cpu, *gpu);
        test_linear_w8a8s(*cpu, *gpu);
        test_linear_w4a8(*cpu, *gpu);
        test_linear_w4a4();
        test_sampling(*gpu);
        for (int i = 1; i < argc; i++) test_model(argv[i]);
    } catch (const std::exception & e) {
        printf("error: %s\n", e.what());
        g_fail++;
    }
    printf("\n%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
