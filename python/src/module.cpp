// The nanobind extension `mergequant._engine`: a thin skin over the C++ engine. Long calls (load,
// prefill, decode steps, scoring) release the GIL.
//
// Threads: a Model's backend (its thread pool, its device buffers) and a Session's context and generator
// are used by one thread at a time. Every call that touches them runs under the model's lock, taken with
// the GIL released (so a thread waiting for it never holds the GIL that the holder needs back); a
// Session's generator is only ever replaced under that lock, and next() names the start() it continues,
// so a stream whose generation was replaced raises instead of reading another one's state.
#include "mq-context.h"
#include "mq-error.h"
#include "mq-memory.h"
#include "mq-model.h"
#include "mq-vocab.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <map>
#include <memory>
#include <mutex>

namespace nb = nanobind;
using namespace nb::literals;

void bind_tokenizer(nb::module_ & m);
void bind_ops(nb::module_ & m);

namespace {

// the lock of a model's backend, shared by every Session on it. Keyed by address: a later model at a
// freed address reuses an idle mutex, so the table only grows with the number of models alive at once.
std::mutex & model_lock(const mq::Model & md) {
    static std::mutex table_lock;
    static std::map<const mq::Model *, std::unique_ptr<std::mutex>> table;
    std::lock_guard<std::mutex> g(table_lock);
    std::unique_ptr<std::mutex> & m = table[&md];
    if (!m) {
        m.reset(new std::mutex());
    }
    return *m;
}

// fn() with the GIL released and the model locked; the lock is dropped before the GIL is taken back
template <typename F> auto locked(const mq::Model & md, F && fn) -> decltype(fn()) {
    nb::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(model_lock(md));
    return fn();
}

struct Session {
    std::shared_ptr<mq::Model> model;
    std::unique_ptr<mq::Context> ctx;
    std::unique_ptr<mq::Generator> gen;
    uint64_t gen_id = 0;  // the start() that made gen (1, 2, ...)
    int32_t n_batch = 0;

    template <typename F> auto locked(F && fn) -> decltype(fn()) { return ::locked(*model, std::forward<F>(fn)); }
};

// the memory plan of a context (mq-memory.h) as {n_ctx, n_batch, kv_cache, weights, kv_cache_bytes,
// scratch, total, available (None when unknown)} in bytes
nb::dict memory_dict(mq::Model & md, int32_t n_ctx, int32_t n_batch, mq::KvType kv) {
    const mq::MemoryPlan p = mq::memory_plan(md, n_ctx, n_batch, kv);
    size_t avail = 0;
    const bool known = locked(md, [&] { return mq::memory_available(md.backend(), avail); });
    nb::dict d;
    d["device"] = md.backend().name();
    d["n_ctx"] = p.n_ctx;
    d["n_batch"] = p.n_batch;
    d["kv_cache"] = std::string(mq::kv_type_name(p.kv_type));
    d["weights"] = p.weights;
    d["kv_cache_bytes"] = p.kv_cache;
    d["scratch"] = p.scratch;
    d["total"] = p.weights + p.context();
    d["available"] = known ? nb::cast(avail) : nb::none();
    return d;
}

nb::dict timings_dict(const mq::Timings & t) {
    nb::dict d;
    d["n_prompt"] = t.n_prompt;
    d["n_cached"] = t.n_cached;
    d["n_prefill"] = t.n_prefill;
    d["n_decode"] = t.n_decode;
    d["prefill_ms"] = t.prefill_ms;
    d["decode_ms"] = t.decode_ms;
    return d;
}

// Evaluates ids[0..n) in a fresh context, in chunks, and calls fn(i, logits after ids[i], log-sum-exp of them).
template <typename F> void eval_positions(Session & s, const std::vector<int32_t> & ids, int32_t n, F fn) {
    const int32_t nv = s.model->config().n_vocab;
    const int32_t chunk = 256;
    s.gen.reset();
    s.ctx->truncate(0);
    for (int32_t b = 0; b < n; b += chunk) {
        const int32_t e = std::min(n, b + chunk);
        const std::vector<float> & l = s.ctx->eval(std::vector<int32_t>(ids.begin() + b, ids.begin() + e), true);
        for (int32_t i = b; i < e; i++) {
            const float * row = l.data() + (size_t) (i - b) * nv;
            double mx = row[0];
            for (int32_t j = 1; j < nv; j++) {
                mx = std::max(mx, (double) row[j]);
            }
            double sum = 0.0;
            for (int32_t j = 0; j < nv; j++) {
                sum += std::exp((double) row[j] - mx);
            }
            fn(i, row, mx + std::log(sum));
        }
    }
}

const mq::Linear * find_linear(const mq::Model & md, const std::string & name) {
    for (const mq::LayerWeights & L : md.layers) {
        for (const mq::Linear * lin : {&L.attn_qkv, &L.attn_output, &L.ffn_gate_up, &L.ffn_down}) {
            if (lin->name == name) {
                return lin;
            }
        }
    }
    throw mq::ArgError("no linear named '" + name + "' (expected e.g. 'blk.0.attn_qkv')");
}

}  // namespace

NB_MODULE(_engine, m) {
    m.doc() = "mergequant C++ engine";

    nb::exception<mq::Error> error(m, "EngineError", PyExc_RuntimeError);
    nb::exception<mq::ArgError>(m, "ArgumentError", PyExc_ValueError);
    nb::exception<mq::ContextOverflow>(m, "ContextOverflowError", PyExc_ValueError);

    m.def("cuda_built", &mq::backend_cuda_built, "whether this build contains the CUDA backend");
    m.def("cuda_unavailable_reason", []() {
        std::string why;
        std::unique_ptr<mq::Backend> be = mq::backend_cuda_create(0, why);
        return be ? std::string() : why;
    }, "empty when a usable CUDA GPU is present, else why not");
    m.def("default_threads", &mq::default_thread_count);

    nb::class_<mq::Model>(m, "Model")
        .def("__init__",
             [](mq::Model * self, const std::string & path, const std::string & device, int32_t n_threads) {
                 mq::ModelParams p;
                 p.device = device;
                 p.n_threads = n_threads;
                 nb::gil_scoped_release release;
                 new (self) mq::Model(path, p);
             },
             "path"_a, "device"_a = "auto", "n_threads"_a = 0)
        .def_prop_ro("backend", [](const mq::Model & md) { return md.backend().name(); })
        .def_prop_ro("n_threads", &mq::Model::n_threads)
        .def_prop_ro("n_vocab", [](const mq::Model & md) { return md.config().n_vocab; })
        .def_prop_ro("n_ctx_train", [](const mq::Model & md) { return md.config().n_ctx_train; })
        .def_prop_ro("n_layer", [](const mq::Model & md) { return md.config().n_layer; })
        .def_prop_ro("quant_method", &mq::Model::quant_method)
        .def_prop_ro("has_kv_scales", &mq::Model::has_kv_scales)
        .def_prop_ro("bos_id", [](const mq::Model & md) { return md.vocab().bos(); })
        .def_prop_ro("eos_id", [](const mq::Model & md) { return md.vocab().eos(); })
        .def_prop_ro("eot_ids", [](const mq::Model & md) { return md.vocab().eot_ids(); })
        .def_prop_ro("chat_template", [](const mq::Model & md) { return md.vocab().chat_template(); })
        .def("metadata", [](const mq::Model & md, const std::string & key) {
            auto it = md.file().metadata().find(key);
            return it == md.file().metadata().end() ? std::string() : it->second;
        })
        .def("memory_plan",
             [](mq::Model & md, int32_t n_ctx, int32_t n_batch, const std::string & kv_cache) {
                 return memory_dict(md, n_ctx, n_batch, mq::kv_type_parse(kv_cache));
             },
             "n_ctx"_a = 0, "n_batch"_a = 0, "kv_cache"_a = "fp16",
             "the memory a context with these settings would take (n_ctx 0: min(trained context, 4096))")
        .def("tokenize",
             [](const mq::Model & md, const std::string & text, bool add_special, bool special) {
                 nb::gil_scoped_release release;
                 return md.vocab().encode(text, add_special, special);
             },
             "text"_a, "add_special"_a = true, "special"_a = false)
        .def("detokenize",
             [](const mq::Model & md, const std::vector<int32_t> & ids, bool special) {
                 for (int32_t id : ids) {
                     if (id < 0 || id >= md.vocab().n_tokens()) {
                         throw mq::ArgError("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                            std::to_string(md.vocab().n_tokens()) + ")");
                     }
                 }
                 std::string s = md.vocab().decode(ids, special);
                 return nb::bytes(s.data(), s.size());
             },
             "ids"_a, "special"_a = false)
        .def("int_gemm",
             [](mq::Model & md, const std::string & name, nb::ndarray<const int8_t, nb::ndim<2>, nb::c_contig> a) {
                 const mq::Linear * lin = find_linear(md, name);
                 if ((int64_t) a.shape(1) != lin->kp) {
                     throw mq::ArgError("int_gemm: codes have " + std::to_string(a.shape(1)) + " columns, linear '" +
                                        name + "' takes " + std::to_string(lin->kp));
                 }
                 const int32_t m = (int32_t) a.shape(0);
                 mq::Backend & be = md.backend();
                 int32_t * out = new int32_t[(size_t) m * lin->n];
                 locked(md, [&] {
                     void * a_dev = be.alloc(a.size());
                     void * acc_dev = be.alloc((size_t) m * lin->n * sizeof(int32_t));
                     be.upload(a_dev, a.data(), a.size());
                     be.int_gemm(*lin, (const int8_t *) a_dev, m, (int32_t *) acc_dev);
                     be.download(out, acc_dev, (size_t) m * lin->n * sizeof(int32_t));
                     be.free(a_dev);
                     be.free(acc_dev);
                 });
                 nb::capsule owner(out, [](void * p) noexcept { delete[] (int32_t *) p; });
                 return nb::ndarray<nb::numpy, int32_t, nb::ndim<2>>(out, {(size_t) m, (size_t) lin->n}, owner);
             },
             "name"_a, "codes"_a, "the exact int32 GEMM of a 4-bit linear on int4 codes [m, kp] (for tests)");

    nb::class_<Session>(m, "Session")
        .def("__init__",
             [](Session * self, std::shared_ptr<mq::Model> model, int32_t n_ctx, int32_t n_batch,
                const std::string & kv_cache) {
                 mq::ContextParams p;
                 p.n_ctx = n_ctx;
                 p.n_batch = n_batch;
                 p.kv_type = mq::kv_type_parse(kv_cache);
                 // the context first: a Session constructed in place before a throw would never be
                 // destroyed (nor the model it holds)
                 std::unique_ptr<mq::Context> ctx;
                 locked(*model, [&] { ctx.reset(new mq::Context(model, p)); });
                 new (self) Session();
                 self->model = model;
                 self->ctx = std::move(ctx);
                 self->n_batch = self->ctx->n_batch();
             },
             "model"_a, "n_ctx"_a = 0, "n_batch"_a = 0, "kv_cache"_a = "fp16")
        .def_prop_ro("n_ctx", [](const Session & s) { return s.ctx->n_ctx(); })
        .def("memory", [](Session & s) { return memory_dict(*s.model, s.ctx->n_ctx(), s.n_batch, s.ctx->kv_type()); },
             "the memory plan of this context (weights, KV cache, scratch, what is available)")
        .def_prop_ro("kv_cache", [](const Session & s) { return std::string(mq::kv_type_name(s.ctx->kv_type())); })
        .def_prop_ro("tokens", [](Session & s) { return s.locked([&] { return s.ctx->tokens(); }); })
        .def("reset", [](Session & s) {
            s.locked([&] {
                s.gen.reset();
                s.ctx->truncate(0);
            });
        })
        .def("start",
             [](Session & s, const std::vector<int32_t> & prompt, int32_t max_tokens, float temperature, int32_t top_k,
                float top_p, float min_p, float repetition_penalty, int64_t seed,
                const std::vector<std::string> & stop, const std::vector<int32_t> & stop_ids, bool ignore_eos) {
                 mq::GenerateParams g;
                 g.max_tokens = max_tokens;
                 g.sampling.temperature = temperature;
                 g.sampling.top_k = top_k;
                 g.sampling.top_p = top_p;
                 g.sampling.min_p = min_p;
                 g.sampling.repetition_penalty = repetition_penalty;
                 g.sampling.seed = seed;
                 g.stop = stop;
                 g.stop_ids = stop_ids;
                 g.ignore_eos = ignore_eos;
                 return s.locked([&] {
                     s.gen.reset();
                     s.gen_id++;
                     s.gen.reset(new mq::Generator(*s.ctx, prompt, g));
                     return s.gen_id;
                 });
             },
             "prompt"_a, "max_tokens"_a, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a, "repetition_penalty"_a,
             "seed"_a, "stop"_a, "stop_ids"_a, "ignore_eos"_a = false,
             "validate the settings and prefill the prompt (reusing the cached prefix); returns the id that "
             "next() takes")
        .def("next",
             [](Session & s, uint64_t id) -> std::optional<nb::bytes> {
                 std::string text;
                 const bool more = s.locked([&] {
                     if (id == 0 || id > s.gen_id) {
                         throw mq::ArgError("next(" + std::to_string(id) + "): not an id that start() returned");
                     }
                     if (id != s.gen_id || !s.gen) {
                         throw mq::Error("this stream was interrupted: a later generation (or scoring call) on the "
                                         "same model replaced it; finish or close a stream before starting another, "
                                         "or use one LLM per concurrent stream");
                     }
                     return s.gen->next(text);
                 });
                 if (!more && text.empty()) {
                     return std::nullopt;
                 }
                 return nb::bytes(text.data(), text.size());
             },
             "id"_a, "one decode step of the generation start() returned `id` for: the newly completed UTF-8 "
             "bytes, or None when finished")
        .def_prop_ro("finish_reason", [](Session & s) {
            return s.locked([&] { return s.gen ? s.gen->finish_reason() : std::string(); });
        })
        .def_prop_ro("output_tokens", [](Session & s) {
            return s.locked([&] { return s.gen ? s.gen->output_tokens() : std::vector<int32_t>(); });
        })
        .def_prop_ro("timings", [](Session & s) {
            return timings_dict(s.locked([&] { return s.gen ? s.gen->timings() : mq::Timings(); }));
        })
        .def("logits",
             [](Session & s, const std::vector<int32_t> & ids, bool fresh) {
                 const int32_t nv = s.model->config().n_vocab;
                 std::unique_ptr<float[]> out(new float[nv]);
                 s.locked([&] {
                     if (fresh) {
                         s.gen.reset();
                         s.ctx->truncate(0);
                     }
                     const std::vector<float> & l = s.ctx->eval(ids, false);
                     std::copy(l.begin(), l.begin() + nv, out.get());
                 });
                 nb::capsule owner(out.get(), [](void * p) noexcept { delete[] (float *) p; });
                 return nb::ndarray<nb::numpy, float, nb::ndim<1>>(out.release(), {(size_t) nv}, owner);
             },
             "ids"_a, "fresh"_a = false,
             "append ids to the cache (to an empty one when fresh) and return the fp32 logits of the last one")
        .def("token_logprobs",
             [](Session & s, const std::vector<int32_t> & ids) {
                 // log p(ids[i+1] | ids[..i]) for i < n-1
                 const int32_t n = (int32_t) ids.size();
                 if (n < 2) {
                     throw mq::ArgError("token_logprobs needs at least 2 tokens");
                 }
                 std::unique_ptr<double[]> out(new double[n - 1]);
                 s.locked([&] {
                     eval_positions(s, ids, n - 1, [&](int32_t i, const float * row, double lse) {
                         out[i] = (double) row[ids[i + 1]] - lse;
                     });
                 });
                 nb::capsule owner(out.get(), [](void * p) noexcept { delete[] (double *) p; });
                 return nb::ndarray<nb::numpy, double, nb::ndim<1>>(out.release(), {(size_t) (n - 1)}, owner);
             },
             "ids"_a)
        .def("log_probs",
             [](Session & s, const std::vector<int32_t> & ids) {
                 // log-softmax of the logits after every token of ids: [n, n_vocab]
                 const int32_t n = (int32_t) ids.size();
                 if (n < 1) {
                     throw mq::ArgError("log_probs needs at least 1 token");
                 }
                 const int32_t nv = s.model->config().n_vocab;
                 std::unique_ptr<float[]> out(new float[(size_t) n * nv]);
                 s.locked([&] {
                     eval_positions(s, ids, n, [&](int32_t i, const float * row, double lse) {
                         float * o = out.get() + (size_t) i * nv;
                         for (int32_t j = 0; j < nv; j++) {
                             o[j] = (float) ((double) row[j] - lse);
                         }
                     });
                 });
                 nb::capsule owner(out.get(), [](void * p) noexcept { delete[] (float *) p; });
                 return nb::ndarray<nb::numpy, float, nb::ndim<2>>(out.release(), {(size_t) n, (size_t) nv}, owner);
             },
             "ids"_a)
        .def("kv_cache_rows",
             [](Session & s, int32_t layer) {
                 // layer's K and V cache rows of the cached tokens as stored: uint16 fp16 bits or int8 codes
                 std::vector<uint8_t> rows[2];
                 size_t n = 0;
                 s.locked([&] {
                     s.ctx->read_kv(layer, rows[0], rows[1]);
                     n = s.ctx->tokens().size();
                 });
                 const size_t kv_dim = (size_t) s.model->config().kv_dim();
                 nb::dict out;
                 for (int i = 0; i < 2; i++) {
                     uint8_t * buf = new uint8_t[std::max<size_t>(rows[i].size(), 1)];
                     std::copy(rows[i].begin(), rows[i].end(), buf);
                     nb::capsule owner(buf, [](void * p) noexcept { delete[] (uint8_t *) p; });
                     const char * key = i ? "v" : "k";
                     if (s.ctx->kv_type() == mq::KV_TYPE_I8) {
                         out[key] = nb::ndarray<nb::numpy, int8_t, nb::ndim<2>>((int8_t *) buf, {n, kv_dim}, owner);
                     } else {
                         out[key] = nb::ndarray<nb::numpy, uint16_t, nb::ndim<2>>((uint16_t *) buf, {n, kv_dim}, owner);
                     }
                 }
                 return out;
             },
             "layer"_a, "{'k', 'v'}: layer's cache rows of the cached tokens as stored, [n, kv_dim] (for tests)")
        .def("trace_codes",
             [](Session & s, const std::vector<int32_t> & ids) {
                 // the int4 input codes of every w4a4 linear while evaluating ids in a fresh context
                 std::map<std::string, std::vector<int8_t>> codes;
                 std::map<std::string, int64_t> widths;
                 s.locked([&] {
                     s.gen.reset();
                     s.ctx->truncate(0);
                     s.ctx->set_code_trace([&](const std::string & name, const std::vector<int8_t> & c, int32_t,
                                               int64_t kp) {
                         auto & v = codes[name];
                         v.insert(v.end(), c.begin(), c.end());
                         widths[name] = kp;
                     });
                     try {
                         s.ctx->eval(ids, false);
                     } catch (...) {
                         s.ctx->set_code_trace(nullptr);
                         throw;
                     }
                     s.ctx->set_code_trace(nullptr);
                 });
                 nb::dict out;
                 for (auto & kv : codes) {
                     const int64_t kp = widths[kv.first];
                     int8_t * buf = new int8_t[kv.second.size()];
                     std::copy(kv.second.begin(), kv.second.end(), buf);
                     nb::capsule owner(buf, [](void * p) noexcept { delete[] (int8_t *) p; });
                     out[kv.first.c_str()] = nb::ndarray<nb::numpy, int8_t, nb::ndim<2>>(
                         buf, {kv.second.size() / (size_t) kp, (size_t) kp}, owner);
                 }
                 return out;
             },
             "ids"_a);

    bind_tokenizer(m);
    bind_ops(m);
}
