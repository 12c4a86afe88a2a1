// The .mq model file: a safetensors container mapped read-only, validated before any use.
// See docs/format.md. This layer knows tensors and metadata, not models.
#pragma once

#include "mq-json.h"

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mq {

enum DType : int32_t { DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I32, DTYPE_I64, DTYPE_I8, DTYPE_U8, DTYPE_I16 };

const char * dtype_name(DType t);
size_t dtype_size(DType t);

struct TensorView {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    const uint8_t * data = nullptr;  // points into the mapping
    size_t nbytes = 0;

    int64_t numel() const;
    template <typename T> const T * as() const { return reinterpret_cast<const T *>(data); }
};

class File {
public:
    // maps and validates the container: header bounds, JSON, dtypes, shapes vs offsets, overlaps, holes,
    // `format` == "mergequant" and a known `format_version`. Throws mq::Error naming the file and problem.
    explicit File(const std::string & path);
    ~File();
    File(const File &) = delete;
    File & operator=(const File &) = delete;

    const std::string & path() const { return path_; }
    bool has(const std::string & name) const { return tensors_.count(name) != 0; }
    // throws naming the tensor when absent
    const TensorView & tensor(const std::string & name) const;
    // throws unless present with this dtype and shape
    const TensorView & tensor(const std::string & name, DType dtype, const std::vector<int64_t> & shape) const;
    const std::map<std::string, TensorView> & tensors() const { return tensors_; }

    // metadata strings; the JSON ones parsed
    const std::map<std::string, std::string> & metadata() const { return metadata_; }
    const Json & meta_json(const std::string & key) const;  // "config", "quant", "tokenizer"; throws if absent
    int format_version() const { return format_version_; }

    static constexpr int FORMAT_VERSION = 1;

private:
    std::string path_;
    void * map_ = nullptr;
    size_t size_ = 0;
    int format_version_ = 0;
    std::map<std::string, TensorView> tensors_;
    std::map<std::string, std::string> metadata_;
    std::map<std::string, Json> meta_json_;
};

}  // namespace mq
