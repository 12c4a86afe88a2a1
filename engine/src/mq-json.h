// Minimal JSON value and parser for the model file's header and metadata strings.
// Strict RFC 8259 parsing (no comments, no trailing commas, no duplicate keys, strings valid UTF-8);
// errors carry the byte offset. The parsed tree is bounded: at most MAX_VALUES values and 64 levels per
// document, so a hostile header costs at most MAX_VALUES * sizeof(Json) plus its own bytes.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace mq {

class Json {
public:
    enum Type { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

    // values per parsed document: a real model's header has a few per tensor (a 4096-layer model ~400k)
    static constexpr size_t MAX_VALUES = 1u << 20;

    Json() = default;
    static Json parse(const std::string & text);  // throws mq::Error on malformed input

    Type type() const { return type_; }
    bool is_null() const { return type_ == JSON_NULL; }
    bool is_object() const { return type_ == JSON_OBJECT; }
    bool is_array() const { return type_ == JSON_ARRAY; }
    bool is_string() const { return type_ == JSON_STRING; }
    bool is_number() const { return type_ == JSON_NUMBER; }
    bool is_bool() const { return type_ == JSON_BOOL; }

    // typed accessors throw mq::Error naming `what` when the type is wrong
    bool as_bool(const char * what = "value") const;
    double as_number(const char * what = "value") const;
    int64_t as_int(const char * what = "value") const;  // must be integral
    const std::string & as_string(const char * what = "value") const;
    const std::vector<Json> & as_array(const char * what = "value") const;
    const std::map<std::string, Json> & as_object(const char * what = "value") const;

    bool contains(const std::string & key) const;
    // object member; throws naming the key when absent
    const Json & at(const std::string & key) const;
    // object member or a null value when absent
    const Json & get(const std::string & key) const;

    // convenience with defaults for optional members (null counts as absent)
    int64_t get_int(const std::string & key, int64_t def) const;
    double get_number(const std::string & key, double def) const;
    bool get_bool(const std::string & key, bool def) const;
    std::string get_string(const std::string & key, const std::string & def) const;

private:
    friend class JsonParser;
    Type type_ = JSON_NULL;
    bool b_ = false;
    double num_ = 0.0;
    bool num_is_int_ = false;
    int64_t int_ = 0;
    std::string str_;
    // containers are immutable once parsed and shared between copies (a value stays small: no empty
    // vector and map inline in every scalar)
    std::shared_ptr<std::vector<Json>> arr_;
    std::shared_ptr<std::map<std::string, Json>> obj_;
};

}  // namespace mq
