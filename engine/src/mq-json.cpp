// Strict JSON parser: enough for safetensors headers and the model file's metadata strings.
#include "mq-json.h"

#include "mq-error.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace mq {

static const Json & json_null() {
    static const Json null_value;
    return null_value;
}

class JsonParser {
public:
    explicit JsonParser(const std::string & s) : s_(s) {}

    Json parse_document() {
        Json v = parse_value(0);
        skip_ws();
        if (pos_ != s_.size()) {
            fail("trailing characters after the JSON value");
        }
        return v;
    }

private:
    const std::string & s_;
    size_t pos_ = 0;
    size_t n_values_ = 0;

    [[noreturn]] void fail(const std::string & what) const {
        throw Error("malformed JSON at byte " + std::to_string(pos_) + ": " + what);
    }

    void skip_ws() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) {
            pos_++;
        }
    }

    bool consume(const char * lit) {
        size_t n = strlen(lit);
        if (s_.compare(pos_, n, lit) == 0) {
            pos_ += n;
            return true;
        }
        return false;
    }

    Json parse_value(int depth) {
        if (depth > 64) {
            fail("nesting deeper than 64 levels");
        }
        if (++n_values_ > Json::MAX_VALUES) {
            fail("more than " + std::to_string(Json::MAX_VALUES) + " values");
        }
        skip_ws();
        if (pos_ >= s_.size()) {
            fail("unexpected end of input");
        }
        Json v;
        char c = s_[pos_];
        if (c == '{') {
            v.type_ = Json::JSON_OBJECT;
            v.obj_ = std::make_shared<std::map<std::string, Json>>();
            pos_++;
            skip_ws();
            if (pos_ < s_.size() && s_[pos_] == '}') {
                pos_++;
                return v;
            }
            for (;;) {
                skip_ws();
                if (pos_ >= s_.size() || s_[pos_] != '"') {
                    fail("expected a string key");
                }
                std::string key = parse_string();
                skip_ws();
                if (pos_ >= s_.size() || s_[pos_] != ':') {
                    fail("expected ':' after key \"" + key + "\"");
                }
                pos_++;
                if (v.obj_->count(key)) {
                    fail("duplicate key \"" + key + "\"");
                }
                (*v.obj_)[key] = parse_value(depth + 1);
                skip_ws();
                if (pos_ < s_.size() && s_[pos_] == ',') {
                    pos_++;
                    continue;
                }
                if (pos_ < s_.size() && s_[pos_] == '}') {
                    pos_++;
                    return v;
                }
                fail("expected ',' or '}' in object");
            }
        }
        if (c == '[') {
            v.type_ = Json::JSON_ARRAY;
            v.arr_ = std::make_shared<std::vector<Json>>();
            pos_++;
            skip_ws();
            if (pos_ < s_.size() && s_[pos_] == ']') {
                pos_++;
                return v;
            }
            for (;;) {
                v.arr_->push_back(parse_value(depth + 1));
                skip_ws();
                if (pos_ < s_.size() && s_[pos_] == ',') {
                    pos_++;
                    continue;
                }
                if (pos_ < s_.size() && s_[pos_] == ']') {
                    pos_++;
                    return v;
                }
                fail("expected ',' or ']' in array");
            }
        }
        if (c == '"') {
            v.type_ = Json::JSON_STRING;
            v.str_ = parse_string();
            return v;
        }
        if (consume("true")) {
            v.type_ = Json::JSON_BOOL;
            v.b_ = true;
            return v;
        }
        if (consume("false")) {
            v.type_ = Json::JSON_BOOL;
            return v;
        }
        if (consume("null")) {
            return v;
        }
        if (c == '-' || (c >= '0' && c <= '9')) {
            return parse_number();
        }
        fail(std::string("unexpected character '") + c + "'");
    }

    Json parse_number() {
        size_t start = pos_;
        bool is_int = true;
        if (s_[pos_] == '-') {
            pos_++;
        }
        if (pos_ >= s_.size() || !isdigit((unsigned char) s_[pos_])) {
            fail("invalid number");
        }
        if (s_[pos_] == '0') {
            pos_++;
        } else {
            while (pos_ < s_.size() && isdigit((unsigned char) s_[pos_])) {
                pos_++;
            }
        }
        if (pos_ < s_.size() && s_[pos_] == '.') {
            is_int = false;
            pos_++;
            if (pos_ >= s_.size() || !isdigit((unsigned char) s_[pos_])) {
                fail("invalid number: digits expected after '.'");
            }
            while (pos_ < s_.size() && isdigit((unsigned char) s_[pos_])) {
                pos_++;
            }
        }
        if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
            is_int = false;
            pos_++;
            if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) {
                pos_++;
            }
            if (pos_ >= s_.size() || !isdigit((unsigned char) s_[pos_])) {
                fail("invalid number: digits expected in exponent");
            }
            while (pos_ < s_.size() && isdigit((unsigned char) s_[pos_])) {
                pos_++;
            }
        }
        std::string text = s_.substr(start, pos_ - start);
        Json v;
        v.type_ = Json::JSON_NUMBER;
        v.num_ = strtod(text.c_str(), nullptr);
        if (is_int && text.size() < 19) {
            v.num_is_int_ = true;
            v.int_ = strtoll(text.c_str(), nullptr, 10);
        } else if (is_int) {
            fail("integer out of range: " + text);
        }
        return v;
    }

    static void append_utf8(std::string & out, uint32_t cp) {
        if (cp < 0x80) {
            out += (char) cp;
        } else if (cp < 0x800) {
            out += (char) (0xC0 | (cp >> 6));
            out += (char) (0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += (char) (0xE0 | (cp >> 12));
            out += (char) (0x80 | ((cp >> 6) & 0x3F));
            out += (char) (0x80 | (cp & 0x3F));
        } else {
            out += (char) (0xF0 | (cp >> 18));
            out += (char) (0x80 | ((cp >> 12) & 0x3F));
            out += (char) (0x80 | ((cp >> 6) & 0x3F));
            out += (char) (0x80 | (cp & 0x3F));
        }
    }

    uint32_t parse_hex4() {
        if (pos_ + 4 > s_.size()) {
            fail("truncated \\u escape");
        }
        uint32_t v = 0;
        for (int i = 0; i < 4; i++) {
            char h = s_[pos_++];
            v <<= 4;
            if (h >= '0' && h <= '9') {
                v |= h - '0';
            } else if (h >= 'a' && h <= 'f') {
                v |= h - 'a' + 10;
            } else if (h >= 'A' && h <= 'F') {
                v |= h - 'A' + 10;
            } else {
                fail("invalid hex digit in \\u escape");
            }
        }
        return v;
    }

    // length of the well-formed UTF-8 sequence at pos_ (RFC 3629: shortest form, no surrogates,
    // <= U+10FFFF); fails otherwise, so no invalid text reaches a caller (or Python's str)
    size_t utf8_sequence_len() const {
        const unsigned char c = (unsigned char) s_[pos_];
        size_t n;
        uint32_t cp, min;
        if (c >= 0xC2 && c <= 0xDF) {
            n = 2, cp = c & 0x1F, min = 0x80;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 3, cp = c & 0x0F, min = 0x800;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 4, cp = c & 0x07, min = 0x10000;
        } else {
            fail("invalid UTF-8 in string");
        }
        if (pos_ + n > s_.size()) {
            fail("truncated UTF-8 sequence in string");
        }
        for (size_t i = 1; i < n; i++) {
            const unsigned char k = (unsigned char) s_[pos_ + i];
            if ((k & 0xC0) != 0x80) {
                fail("invalid UTF-8 in string");
            }
            cp = (cp << 6) | (k & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            fail("invalid UTF-8 in string (overlong form, surrogate or above U+10FFFF)");
        }
        return n;
    }

    std::string parse_string() {
        pos_++;  // opening quote
        std::string out;
        for (;;) {
            if (pos_ >= s_.size()) {
                fail("unterminated string");
            }
            char c = s_[pos_++];
            if (c == '"') {
                return out;
            }
            if ((unsigned char) c < 0x20) {
                fail("control character in string");
            }
            if ((unsigned char) c >= 0x80) {
                pos_--;
                const size_t n = utf8_sequence_len();
                out.append(s_, pos_, n);
                pos_ += n;
                continue;
            }
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos_ >= s_.size()) {
                fail("unterminated escape");
            }
            char e = s_[pos_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = parse_hex4();
                    if (cp >= 0xD800 && cp <= 0xDBFF) {
                        if (!consume("\\u")) {
                            fail("unpaired surrogate in \\u escape");
                        }
                        uint32_t lo = parse_hex4();
                        if (lo < 0xDC00 || lo > 0xDFFF) {
                            fail("invalid low surrogate in \\u escape");
                        }
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                        fail("unpaired low surrogate in \\u escape");
                    }
                    append_utf8(out, cp);
                    break;
                }
                default: fail(std::string("invalid escape \\") + e);
            }
        }
    }
};

Json Json::parse(const std::string & text) {
    return JsonParser(text).parse_document();
}

static const char * json_type_name(Json::Type t) {
    switch (t) {
        case Json::JSON_NULL: return "null";
        case Json::JSON_BOOL: return "a boolean";
        case Json::JSON_NUMBER: return "a number";
        case Json::JSON_STRING: return "a string";
        case Json::JSON_ARRAY: return "an array";
        case Json::JSON_OBJECT: return "an object";
    }
    return "?";
}

static void json_expect(const Json & j, Json::Type t, const char * what) {
    if (j.type() != t) {
        throw Error(std::string(what) + ": expected " + json_type_name(t) + ", got " + json_type_name(j.type()));
    }
}

bool Json::as_bool(const char * what) const {
    json_expect(*this, JSON_BOOL, what);
    return b_;
}

double Json::as_number(const char * what) const {
    json_expect(*this, JSON_NUMBER, what);
    return num_;
}

int64_t Json::as_int(const char * what) const {
    json_expect(*this, JSON_NUMBER, what);
    if (num_is_int_) {
        return int_;
    }
    if (std::floor(num_) != num_ || std::fabs(num_) > 9.0e15) {
        throw Error(std::string(what) + ": expected an integer, got " + std::to_string(num_));
    }
    return (int64_t) num_;
}

const std::string & Json::as_string(const char * what) const {
    json_expect(*this, JSON_STRING, what);
    return str_;
}

const std::vector<Json> & Json::as_array(const char * what) const {
    json_expect(*this, JSON_ARRAY, what);
    return *arr_;
}

const std::map<std::string, Json> & Json::as_object(const char * what) const {
    json_expect(*this, JSON_OBJECT, what);
    return *obj_;
}

bool Json::contains(const std::string & key) const {
    return type_ == JSON_OBJECT && obj_->count(key) != 0;
}

const Json & Json::at(const std::string & key) const {
    json_expect(*this, JSON_OBJECT, key.c_str());
    auto it = obj_->find(key);
    if (it == obj_->end()) {
        throw Error("missing key \"" + key + "\"");
    }
    return it->second;
}

const Json & Json::get(const std::string & key) const {
    if (type_ != JSON_OBJECT) {
        return json_null();
    }
    auto it = obj_->find(key);
    return it == obj_->end() ? json_null() : it->second;
}

int64_t Json::get_int(const std::string & key, int64_t def) const {
    const Json & v = get(key);
    return v.is_null() ? def : v.as_int(key.c_str());
}

double Json::get_number(const std::string & key, double def) const {
    const Json & v = get(key);
    return v.is_null() ? def : v.as_number(key.c_str());
}

bool Json::get_bool(const std::string & key, bool def) const {
    const Json & v = get(key);
    return v.is_null() ? def : v.as_bool(key.c_str());
}

std::string Json::get_string(const std::string & key, const std::string & def) const {
    const Json & v = get(key);
    return v.is_null() ? def : v.as_string(key.c_str());
}

}  // namespace mq
