// The scheme table and each scheme's tensors (docs/format.md, "Linear schemes"): what a linear [n, k] of the
// scheme stores, validated here once for every backend before any kernel sees it.
#include "mq-schemes.h"

#include "mq-backend.h"
#include "mq-error.h"
#include "mq-file.h"

#include <algorithm>
#include <cmath>

namespace mq {

static Error linear_error(const File & f, const Linear & lin, const std::string & what) {
    return Error("model file '" + f.path() + "': linear '" + lin.name + "': " + what);
}

// f16: weight F16 [n, k]
static void load_f16(const File & f, Linear & lin, LinearInput) {
    lin.tensors = {&f.tensor(lin.name + ".weight", DTYPE_F16, {lin.n, lin.k})};
}

// the packed 4-bit weights of every 4-bit scheme: qweight U8 [n, kp/2], two codes a byte, even k low
static void load_qweight(const File & f, Linear & lin) {
    const TensorView & qw = f.tensor(lin.name + ".qweight");
    if (qw.dtype != DTYPE_U8 || qw.shape.size() != 2 || qw.shape[0] != lin.n) {
        throw linear_error(f, lin, "qweight must be U8 [" + std::to_string(lin.n) + ", Kp/2]");
    }
    lin.kp = 2 * qw.shape[1];
    lin.qweight = &qw;
}

// input slots Kp: a multiple of 64, at least K (w4a4d pads, w4a4 also splits channels)
static void check_slots(const File & f, const Linear & lin) {
    if (lin.kp % 64 != 0 || lin.kp < lin.k) {
        throw linear_error(f, lin, "input slots Kp = " + std::to_string(lin.kp) + " must be a multiple of 64 and >= K = " +
                                       std::to_string(lin.k));
    }
}

// w4a16g: qweight [n, k/2], scale F16 [n, k/group], group a multiple of 16
static void load_w4a16g(const File & f, Linear & lin, LinearInput) {
    load_qweight(f, lin);
    if (lin.kp != lin.k) {
        throw linear_error(f, lin, "w4a16g qweight has " + std::to_string(lin.kp) + " columns, expected " +
                                       std::to_string(lin.k));
    }
    const TensorView & sc = f.tensor(lin.name + ".scale");
    if (sc.dtype != DTYPE_F16 || sc.shape.size() != 2 || sc.shape[0] != lin.n || sc.shape[1] < 1 ||
        lin.k % sc.shape[1] != 0 || (lin.k / sc.shape[1]) % 16 != 0) {
        throw linear_error(f, lin, "w4a16g scale must be F16 [" + std::to_string(lin.n) +
                                       ", K/group] with a group a multiple of 16");
    }
    lin.group = lin.k / sc.shape[1];
    lin.scale = &sc;
}

// w4a4d: qweight [n, kp/2], scale F32 [n]
static void load_w4a4d(const File & f, Linear & lin, LinearInput) {
    load_qweight(f, lin);
    check_slots(f, lin);
    lin.scale = &f.tensor(lin.name + ".scale", DTYPE_F32, {lin.n});
}

// w4a4: as w4a4d, plus by input in_scale F32 [k] (norm-fed) and in_map I32 [kp, 3] (norm- or SwiGLU-fed), and
// optionally the low-rank branch lora_a F16 [rank, kp], lora_b F16 [n, rank]
static void load_w4a4(const File & f, Linear & lin, LinearInput input) {
    load_w4a4d(f, lin, input);
    const std::string & name = lin.name;
    if (input == LINEAR_INPUT_NORM) {
        lin.in_scale = &f.tensor(name + ".in_scale", DTYPE_F32, {lin.k});
    }
    if (input != LINEAR_INPUT_CODES) {
        lin.in_map = &f.tensor(name + ".in_map", DTYPE_I32, {lin.kp, 3});
        const int32_t * mp = lin.in_map->as<int32_t>();
        for (int64_t s = 0; s < lin.kp; s++) {
            const int32_t src = mp[3 * s], part = mp[3 * s + 1], parts = mp[3 * s + 2];
            if (src < -1 || src >= lin.k || parts < 1 || parts > 64 || part < 0 || part >= parts) {
                throw linear_error(f, lin,
                                   "in_map row " + std::to_string(s) + " = (" + std::to_string(src) + ", " +
                                       std::to_string(part) + ", " + std::to_string(parts) +
                                       ") is invalid: expected (channel in [-1, K), part in [0, parts), parts in [1, 64])");
            }
        }
    }
    if (f.has(name + ".lora_a") || f.has(name + ".lora_b")) {
        const TensorView & a = f.tensor(name + ".lora_a");
        if (a.dtype != DTYPE_F16 || a.shape.size() != 2 || a.shape[1] != lin.kp || a.shape[0] < 1) {
            throw linear_error(f, lin, "lora_a must be F16 [rank, " + std::to_string(lin.kp) + "]");
        }
        lin.rank = a.shape[0];
        lin.lora_a = &a;
        lin.lora_b = &f.tensor(name + ".lora_b", DTYPE_F16, {lin.n, lin.rank});
    }
}

// the dynamic int8 input of w8a8, w4a8, w4a8g: every partial sum of the int32 GEMM stays below 2^31 for
// K <= 2^17 (|a| <= 127, |w| <= 128), and the optional bias F32 [n]
static void load_int8_input(const File & f, Linear & lin) {
    if (lin.k > (int64_t(1) << 17)) {
        throw linear_error(f, lin, "K = " + std::to_string(lin.k) + " is above 131072, the int32 GEMM's limit of " +
                                       lin.scheme);
    }
    lin.scale = &f.tensor(lin.name + ".scale", DTYPE_F32, {lin.n});
    if (f.has(lin.name + ".bias")) {
        lin.bias = &f.tensor(lin.name + ".bias", DTYPE_F32, {lin.n});
    }
}

// w8a8: qweight I8 [n, k], scale F32 [n], bits I32 [1] in [2, 8]; every weight code in [-qmax, qmax]
static void load_w8a8(const File & f, Linear & lin, LinearInput) {
    const TensorView & bits = f.tensor(lin.name + ".bits", DTYPE_I32, {1});
    const int32_t b = bits.as<int32_t>()[0];
    if (b < 2 || b > 8) {
        throw linear_error(f, lin, "tensor '" + lin.name + ".bits' is " + std::to_string(b) + ", expected a bit width in [2, 8]");
    }
    lin.qmax = (1 << (b - 1)) - 1;
    lin.qweight = &f.tensor(lin.name + ".qweight", DTYPE_I8, {lin.n, lin.k});
    lin.kp = lin.k;
    const int8_t * q = lin.qweight->as<int8_t>();
    const int64_t count = lin.n * lin.k;
    int32_t lo = 0, hi = 0;
    for (int64_t i = 0; i < count; i++) {
        lo = std::min<int32_t>(lo, q[i]);
        hi = std::max<int32_t>(hi, q[i]);
    }
    if (lo < -lin.qmax || hi > lin.qmax) {
        throw linear_error(f, lin, "tensor '" + lin.name + ".qweight' has codes in [" + std::to_string(lo) + ", " +
                                       std::to_string(hi) + "], outside [-" + std::to_string(lin.qmax) + ", " +
                                       std::to_string(lin.qmax) + "] of " + std::to_string(b) + " bits");
    }
    load_int8_input(f, lin);
}

// a finite F32 [k] input-side tensor of w8a8s (its static step inverse or its shift); `positive`: every value > 0
static const TensorView * finite_channels(const File & f, const Linear & lin, const char * suffix, bool positive) {
    const TensorView & t = f.tensor(lin.name + "." + suffix, DTYPE_F32, {lin.k});
    const float * v = t.as<float>();
    for (int64_t i = 0; i < lin.k; i++) {
        if (!std::isfinite(v[i]) || (positive && !(v[i] > 0.0f))) {
            throw linear_error(f, lin, "tensor '" + lin.name + "." + suffix + "' has " + std::to_string(v[i]) + " at " +
                                           std::to_string(i) + (positive ? ", expected finite and > 0" : ", expected finite"));
        }
    }
    return &t;
}

// w8a8s: as w8a8 (qweight, scale, bits), plus the static input's in_scale F32 [k] (finite, > 0) and shift F32 [k]
// (finite), and bias F32 [n] (required: it carries the shift's compensation)
static void load_w8a8s(const File & f, Linear & lin, LinearInput input) {
    load_w8a8(f, lin, input);
    lin.in_scale = finite_channels(f, lin, "in_scale", true);
    lin.shift = finite_channels(f, lin, "shift", false);
    lin.bias = &f.tensor(lin.name + ".bias", DTYPE_F32, {lin.n});
}

// w4a8: qweight U8 [n, kp/2] (kp a multiple of 64, >= k), scale F32 [n]
static void load_w4a8(const File & f, Linear & lin, LinearInput) {
    load_qweight(f, lin);
    check_slots(f, lin);
    if (lin.kp >= lin.k + 64) {
        throw linear_error(f, lin, "w4a8 qweight has " + std::to_string(lin.kp) + " columns, expected K = " +
                                       std::to_string(lin.k) + " rounded up to a multiple of 64");
    }
    lin.qmax = 127;
    load_int8_input(f, lin);
}

// w4a8g: qweight U8 [n, k/2], gscale U8 [n, k/group] (group a multiple of 64) with values in [1, 16], scale F32 [n]
static void load_w4a8g(const File & f, Linear & lin, LinearInput) {
    load_qweight(f, lin);
    if (lin.kp != lin.k) {
        throw linear_error(f, lin, "w4a8g qweight has " + std::to_string(lin.kp) + " columns, expected K = " +
                                       std::to_string(lin.k));
    }
    const TensorView & gs = f.tensor(lin.name + ".gscale");
    if (gs.dtype != DTYPE_U8 || gs.shape.size() != 2 || gs.shape[0] != lin.n || gs.shape[1] < 1 ||
        lin.k % gs.shape[1] != 0 || (lin.k / gs.shape[1]) % 64 != 0) {
        throw linear_error(f, lin, "tensor '" + lin.name + ".gscale' must be U8 [" + std::to_string(lin.n) +
                                       ", K/group] with a group a multiple of 64 (K = " + std::to_string(lin.k) + ")");
    }
    const uint8_t * g = gs.as<uint8_t>();
    for (int64_t i = 0; i < gs.numel(); i++) {
        if (g[i] < 1 || g[i] > 16) {
            throw linear_error(f, lin, "tensor '" + lin.name + ".gscale' has a group scale " + std::to_string(g[i]) +
                                           " at " + std::to_string(i) + ", outside [1, 16]");
        }
    }
    lin.group = lin.k / gs.shape[1];
    lin.gscale = &gs;
    lin.qmax = 127;
    load_int8_input(f, lin);
}

const std::vector<Scheme> & schemes() {
    static const std::vector<Scheme> table = {
        {"f16", false, 0, 0, load_f16, "fp16 weights, fp32 activations"},
        {"w4a16g", false, 0, 16, load_w4a16g, "int4 weights with fp16 scales per group along K, fp32 activations"},
        {"w4a4d", false, 64, 0, load_w4a4d, "int4 weights and per-token dynamic int4 activations"},
        {"w4a4", true, 64, 0, load_w4a4, "int4 weights and static int4 activation codes (MergeQuant)"},
        {"w8a8", false, 0, 0, load_w8a8, "int8 (or narrower, P.bits) weights per channel, per-token dynamic int8 activations"},
        {"w4a8", false, 64, 0, load_w4a8, "int4 weights per channel, per-token dynamic int8 activations"},
        {"w4a8g", false, 0, 64, load_w4a8g, "int4 weights with integer group scales and a channel scale, per-token dynamic int8 activations"},
        {"w8a8s", false, 0, 0, load_w8a8s, "int8 (or narrower, P.bits) weights per channel of the step-folded weight, static per-channel int8 activations with a shift (OutlierTune)"},
    };
    return table;
}

const Scheme * scheme_find(const std::string & name) {
    for (const Scheme & s : schemes()) {
        if (name == s.name) {
            return &s;
        }
    }
    return nullptr;
}

std::string scheme_names() {
    std::string out;
    for (const Scheme & s : schemes()) {
        out += (out.empty() ? "" : ", ") + std::string(s.name);
    }
    return out;
}

}  // namespace mq
