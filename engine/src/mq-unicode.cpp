// Unicode classes, UTF-8 helpers and the byte-level pre-tokenizers (see mq-unicode.h).
#include "mq-unicode.h"

#include <algorithm>
#include <array>

namespace mq {

namespace {

struct CptRange {
    uint32_t first;
    uint32_t last;
    uint8_t flags;
};

const CptRange k_cpt_ranges[] = {
#include "mq-unicode-data.inc"
};

}  // namespace

uint8_t unicode_cpt_flags(uint32_t cpt) {
    // binary search for the last range starting at or before cpt
    const CptRange * begin = std::begin(k_cpt_ranges);
    const CptRange * end = std::end(k_cpt_ranges);
    const CptRange * it = std::upper_bound(begin, end, cpt, [](uint32_t c, const CptRange & r) { return c < r.first; });
    if (it == begin) {
        return 0;
    }
    --it;
    return cpt <= it->last ? it->flags : 0;
}

// length of the valid UTF-8 sequence starting at s[i] (1..4), or 0 when it is invalid or runs past n
static size_t utf8_seq_len(const unsigned char * s, size_t i, size_t n, uint32_t * out) {
    const unsigned char c = s[i];
    if (c < 0x80) {
        *out = c;
        return 1;
    }
    size_t len;
    uint32_t cpt;
    uint32_t min;
    if ((c & 0xE0) == 0xC0) {
        len = 2; cpt = c & 0x1F; min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        len = 3; cpt = c & 0x0F; min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
        len = 4; cpt = c & 0x07; min = 0x10000;
    } else {
        return 0;
    }
    if (i + len > n) {
        return 0;
    }
    for (size_t k = 1; k < len; ++k) {
        if ((s[i + k] & 0xC0) != 0x80) {
            return 0;
        }
        cpt = (cpt << 6) | (s[i + k] & 0x3F);
    }
    // overlong forms, UTF-16 surrogates and values past U+10FFFF are not UTF-8
    if (cpt < min || (cpt >= 0xD800 && cpt <= 0xDFFF) || cpt > 0x10FFFF) {
        return 0;
    }
    *out = cpt;
    return len;
}

std::vector<UnicodeCpt> unicode_cpts_from_utf8(const std::string & text) {
    std::vector<UnicodeCpt> out;
    out.reserve(text.size());
    const auto * s = reinterpret_cast<const unsigned char *>(text.data());
    const size_t n = text.size();
    for (size_t i = 0; i < n;) {
        uint32_t cpt = 0;
        size_t len = utf8_seq_len(s, i, n, &cpt);
        if (len == 0) {
            cpt = 0xFFFD;
            len = 1;
        }
        out.push_back({cpt, uint32_t(i), uint32_t(len)});
        i += len;
    }
    return out;
}

std::string unicode_cpt_to_utf8(uint32_t cpt) {
    std::string out;
    if (cpt < 0x80) {
        out += char(cpt);
    } else if (cpt < 0x800) {
        out += char(0xC0 | (cpt >> 6));
        out += char(0x80 | (cpt & 0x3F));
    } else if (cpt < 0x10000) {
        out += char(0xE0 | (cpt >> 12));
        out += char(0x80 | ((cpt >> 6) & 0x3F));
        out += char(0x80 | (cpt & 0x3F));
    } else {
        out += char(0xF0 | (cpt >> 18));
        out += char(0x80 | ((cpt >> 12) & 0x3F));
        out += char(0x80 | ((cpt >> 6) & 0x3F));
        out += char(0x80 | (cpt & 0x3F));
    }
    return out;
}

size_t unicode_utf8_complete_len(const char * str, size_t n) {
    const auto * s = reinterpret_cast<const unsigned char *>(str);
    // an incomplete sequence is a lead byte followed by fewer continuation bytes than it announces
    for (size_t back = 1; back <= 3 && back <= n; ++back) {
        const unsigned char c = s[n - back];
        if ((c & 0xC0) == 0x80) {
            continue;  // continuation byte: keep looking for the lead
        }
        size_t need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
        return need > back ? n - back : n;
    }
    return n;
}

std::string unicode_utf8_sanitize(const std::string & text) {
    std::string out;
    out.reserve(text.size());
    const auto * s = reinterpret_cast<const unsigned char *>(text.data());
    for (size_t i = 0; i < text.size();) {
        uint32_t cpt = 0;
        size_t len = utf8_seq_len(s, i, text.size(), &cpt);
        if (len == 0) {
            out += "\xEF\xBF\xBD";
            i += 1;
        } else {
            out.append(text, i, len);
            i += len;
        }
    }
    return out;
}

namespace {

// GPT-2 bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 to U+0100 upwards
struct ByteMap {
    std::array<std::string, 256> to_utf8;
    std::array<int32_t, 324> from_cpt;  // every alphabet codepoint is below U+0144

    ByteMap() {
        from_cpt.fill(-1);
        uint32_t next = 256;
        for (uint32_t b = 0; b < 256; ++b) {
            const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            const uint32_t cpt = printable ? b : next++;
            to_utf8[b] = unicode_cpt_to_utf8(cpt);
            from_cpt[cpt] = int32_t(b);
        }
    }
};

const ByteMap & byte_map() {
    static const ByteMap map;
    return map;
}

}  // namespace

const std::string & unicode_byte_to_utf8(uint8_t byte) {
    return byte_map().to_utf8[byte];
}

int32_t unicode_utf8_to_byte(uint32_t cpt) {
    return cpt < byte_map().from_cpt.size() ? byte_map().from_cpt[cpt] : -1;
}

namespace {

// the regex matchers below walk the codepoints of one segment [b, e); out-of-range positions read as
// "no codepoint" so that a lookahead past the end fails the way the regex's would
class Splitter {
public:
    Splitter(const std::vector<UnicodeCpt> & cpts, std::vector<std::pair<uint32_t, uint32_t>> & out)
        : cpts_(cpts), out_(out) {}

    uint32_t cpt(size_t i) const { return i < e_ ? cpts_[i].cpt : 0xFFFFFFFF; }
    uint8_t flags(size_t i) const { return i < e_ ? unicode_cpt_flags(cpts_[i].cpt) : 0; }
    bool is_letter(size_t i) const { return flags(i) & UNICODE_LETTER; }
    bool is_number(size_t i) const { return flags(i) & UNICODE_NUMBER; }
    bool is_space(size_t i) const { return flags(i) & UNICODE_WHITESPACE; }
    // [^\s\p{L}\p{N}]
    bool is_other(size_t i) const { return i < e_ && flags(i) == 0; }
    bool is_crlf(size_t i) const { return cpt(i) == '\r' || cpt(i) == '\n'; }

    void emit(size_t from, size_t to) {
        out_.emplace_back(cpts_[from].offset, cpts_[to - 1].offset + cpts_[to - 1].len);
    }

    // 's|'t|'re|'ve|'m|'ll|'d at i (case-insensitively for Llama-3/Qwen2): matched length or 0
    size_t contraction(size_t i, bool ignore_case) const {
        if (cpt(i) != '\'') {
            return 0;
        }
        auto lower = [&](size_t k) -> uint32_t {
            uint32_t c = cpt(k);
            if (!ignore_case) {
                return c;
            }
            if (c >= 'A' && c <= 'Z') {
                return c + 32;
            }
            return c == 0x17F ? 's' : c;  // U+017F LONG S folds to s under Unicode case folding
        };
        const uint32_t c1 = lower(i + 1);
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
            return 2;
        }
        const uint32_t c2 = lower(i + 2);
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
            return 3;
        }
        return 0;
    }

    // \s+(?!\S)|\s+ at a whitespace codepoint: a run followed by non-space gives its last space to the next word
    size_t space_run(size_t i) const {
        size_t j = i;
        while (j < e_ && is_space(j)) {
            ++j;
        }
        return (j < e_ && j - i > 1) ? j - 1 : j;
    }

    // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    void gpt2(size_t b, size_t e) {
        e_ = e;
        for (size_t i = b; i < e;) {
            size_t j = i + contraction(i, false);
            if (j == i) {
                const size_t p = (cpt(i) == ' ' && !is_space(i + 1)) ? i + 1 : i;
                if (p < e && is_letter(p)) {
                    for (j = p; j < e && is_letter(j); ++j) {}
                } else if (p < e && is_number(p)) {
                    for (j = p; j < e && is_number(j); ++j) {}
                } else if (is_other(p)) {
                    for (j = p; j < e && is_other(j); ++j) {}
                } else {
                    j = space_run(i);
                }
            }
            emit(i, j);
            i = j;
        }
    }

    // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}| ?[^\s\p{L}\p{N}]+[\r\n]*
    // |\s*[\r\n]+|\s+(?!\S)|\s+
    void llama3(size_t b, size_t e, size_t max_digits) {
        e_ = e;
        for (size_t i = b; i < e;) {
            size_t j = i + contraction(i, true);
            if (j == i) {
                if (is_letter(i) || (!is_crlf(i) && !is_number(i) && is_letter(i + 1))) {
                    for (j = i + 1; j < e && is_letter(j); ++j) {}
                } else if (is_number(i)) {
                    for (j = i + 1; j < e && j - i < max_digits && is_number(j); ++j) {}
                } else if (is_other(i) || (cpt(i) == ' ' && is_other(i + 1))) {
                    for (j = i + 1; j < e && is_other(j); ++j) {}
                    while (j < e && is_crlf(j)) {
                        ++j;
                    }
                } else {
                    // \s*[\r\n]+ : the run up to its last \r or \n, if it has one
                    size_t last_nl = e;
                    for (size_t k = i; k < e && is_space(k); ++k) {
                        if (is_crlf(k)) {
                            last_nl = k;
                        }
                    }
                    j = last_nl != e ? last_nl + 1 : space_run(i);
                }
            }
            emit(i, j);
            i = j;
        }
    }

private:
    const std::vector<UnicodeCpt> & cpts_;
    std::vector<std::pair<uint32_t, uint32_t>> & out_;
    size_t e_ = 0;
};

}  // namespace

std::vector<std::pair<uint32_t, uint32_t>> unicode_pre_tokenize(const std::string & text, UnicodePre pre) {
    std::vector<std::pair<uint32_t, uint32_t>> out;
    const std::vector<UnicodeCpt> cpts = unicode_cpts_from_utf8(text);
    Splitter split(cpts, out);
    const size_t n = cpts.size();
    switch (pre) {
        case UNICODE_PRE_GPT2:
            split.gpt2(0, n);
            break;
        case UNICODE_PRE_SMOLLM:
            // Digits(individual_digits) runs first: each number codepoint is a segment of its own and the
            // GPT-2 regex then runs inside each remaining segment (so its lookahead stops at a digit)
            for (size_t i = 0; i < n;) {
                size_t j = i + 1;
                if (!(unicode_cpt_flags(cpts[i].cpt) & UNICODE_NUMBER)) {
                    while (j < n && !(unicode_cpt_flags(cpts[j].cpt) & UNICODE_NUMBER)) {
                        ++j;
                    }
                }
                split.gpt2(i, j);
                i = j;
            }
            break;
        case UNICODE_PRE_LLAMA3:
            split.llama3(0, n, 3);
            break;
        case UNICODE_PRE_QWEN2:
            split.llama3(0, n, 1);
            break;
    }
    return out;
}

}  // namespace mq
