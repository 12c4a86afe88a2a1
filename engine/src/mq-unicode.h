// Unicode support for the tokenizers: UTF-8 decoding, the codepoint classes the pre-tokenizer regexes use
// (\p{L}, \p{N}, \s; generated from the Unicode database by engine/tools/gen-unicode-data.py), GPT-2's
// byte-to-unicode alphabet, and the pre-tokenizer splits of each supported model family written as plain
// matchers (no regex engine).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mq {

enum : uint8_t {
    UNICODE_LETTER     = 1,  // \p{L}
    UNICODE_NUMBER     = 2,  // \p{N}
    UNICODE_WHITESPACE = 4,  // \s (White_Space)
};

uint8_t unicode_cpt_flags(uint32_t cpt);

// one decoded codepoint and where it sits in the source string; an invalid byte decodes to U+FFFD of
// length 1 so that every byte of the input belongs to exactly one codepoint
struct UnicodeCpt {
    uint32_t cpt;
    uint32_t offset;
    uint32_t len;
};

std::vector<UnicodeCpt> unicode_cpts_from_utf8(const std::string & text);
std::string unicode_cpt_to_utf8(uint32_t cpt);

// length of the complete, valid UTF-8 prefix of s[0, n) when its tail may still be completed by more bytes:
// returns n minus the length of an incomplete trailing sequence (0..3 bytes)
size_t unicode_utf8_complete_len(const char * s, size_t n);
// s with every invalid or truncated UTF-8 sequence replaced by U+FFFD
std::string unicode_utf8_sanitize(const std::string & s);

// GPT-2's reversible map from the 256 byte values to printable codepoints (as UTF-8)
const std::string & unicode_byte_to_utf8(uint8_t byte);
// inverse: the byte a byte-level alphabet codepoint stands for, or -1
int32_t unicode_utf8_to_byte(uint32_t cpt);

enum UnicodePre {
    UNICODE_PRE_GPT2,    // GPT-2's regex
    UNICODE_PRE_SMOLLM,  // every \p{N} isolated, then GPT-2's regex
    UNICODE_PRE_LLAMA3,  // Llama-3's regex (numbers in runs of up to 3)
    UNICODE_PRE_QWEN2,   // Llama-3's regex with single-digit numbers
};

// split text into the words byte-level BPE encodes separately; returns [begin, end) byte offsets
std::vector<std::pair<uint32_t, uint32_t>> unicode_pre_tokenize(const std::string & text, UnicodePre pre);

}  // namespace mq
