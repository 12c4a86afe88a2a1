// Python binding of single CPU ops, for tests/test_ops.py, which compares each with the simulator and the numpy
// reference: `CpuOps(n_threads)` holds a CPU backend; every method runs one op of mq-backend.h on numpy arrays
// (host memory is the CPU backend's device memory), writing into the `out` array it is given. Kept to the op
// signatures: shapes are checked, semantics are the ops' own.
#include "mq-backend.h"
#include "mq-error.h"
#include "mq-file.h"

#include "../../engine/backends/cpu/cpu-simd.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <map>
#include <memory>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <typename T> using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu>;
using Tensors = std::map<std::string, nb::ndarray<nb::c_contig, nb::device::cpu>>;

struct CpuOps {
    std::unique_ptr<mq::Backend> be;
};

void need(bool ok, const std::string & what) {
    if (!ok) {
        throw mq::ArgError(what);
    }
}

// a linear of `scheme` over the arrays of `t` (the names of docs/format.md without the prefix: weight, qweight,
// scale, in_scale, in_map, lora_a, lora_b), bound to the backend's kernels; views keeps the TensorViews alive
struct TestLinear {
    std::vector<std::unique_ptr<mq::TensorView>> views;
    mq::Linear lin;
    mq::Backend * be = nullptr;
    TestLinear(mq::Backend & b, const std::string & scheme, int64_t n, int64_t k, const Tensors & t) : be(&b) {
        lin.name = "test", lin.scheme = scheme, lin.n = n, lin.k = k;
        auto view = [&](const char * key) -> const mq::TensorView * {
            auto it = t.find(key);
            if (it == t.end()) {
                return nullptr;
            }
            auto v = std::make_unique<mq::TensorView>();
            v->name = key;
            v->data = (const uint8_t *) it->second.data();
            v->nbytes = it->second.nbytes();
            for (size_t d = 0; d < it->second.ndim(); d++) {
                v->shape.push_back((int64_t) it->second.shape(d));
            }
            views.push_back(std::move(v));
            return views.back().get();
        };
        if (const mq::TensorView * w = view("weight")) {
            lin.tensors = {w};
        }
        lin.qweight = view("qweight");
        lin.scale = view("scale");
        lin.in_scale = view("in_scale");
        lin.in_map = view("in_map");
        lin.lora_a = view("lora_a");
        lin.lora_b = view("lora_b");
        lin.gscale = view("gscale");
        lin.bias = view("bias");
        lin.shift = view("shift");
        if (const mq::TensorView * bits = view("bits")) {  // w8a8: I32 [1]
            lin.qmax = (1 << (bits->as<int32_t>()[0] - 1)) - 1;
        } else if (scheme == "w4a8" || scheme == "w4a8g") {
            lin.qmax = 127;
        }
        if (lin.qweight) {
            lin.kp = scheme == "w8a8" || scheme == "w8a8s" ? lin.qweight->shape[1] : 2 * lin.qweight->shape[1];
        }
        if (scheme == "w4a16g" && lin.scale) {
            lin.group = k / lin.scale->shape[1];
        }
        if (scheme == "w4a8g" && lin.gscale) {
            lin.group = k / lin.gscale->shape[1];
        }
        if (lin.lora_a) {
            lin.rank = lin.lora_a->shape[0];
        }
        b.prepare_linear(lin);
    }
    ~TestLinear() { be->release_linear(lin); }
};

mq::KvScales kv_scales(const Arr<const float> * k_scale, const Arr<const float> * v_scale, std::vector<float> & inv) {
    mq::KvScales sc;
    if (!k_scale) {
        return sc;
    }
    const size_t n = k_scale->size();
    inv.resize(2 * n);
    for (size_t c = 0; c < n; c++) {
        inv[c] = 1.0f / k_scale->data()[c];  // as mq::Model computes them (docs/numerics.md)
        inv[n + c] = 1.0f / v_scale->data()[c];
    }
    sc.k_scale = k_scale->data(), sc.k_inv = inv.data();
    sc.v_scale = v_scale->data(), sc.v_inv = inv.data() + n;
    return sc;
}

}  // namespace

void bind_ops(nb::module_ & m) {
    m.def("cpu_isa", [] { return std::string(mq::cpu_kernels().isa); },
          "the CPU kernels' instruction set this process runs (avx512, avx2, scalar; MERGEQUANT_CPU forces one)");

    nb::class_<CpuOps>(m, "CpuOps")
        .def("__init__", [](CpuOps * self, int32_t n_threads) { new (self) CpuOps{mq::backend_cpu_create(n_threads)}; },
             "n_threads"_a = 1)
        .def("embed",
             [](CpuOps & o, Arr<const uint16_t> table, Arr<const int32_t> ids, Arr<float> out) {
                 const int32_t dim = (int32_t) table.shape(1);
                 need(out.size() == ids.size() * (size_t) dim, "embed: out must be [n, dim]");
                 for (size_t i = 0; i < ids.size(); i++) {
                     need(ids.data()[i] >= 0 && (size_t) ids.data()[i] < table.shape(0), "embed: id out of range");
                 }
                 o.be->embed_f16(table.data(), ids.data(), (int32_t) ids.size(), dim, out.data());
             })
        .def("embed_quant",
             [](CpuOps & o, const std::string & scheme, nb::ndarray<nb::c_contig, nb::device::cpu> qweight,
                nb::ndarray<nb::c_contig, nb::device::cpu> scale, Arr<const int32_t> ids, Arr<float> out) {
                 // the embedding read from the rows of a quantized output matrix: w8a8 (qweight I8 [V, D], scale
                 // F32 [V]) or w4a16g (qweight U8 [V, D/2], scale F16 [V, D/group])
                 need(qweight.ndim() == 2 && scale.ndim() >= 1 && scale.shape(0) == qweight.shape(0),
                      "embed_quant: qweight [V, ·] and scale [V, ...]");
                 mq::EmbedTable t;
                 int32_t dim = 0;
                 if (scheme == "w8a8") {
                     need(qweight.dtype() == nb::dtype<int8_t>() && scale.dtype() == nb::dtype<float>() && scale.ndim() == 1,
                          "embed_quant: w8a8 needs qweight int8 [V, D] and scale float32 [V]");
                     t.kind = mq::EMBED_I8_ROW;
                     dim = (int32_t) qweight.shape(1);
                 } else if (scheme == "w4a16g") {
                     need(qweight.dtype() == nb::dtype<uint8_t>() && scale.dtype() == nb::dtype<uint16_t>() &&
                              scale.ndim() == 2 && (2 * qweight.shape(1)) % scale.shape(1) == 0,
                          "embed_quant: w4a16g needs qweight uint8 [V, D/2] and scale fp16 bits (uint16) [V, D/group]");
                     t.kind = mq::EMBED_I4_GROUP;
                     dim = (int32_t) (2 * qweight.shape(1));
                     t.group = dim / (int32_t) scale.shape(1);
                 } else {
                     throw mq::ArgError("embed_quant: scheme must be w8a8 or w4a16g, got '" + scheme + "'");
                 }
                 need(out.size() == ids.size() * (size_t) dim, "embed_quant: out must be [n, D]");
                 for (size_t i = 0; i < ids.size(); i++) {
                     need(ids.data()[i] >= 0 && (size_t) ids.data()[i] < qweight.shape(0), "embed_quant: id out of range");
                 }
                 t.data = qweight.data();
                 t.scale = scale.data();
                 o.be->embed(t, ids.data(), (int32_t) ids.size(), dim, out.data());
             })
        .def("rmsnorm",
             [](CpuOps & o, Arr<const float> x, Arr<const float> w, float eps, Arr<float> out) {
                 const int32_t dim = (int32_t) w.size();
                 need(x.size() % dim == 0 && out.size() == x.size(), "rmsnorm: x and out must be [m, dim]");
                 o.be->rmsnorm(x.data(), w.data(), (int32_t) (x.size() / dim), dim, eps, out.data());
             })
        .def("rmsnorm_quant",
             [](CpuOps & o, Arr<const float> x, const Tensors & t, int64_t n, float eps, Arr<int8_t> out) {
                 const int64_t k = (int64_t) x.shape(1);
                 TestLinear c(*o.be, "w4a4", n, k, t);
                 need(out.size() == x.shape(0) * (size_t) c.lin.kp, "rmsnorm_quant: out must be [m, kp]");
                 o.be->rmsnorm_quant(x.data(), c.lin, (int32_t) x.shape(0), (int32_t) k, eps, out.data());
             })
        .def("quantize_codes",
             [](CpuOps & o, Arr<const float> x, int64_t kp, Arr<int8_t> out) {
                 mq::Linear c;
                 c.kp = kp;
                 need(out.size() == x.shape(0) * (size_t) kp && (int64_t) x.shape(1) <= kp,
                      "quantize_codes: out must be [m, kp], kp >= k");
                 o.be->quantize_codes(x.data(), (int32_t) x.shape(0), (int32_t) x.shape(1), c, out.data());
             })
        .def("swiglu",
             [](CpuOps & o, Arr<const float> gu, Arr<float> out) {
                 const int32_t n_ff = (int32_t) gu.shape(1) / 2;
                 need(out.size() == gu.size() / 2, "swiglu: out must be [m, n_ff]");
                 o.be->swiglu(gu.data(), (int32_t) gu.shape(0), n_ff, out.data());
             })
        .def("swiglu_quant",
             [](CpuOps & o, Arr<const float> gu, const Tensors & t, int64_t n, Arr<int8_t> out) {
                 const int32_t n_ff = (int32_t) gu.shape(1) / 2;
                 TestLinear c(*o.be, "w4a4", n, n_ff, t);
                 need(out.size() == gu.shape(0) * (size_t) c.lin.kp, "swiglu_quant: out must be [m, kp]");
                 o.be->swiglu_quant(gu.data(), c.lin, (int32_t) gu.shape(0), n_ff, out.data());
             })
        .def("rope",
             [](CpuOps & o, Arr<float> qkv, int32_t n_head, int32_t n_head_kv, int32_t head_dim, Arr<const int32_t> pos,
                float theta, float factor, float low_freq_factor, float high_freq_factor, int32_t original_max_pos) {
                 need(pos.size() == qkv.shape(0), "rope: one position per row");
                 mq::RopeParams rp{theta, factor, low_freq_factor, high_freq_factor, original_max_pos};
                 o.be->rope(qkv.data(), (int32_t) qkv.shape(0), (int32_t) qkv.shape(1), n_head, n_head_kv, head_dim,
                            pos.data(), rp);
             })
        .def("kv_store",
             [](CpuOps & o, Arr<const float> qkv, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                Arr<const int32_t> pos, nb::ndarray<nb::c_contig, nb::device::cpu> k_cache,
                nb::ndarray<nb::c_contig, nb::device::cpu> v_cache, std::optional<Arr<const float>> k_scale,
                std::optional<Arr<const float>> v_scale) {
                 const bool i8 = k_scale.has_value();
                 const size_t kv_dim = (size_t) n_head_kv * head_dim, n_ctx = k_cache.nbytes() / (kv_dim * (i8 ? 1 : 2));
                 for (size_t i = 0; i < pos.size(); i++) {
                     need(pos.data()[i] >= 0 && (size_t) pos.data()[i] < n_ctx, "kv_store: position outside the cache");
                 }
                 mq::AttentionShape s{n_head, n_head_kv, head_dim, (int32_t) n_ctx, i8 ? mq::KV_TYPE_I8 : mq::KV_TYPE_F16};
                 std::vector<float> inv;
                 const mq::KvScales sc = kv_scales(i8 ? &*k_scale : nullptr, i8 ? &*v_scale : nullptr, inv);
                 o.be->kv_store(qkv.data(), (int32_t) qkv.shape(0), (int32_t) qkv.shape(1), s, pos.data(), sc,
                                k_cache.data(), v_cache.data());
             },
             "qkv"_a, "n_head"_a, "n_head_kv"_a, "head_dim"_a, "pos"_a, "k_cache"_a, "v_cache"_a, "k_scale"_a = nb::none(),
             "v_scale"_a = nb::none())
        .def("attention",
             [](CpuOps & o, Arr<const float> qkv, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                Arr<const int32_t> pos, nb::ndarray<nb::c_contig, nb::device::cpu> k_cache,
                nb::ndarray<nb::c_contig, nb::device::cpu> v_cache, Arr<float> out, std::optional<Arr<const float>> k_scale,
                std::optional<Arr<const float>> v_scale) {
                 const bool i8 = k_scale.has_value();
                 const size_t kv_dim = (size_t) n_head_kv * head_dim, n_ctx = k_cache.nbytes() / (kv_dim * (i8 ? 1 : 2));
                 for (size_t i = 0; i < pos.size(); i++) {
                     need(pos.data()[i] >= 0 && (size_t) pos.data()[i] < n_ctx, "attention: position outside the cache");
                 }
                 need(out.size() == qkv.shape(0) * (size_t) n_head * head_dim, "attention: out must be [n, n_head*head_dim]");
                 mq::AttentionShape s{n_head, n_head_kv, head_dim, (int32_t) n_ctx, i8 ? mq::KV_TYPE_I8 : mq::KV_TYPE_F16};
                 std::vector<float> inv;
                 const mq::KvScales sc = kv_scales(i8 ? &*k_scale : nullptr, i8 ? &*v_scale : nullptr, inv);
                 o.be->attention(qkv.data(), (int32_t) qkv.shape(0), (int32_t) qkv.shape(1), s, pos.data(), sc,
                                 k_cache.data(), v_cache.data(), out.data());
             },
             "qkv"_a, "n_head"_a, "n_head_kv"_a, "head_dim"_a, "pos"_a, "k_cache"_a, "v_cache"_a, "out"_a,
             "k_scale"_a = nb::none(), "v_scale"_a = nb::none())
        .def("linear",
             [](CpuOps & o, const std::string & scheme, const Tensors & t, int64_t n, Arr<const float> x, Arr<float> out,
                bool accumulate) {
                 TestLinear l(*o.be, scheme, n, (int64_t) x.shape(1), t);
                 need(out.size() == x.shape(0) * (size_t) n, "linear: out must be [m, n]");
                 o.be->linear(l.lin, x.data(), (int32_t) x.shape(0), out.data(), accumulate);
             },
             "scheme"_a, "tensors"_a, "n"_a, "x"_a, "out"_a, "accumulate"_a = false)
        .def("linear_codes",
             [](CpuOps & o, const std::string & scheme, const Tensors & t, int64_t n, int64_t k, Arr<const int8_t> a,
                Arr<float> out, bool accumulate) {
                 TestLinear l(*o.be, scheme, n, k, t);
                 need((int64_t) a.shape(1) == l.lin.kp && out.size() == a.shape(0) * (size_t) n,
                      "linear_codes: a must be [m, kp], out [m, n]");
                 o.be->linear_codes(l.lin, a.data(), (int32_t) a.shape(0), out.data(), accumulate);
             },
             "scheme"_a, "tensors"_a, "n"_a, "k"_a, "a"_a, "out"_a, "accumulate"_a = false)
        .def("linear_codes_swiglu_quant",
             [](CpuOps & o, const Tensors & gate_up, int64_t k, Arr<const int8_t> a, const Tensors & down, int64_t n_down,
                Arr<int8_t> out) {
                 const int64_t n_ff = (int64_t) gate_up.at("qweight").shape(0) / 2;
                 TestLinear gu(*o.be, "w4a4", 2 * n_ff, k, gate_up), d(*o.be, "w4a4", n_down, n_ff, down);
                 need((int64_t) a.shape(1) == gu.lin.kp && out.size() == a.shape(0) * (size_t) d.lin.kp,
                      "linear_codes_swiglu_quant: a must be [m, gate_up kp], out [m, down kp]");
                 std::vector<float> scratch((size_t) a.shape(0) * 2 * n_ff);
                 o.be->linear_codes_swiglu_quant(gu.lin, a.data(), (int32_t) a.shape(0), d.lin, (int32_t) n_ff,
                                                 scratch.data(), out.data());
             })
        .def("int_gemm",
             [](CpuOps & o, const std::string & scheme, const Tensors & t, int64_t n, int64_t k, Arr<const int8_t> a,
                Arr<int32_t> out) {
                 TestLinear l(*o.be, scheme, n, k, t);
                 need((int64_t) a.shape(1) == l.lin.kp && out.size() == a.shape(0) * (size_t) n,
                      "int_gemm: a must be [m, kp], out [m, n]");
                 o.be->int_gemm(l.lin, a.data(), (int32_t) a.shape(0), out.data());
             });
}
