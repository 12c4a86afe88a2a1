// Validated read-only mapping of a .mq (safetensors) file. Everything is checked before a tensor is
// handed out, so later code can trust shapes, dtypes and bounds.
#include "mq-file.h"

#include "mq-error.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace mq {

static const struct {
    const char * name;
    DType dtype;
    size_t size;
} DTYPES[] = {
    {"F32", DTYPE_F32, 4}, {"F16", DTYPE_F16, 2}, {"BF16", DTYPE_BF16, 2}, {"I32", DTYPE_I32, 4},
    {"I64", DTYPE_I64, 8}, {"I8", DTYPE_I8, 1},   {"U8", DTYPE_U8, 1},     {"I16", DTYPE_I16, 2},
};

const char * dtype_name(DType t) {
    for (const auto & d : DTYPES) {
        if (d.dtype == t) {
            return d.name;
        }
    }
    return "?";
}

size_t dtype_size(DType t) {
    for (const auto & d : DTYPES) {
        if (d.dtype == t) {
            return d.size;
        }
    }
    return 0;
}

int64_t TensorView::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) {
        n *= d;
    }
    return n;
}

static std::string shape_str(const std::vector<int64_t> & shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) {
        s += (i ? ", " : "") + std::to_string(shape[i]);
    }
    return s + "]";
}

// the dimensions of a header shape as far as they are integers (for messages)
static std::vector<int64_t> dims_of(const std::vector<Json> & dims) {
    std::vector<int64_t> out;
    for (const Json & d : dims) {
        out.push_back(d.as_int("shape"));
    }
    return out;
}

// dimensions per tensor (the engine's tensors have at most 2; safetensors itself sets no limit)
static constexpr size_t MAX_DIMS = 8;
static constexpr int64_t MAX_DIM = int64_t(1) << 40;

// header larger than this is refused before it is read (safetensors itself uses 100 MB)
static constexpr uint64_t MAX_HEADER_BYTES = 100u * 1000u * 1000u;

File::File(const std::string & path) : path_(path) {
    int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) {
        throw Error("cannot open model file '" + path + "': " + strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        throw Error("model file '" + path + "' is not a regular file");
    }
    size_ = (size_t) st.st_size;
    if (size_ < 8) {
        close(fd);
        throw Error("model file '" + path + "' is truncated: " + std::to_string(size_) +
                    " bytes, shorter than the 8-byte header length");
    }
    map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map_ == MAP_FAILED) {
        map_ = nullptr;
        throw Error("cannot map model file '" + path + "': " + strerror(errno));
    }
    try {
        const uint8_t * base = (const uint8_t *) map_;
        uint64_t header_len = 0;
        memcpy(&header_len, base, 8);  // little-endian hosts only (x86-64, aarch64)
        if (header_len > MAX_HEADER_BYTES) {
            throw Error("header length " + std::to_string(header_len) + " exceeds the limit of " +
                        std::to_string(MAX_HEADER_BYTES) + " bytes (corrupt or not a .mq file)");
        }
        if (8 + header_len > size_) {
            throw Error("file is truncated: header needs " + std::to_string(8 + header_len) + " bytes, file has " +
                        std::to_string(size_));
        }
        std::string header((const char *) base + 8, (size_t) header_len);
        Json root;
        try {
            root = Json::parse(header);
        } catch (const Error & e) {
            throw Error(std::string("corrupted header: ") + e.what());
        }
        if (!root.is_object()) {
            throw Error("corrupted header: not a JSON object");
        }
        // the data area starts 8-aligned (the writer pads the header with spaces), so every tensor whose
        // offset is a multiple of its element size is aligned in memory (mmap is page-aligned)
        if (header_len % 8 != 0) {
            throw Error("header length " + std::to_string(header_len) +
                        " is not a multiple of 8 (the data area must start 8-byte aligned)");
        }
        const uint8_t * data = base + 8 + header_len;
        const size_t data_size = size_ - 8 - (size_t) header_len;

        struct Span {
            size_t begin, end;
            std::string name;
        };
        std::vector<Span> spans;
        for (const auto & kv : root.as_object("header")) {
            const std::string & name = kv.first;
            if (name == "__metadata__") {
                for (const auto & m : kv.second.as_object("__metadata__")) {
                    metadata_[m.first] = m.second.as_string(("__metadata__." + m.first).c_str());
                }
                continue;
            }
            const Json & e = kv.second;
            if (!e.is_object()) {
                throw Error("tensor '" + name + "': header entry is not an object");
            }
            TensorView t;
            t.name = name;
            const std::string & dt = e.at("dtype").as_string(("tensor '" + name + "' dtype").c_str());
            bool found = false;
            for (const auto & d : DTYPES) {
                if (dt == d.name) {
                    t.dtype = d.dtype;
                    found = true;
                }
            }
            if (!found) {
                throw Error("tensor '" + name + "': unsupported dtype " + dt);
            }
            for (const auto & field : e.as_object()) {
                if (field.first != "dtype" && field.first != "shape" && field.first != "data_offsets") {
                    throw Error("tensor '" + name + "': unknown field '" + field.first +
                                "' (a tensor entry has dtype, shape and data_offsets)");
                }
            }
            // the element count and byte size in checked arithmetic: a shape whose product wraps
            // around 2^64 must not pass as a small tensor
            const auto & dims = e.at("shape").as_array(("tensor '" + name + "' shape").c_str());
            if (dims.size() > MAX_DIMS) {
                throw Error("tensor '" + name + "': " + std::to_string(dims.size()) + " dimensions (at most " +
                            std::to_string(MAX_DIMS) + ")");
            }
            uint64_t numel = 1;
            for (const Json & d : dims) {
                int64_t v = d.as_int(("tensor '" + name + "' shape").c_str());
                // a bound of its own too: an empty tensor ([0, 2^62]) passes the byte-size check, and later
                // code multiplies dimensions in int64
                if (v < 0 || v > MAX_DIM) {
                    throw Error("tensor '" + name + "': dimension " + std::to_string(v) + " is outside [0, 2^40]");
                }
                t.shape.push_back(v);
                if (__builtin_mul_overflow(numel, (uint64_t) v, &numel)) {
                    throw Error("tensor '" + name + "': the element count of shape " + shape_str(dims_of(dims)) +
                                " overflows 64 bits");
                }
            }
            uint64_t expect_bytes = 0;
            if (__builtin_mul_overflow(numel, (uint64_t) dtype_size(t.dtype), &expect_bytes)) {
                throw Error("tensor '" + name + "': the byte size of shape " + shape_str(t.shape) + " overflows 64 bits");
            }
            const auto & offs = e.at("data_offsets").as_array(("tensor '" + name + "' data_offsets").c_str());
            if (offs.size() != 2) {
                throw Error("tensor '" + name + "': data_offsets must have two entries");
            }
            int64_t b = offs[0].as_int("data_offsets"), en = offs[1].as_int("data_offsets");
            if (b < 0 || en < b || (uint64_t) en > data_size) {
                throw Error("tensor '" + name + "': data_offsets [" + std::to_string(b) + ", " + std::to_string(en) +
                            "] lie outside the data area of " + std::to_string(data_size) +
                            " bytes (file truncated?)");
            }
            t.nbytes = (size_t) (en - b);
            if ((uint64_t) t.nbytes != expect_bytes) {
                throw Error("tensor '" + name + "': " + std::to_string(t.nbytes) + " bytes of data for shape " +
                            shape_str(t.shape) + " of " + dt + " (expected " + std::to_string(expect_bytes) + ")");
            }
            // the engine reads tensors in place as arrays of their element type
            if ((uint64_t) b % dtype_size(t.dtype) != 0) {
                throw Error("tensor '" + name + "': data offset " + std::to_string(b) + " is not a multiple of " +
                            std::to_string(dtype_size(t.dtype)) + " (the size of " + dt + ")");
            }
            t.data = data + b;
            spans.push_back({(size_t) b, (size_t) en, name});
            tensors_[name] = t;
        }
        std::sort(spans.begin(), spans.end(), [](const Span & a, const Span & c) { return a.begin < c.begin; });
        size_t cursor = 0;
        for (const auto & s : spans) {
            if (s.begin < cursor) {
                throw Error("tensor '" + s.name + "' overlaps the tensor before it");
            }
            if (s.begin > cursor) {
                throw Error("hole of " + std::to_string(s.begin - cursor) + " bytes before tensor '" + s.name + "'");
            }
            cursor = s.end;
        }
        if (cursor != data_size) {
            throw Error(std::to_string(data_size - cursor) + " bytes after the last tensor are not described");
        }

        auto fmt = metadata_.find("format");
        if (fmt == metadata_.end()) {
            throw Error("not a mergequant model: metadata has no 'format' (a plain safetensors file?)");
        }
        if (fmt->second != "mergequant") {
            throw Error("wrong format '" + fmt->second + "', expected 'mergequant'");
        }
        auto ver = metadata_.find("format_version");
        if (ver == metadata_.end()) {
            throw Error("metadata has no 'format_version'");
        }
        // a positive decimal integer, nothing else: digits only, no sign, no leading zero, no NUL
        const std::string & vs = ver->second;
        const bool digits = !vs.empty() && vs.size() <= 9 && vs[0] != '0' &&
                            vs.find_first_not_of("0123456789") == std::string::npos;
        if (!digits) {
            throw Error("invalid format_version '" + vs + "': expected a positive decimal integer");
        }
        const long v = std::stol(vs);
        if (v > FORMAT_VERSION) {
            throw Error("format_version " + ver->second + " is newer than this engine supports (" +
                        std::to_string(FORMAT_VERSION) + "): upgrade mergequant");
        }
        format_version_ = (int) v;
        for (const char * key : {"config", "quant", "tokenizer"}) {
            auto it = metadata_.find(key);
            if (it == metadata_.end()) {
                continue;
            }
            try {
                meta_json_[key] = Json::parse(it->second);
            } catch (const Error & e) {
                throw Error(std::string("metadata '") + key + "': " + e.what());
            }
        }
    } catch (const Error & e) {
        munmap(map_, size_);
        map_ = nullptr;
        throw Error("invalid model file '" + path + "': " + e.what());
    }
}

File::~File() {
    if (map_) {
        munmap(map_, size_);
    }
}

const TensorView & File::tensor(const std::string & name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) {
        throw Error("model file '" + path_ + "': missing tensor '" + name + "'");
    }
    return it->second;
}

const TensorView & File::tensor(const std::string & name, DType dtype, const std::vector<int64_t> & shape) const {
    const TensorView & t = tensor(name);
    if (t.dtype != dtype || t.shape != shape) {
        throw Error("model file '" + path_ + "': tensor '" + name + "' is " + dtype_name(t.dtype) + " " +
                    shape_str(t.shape) + ", expected " + dtype_name(dtype) + " " + shape_str(shape));
    }
    return t;
}

const Json & File::meta_json(const std::string & key) const {
    auto it = meta_json_.find(key);
    if (it == meta_json_.end()) {
        throw Error("model file '" + path_ + "': metadata has no '" + key + "'");
    }
    return it->second;
}

}  // namespace mq
