// The tokenizer: SentencePiece BPE (Llama-2, Mistral) and byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen2),
// read from the model file's `tokenizer.*` tensors and `tokenizer` metadata (docs/format.md), and a
// streaming detokenizer that emits only complete UTF-8 and holds back possible stop strings.
#pragma once

#include "mq-file.h"
#include "mq-unicode.h"

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace mq {

// token types, GGUF's numbering (also the model file's)
enum TokenType : int32_t {
    TOKEN_TYPE_NORMAL       = 1,
    TOKEN_TYPE_UNKNOWN      = 2,
    TOKEN_TYPE_CONTROL      = 3,
    TOKEN_TYPE_USER_DEFINED = 4,
    TOKEN_TYPE_UNUSED       = 5,
    TOKEN_TYPE_BYTE         = 6,
};

enum VocabModel {
    VOCAB_MODEL_SPM,  // SentencePiece BPE: score-ordered merges over characters, ▁ for spaces, <0xNN> bytes
    VOCAB_MODEL_BPE,  // byte-level BPE: rank-ordered merges over GPT-2's byte alphabet after a regex split
};

class Vocab {
public:
    // reads tokenizer.* tensors + meta; throws mq::Error naming the file and what is wrong
    explicit Vocab(const File & file);

    VocabModel model() const { return model_; }
    int32_t n_tokens() const { return int32_t(tokens_.size()); }
    int32_t bos() const { return bos_; }
    int32_t eos() const { return eos_; }
    const std::vector<int32_t> & eot_ids() const { return eot_ids_; }
    bool is_eot(int32_t id) const;
    bool add_bos() const { return add_bos_; }
    bool add_eos() const { return add_eos_; }
    const std::string & token_text(int32_t id) const;  // as stored (byte-level alphabet / ▁), checked id
    TokenType token_type(int32_t id) const;

    // add_special: add BOS/EOS per the tokenizer's settings; parse_special: match control-token text as
    // whole tokens (user-defined tokens are always matched, as Hugging Face's added tokens are)
    std::vector<int32_t> encode(const std::string & text, bool add_special, bool parse_special) const;
    // raw bytes of one token; control/unknown/unused tokens render their text only when `special`
    std::string token_to_piece(int32_t id, bool special) const;
    // whole-sequence decode: SentencePiece drops the dummy-prefix space of the first piece
    std::string decode(const std::vector<int32_t> & ids, bool special) const;
    // whether decode() drops the first piece's leading space (SentencePiece with a dummy prefix)
    bool strips_leading_space() const { return model_ == VOCAB_MODEL_SPM && add_space_prefix_; }
    const std::string & chat_template() const { return chat_template_; }

private:
    void encode_bpe(const std::string & text, std::vector<int32_t> & out) const;
    void encode_bpe_word(const std::string & word, std::vector<int32_t> & out) const;
    void encode_spm(const std::string & text, std::vector<int32_t> & out) const;
    void encode_spm_segment(const std::string & text, size_t begin, size_t end, std::vector<int32_t> & out) const;
    int32_t find(const std::string & text) const;

    std::string path_;
    VocabModel model_ = VOCAB_MODEL_BPE;
    UnicodePre pre_ = UNICODE_PRE_GPT2;
    std::vector<std::string> tokens_;
    std::vector<TokenType> types_;
    std::vector<float> scores_;
    std::vector<std::string> pieces_;  // decoded bytes of each token (for token_to_piece)
    std::unordered_map<std::string, int32_t> token_to_id_;
    // BPE: (left id << 32 | right id) → (rank, merged id)
    std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
    int32_t byte_ids_[256];  // BPE: the token of each byte's alphabet character; SPM: <0xNN>; -1 if absent
    // texts matched as whole tokens before the model runs: [first byte] → ids, longest text first
    std::vector<int32_t> special_by_byte_[256];
    int32_t bos_ = -1, eos_ = -1, unk_ = -1;
    std::vector<int32_t> eot_ids_;
    bool add_bos_ = false, add_eos_ = false, add_space_prefix_ = false, ignore_merges_ = false,
         byte_fallback_ = false, remove_extra_whitespaces_ = false;
    // SPM: no piece has ▁ after another character, so merges never cross the start of a ▁ run and each
    // such segment can be merged on its own (same result, much shorter merge queues)
    bool spm_split_words_ = false;
    std::string chat_template_;
};

// Incremental detokenizer for generation. push() returns the text that is now final: complete UTF-8
// (invalid bytes become U+FFFD), minus any tail that could still grow into one of the stop strings.
// When a stop string appears, the text before it is returned, the stop string and anything after it
// are dropped, and stopped() turns true. flush() returns what is held back once generation ends.
class StreamDecoder {
public:
    StreamDecoder(const Vocab & vocab, std::vector<std::string> stops = {}, bool special = false);

    std::string push(int32_t id);
    bool stopped() const { return stopped_; }
    std::string flush();

private:
    const Vocab & vocab_;
    std::vector<std::string> stops_;
    bool special_;
    bool strip_space_;     // drop the leading space of the first non-empty piece, as decode() does
    bool stopped_ = false;
    std::string pending_;  // bytes received but not yet returned
};

}  // namespace mq
