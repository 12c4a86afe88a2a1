// Memory planning (see mq-memory.h). The sizes are the allocations mq-context.cpp makes, written out once
// here so the plan, `mergequant inspect` and the check agree with what is allocated.
#include "mq-memory.h"

#include "mq-context.h"
#include "mq-error.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <sys/resource.h>

namespace mq {

int32_t default_n_ctx(const Config & c) {
    return std::min(c.n_ctx_train, DEFAULT_N_CTX_MAX);
}

size_t kv_bytes_per_token(const Config & c, KvType t) {
    return 2 * (size_t) c.n_layer * (size_t) c.kv_dim() * kv_elem_size(t);
}

int32_t logit_rows(const Config & c, int32_t n_batch) {
    const size_t fit = LOGITS_BUFFER_BYTES / ((size_t) std::max(c.n_vocab, 1) * sizeof(float));
    return (int32_t) std::max<size_t>(1, std::min<size_t>((size_t) std::max(n_batch, 1), fit));
}

// x, h [B, D]; qkv [B, (H + 2 Hkv) hd]; attn [B, H hd]; gate/up [B, 2F]; act [B, F]; logits [logit_rows, V]
// (fp32); ids, pos [B] (int32); two code buffers [B, max Kp] (int8)
size_t scratch_bytes(const Config & c, int32_t n_batch, int64_t max_kp) {
    const size_t B = (size_t) n_batch;
    const size_t floats = B * (2 * (size_t) c.n_embd + (size_t) c.qkv_dim() + (size_t) c.q_dim() +
                               3 * (size_t) c.n_ff) + (size_t) logit_rows(c, n_batch) * (size_t) c.n_vocab;
    return floats * sizeof(float) + 2 * B * sizeof(int32_t) + 2 * std::max<size_t>(1, B * (size_t) max_kp);
}

size_t weight_bytes(const File & file) {
    size_t n = 0;
    for (const auto & kv : file.tensors()) {
        if (kv.first.compare(0, 10, "tokenizer.") != 0) {
            n += kv.second.nbytes;
        }
    }
    return n;
}

MemoryPlan memory_plan(const Model & model, int32_t n_ctx, int32_t n_batch, KvType kv_type) {
    const Config & c = model.config();
    MemoryPlan p;
    p.n_ctx = n_ctx > 0 ? n_ctx : default_n_ctx(c);
    p.n_batch = std::max(1, std::min(n_batch > 0 ? n_batch : model.backend().default_n_batch(), p.n_ctx));
    p.kv_type = kv_type;
    int64_t max_kp = 0;
    for (const LayerWeights & L : model.layers) {
        for (const Linear * lin : {&L.attn_qkv, &L.attn_output, &L.ffn_gate_up, &L.ffn_down}) {
            max_kp = std::max(max_kp, lin->kp);
        }
    }
    p.weights = weight_bytes(model.file());
    p.kv_cache = (size_t) p.n_ctx * kv_bytes_per_token(c, kv_type);
    p.scratch = scratch_bytes(c, p.n_batch, max_kp);
    return p;
}

// a "key: value kB" line of a /proc file, in bytes; false when absent
static bool proc_kb(const char * path, const char * key, size_t & bytes) {
    std::ifstream f(path);
    std::string line;
    const size_t n = std::char_traits<char>::length(key);
    while (std::getline(f, line)) {
        if (line.compare(0, n, key) == 0 && line.size() > n && line[n] == ':') {
            bytes = (size_t) std::stoull(line.substr(n + 1)) * 1024;
            return true;
        }
    }
    return false;
}

static bool read_number(const char * path, size_t & v) {
    std::ifstream f(path);
    std::string s;
    if (!(f >> s) || s.find_first_not_of("0123456789") != std::string::npos) {
        return false;  // absent, or "max" (no limit)
    }
    v = (size_t) std::stoull(s);
    return true;
}

static bool host_available(size_t & bytes) {
    if (!proc_kb("/proc/meminfo", "MemAvailable", bytes)) {
        return false;
    }
    size_t limit = 0, used = 0;
    if (read_number("/sys/fs/cgroup/memory.max", limit) && read_number("/sys/fs/cgroup/memory.current", used)) {
        bytes = std::min(bytes, limit > used ? limit - used : 0);
    }
    // an address-space limit (ulimit -v) counts mapped and reserved memory, not only what is touched
    struct rlimit rl;
    size_t vm = 0;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && proc_kb("/proc/self/status", "VmSize", vm)) {
        bytes = std::min(bytes, (size_t) rl.rlim_cur > vm ? (size_t) rl.rlim_cur - vm : 0);
    }
    return true;
}

bool memory_available(Backend & backend, size_t & bytes) {
    if (backend.free_device_memory(bytes)) {
        return true;
    }
    return backend.name() == "cpu" && host_available(bytes);
}

std::string format_bytes(size_t bytes) {
    char buf[32];
    if (bytes >= (size_t(1) << 30)) {
        snprintf(buf, sizeof buf, "%.2f GiB", bytes / double(size_t(1) << 30));
    } else if (bytes >= (size_t(1) << 20)) {
        snprintf(buf, sizeof buf, "%.1f MiB", bytes / double(size_t(1) << 20));
    } else {
        snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024.0);
    }
    return buf;
}

void memory_check_weights(Backend & backend, const File & file) {
    size_t avail = 0;
    const size_t need = weight_bytes(file);
    // the CPU backend reads the weights from the mapping (the page cache), so only a device copy is checked
    if (backend.name() != "cpu" && memory_available(backend, avail) && need > avail) {
        throw Error("not enough " + backend.name() + " device memory for the weights of '" + file.path() + "': " +
                    format_bytes(need) + " needed, " + format_bytes(avail) + " free (use a smaller model or device=\"cpu\")");
    }
}

void memory_check_context(Backend & backend, const Model & model, const MemoryPlan & plan) {
    size_t avail = 0;
    if (!memory_available(backend, avail) || plan.context() <= avail) {
        return;
    }
    const Config & c = model.config();
    // the largest n_ctx whose cache and scratch fit, per KV cache type (int8 only where the file has scales)
    auto fitting = [&](KvType t) -> int64_t {
        if (avail <= plan.scratch) {
            return 0;
        }
        return std::min<int64_t>((int64_t) ((avail - plan.scratch) / kv_bytes_per_token(c, t)), c.n_ctx_train);
    };
    std::ostringstream msg;
    msg << "not enough " << (backend.name() == "cpu" ? "host memory" : backend.name() + " device memory")
        << " for a context of n_ctx = " << plan.n_ctx << " with kv_cache = " << kv_type_name(plan.kv_type)
        << ": the KV cache needs " << format_bytes(plan.kv_cache) << " and scratch " << format_bytes(plan.scratch)
        << " (n_batch " << plan.n_batch << "), " << format_bytes(avail) << " is available";
    const int64_t fit = fitting(plan.kv_type);
    if (fit >= 1) {
        msg << "; n_ctx <= " << fit << " fits with kv_cache = " << kv_type_name(plan.kv_type);
    } else {
        msg << "; no n_ctx fits with kv_cache = " << kv_type_name(plan.kv_type);
    }
    if (plan.kv_type == KV_TYPE_F16 && model.has_kv_scales()) {
        msg << ", n_ctx <= " << fitting(KV_TYPE_I8) << " with kv_cache = int8";
    }
    throw Error(msg.str());
}

}  // namespace mq
