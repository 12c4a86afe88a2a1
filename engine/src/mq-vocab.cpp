// Tokenizers: see mq-vocab.h. The algorithms follow the reference implementations they must match
// token for token: Hugging Face `tokenizers` BPE (byte-level) and SentencePiece's bpe_model.cc.
#include "mq-vocab.h"

#include "mq-error.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <queue>

namespace mq {

static const char * k_space_escape = "\xE2\x96\x81";  // ▁ U+2581, SentencePiece's visible space

static std::vector<std::string> read_blob(const File & file, const std::string & blob_name,
                                          const std::string & offsets_name) {
    const TensorView & blob = file.tensor(blob_name);
    const TensorView & offs = file.tensor(offsets_name);
    if (blob.dtype != DTYPE_U8 || blob.shape.size() != 1) {
        throw Error(file.path() + ": tensor " + blob_name + " must be a 1-D U8 byte blob");
    }
    if (offs.dtype != DTYPE_I32 || offs.shape.size() != 1 || offs.shape[0] < 1) {
        throw Error(file.path() + ": tensor " + offsets_name + " must be a 1-D I32 offset array of length n + 1");
    }
    const int32_t * off = offs.as<int32_t>();
    const int64_t n = offs.shape[0] - 1;
    if (off[0] != 0 || off[n] != blob.shape[0]) {
        throw Error(file.path() + ": " + offsets_name + " must start at 0 and end at the size of " + blob_name +
                    " (" + std::to_string(blob.shape[0]) + "), got " + std::to_string(off[0]) + ".." +
                    std::to_string(off[n]));
    }
    // the whole table first: non-decreasing from 0 to the blob size means every entry lies in the blob,
    // so no slice is taken before the table is known good
    for (int64_t i = 0; i < n; ++i) {
        if (off[i + 1] < off[i]) {
            throw Error(file.path() + ": " + offsets_name + " decreases at entry " + std::to_string(i + 1) + " (" +
                        std::to_string(off[i]) + " then " + std::to_string(off[i + 1]) + ")");
        }
    }
    std::vector<std::string> out;
    out.reserve(size_t(n));
    for (int64_t i = 0; i < n; ++i) {
        out.emplace_back(reinterpret_cast<const char *>(blob.data) + off[i], size_t(off[i + 1] - off[i]));
    }
    return out;
}

// the byte of an SPM byte token: exactly "<0xNN>" with two hex digits (either case); -1 for anything else
static int byte_token_value(const std::string & t) {
    auto hex = [](char c) {
        return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    };
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>' || hex(t[3]) < 0 || hex(t[4]) < 0) {
        return -1;
    }
    return hex(t[3]) * 16 + hex(t[4]);
}

static std::string byte_token_name(int b) {
    static const char * digits = "0123456789ABCDEF";
    return std::string("<0x") + digits[b >> 4] + digits[b & 15] + ">";
}

static int32_t id_from_meta(const File & file, const Json & meta, const char * key, int64_t n) {
    const int64_t id = meta.get_int(key, -1);
    if (id < -1 || id >= n) {
        throw Error(file.path() + ": tokenizer " + key + " = " + std::to_string(id) + " is outside the vocabulary of " +
                    std::to_string(n) + " tokens");
    }
    return int32_t(id);
}

Vocab::Vocab(const File & file) : path_(file.path()) {
    const Json & meta = file.meta_json("tokenizer");
    const std::string model = meta.at("model").as_string("tokenizer model");
    if (model == "spm") {
        model_ = VOCAB_MODEL_SPM;
    } else if (model == "bpe") {
        model_ = VOCAB_MODEL_BPE;
    } else {
        throw Error(path_ + ": tokenizer model '" + model + "' is not supported (expected 'spm' or 'bpe')");
    }
    const std::string pre = meta.get_string("pre", "default");
    if (model_ == VOCAB_MODEL_BPE) {
        if (pre == "gpt2" || pre == "default") {
            pre_ = UNICODE_PRE_GPT2;
        } else if (pre == "smollm") {
            pre_ = UNICODE_PRE_SMOLLM;
        } else if (pre == "llama3") {
            pre_ = UNICODE_PRE_LLAMA3;
        } else if (pre == "qwen2") {
            pre_ = UNICODE_PRE_QWEN2;
        } else {
            throw Error(path_ + ": tokenizer pre-tokenizer '" + pre +
                        "' is not supported (expected gpt2, smollm, llama3 or qwen2)");
        }
    }

    tokens_ = read_blob(file, "tokenizer.tokens", "tokenizer.token_offsets");
    const int64_t n = int64_t(tokens_.size());
    if (n == 0) {
        throw Error(path_ + ": the vocabulary is empty");
    }
    const int32_t * types = file.tensor("tokenizer.token_types", DTYPE_I32, {n}).as<int32_t>();
    const float * scores = file.tensor("tokenizer.scores", DTYPE_F32, {n}).as<float>();
    types_.resize(size_t(n));
    scores_.assign(scores, scores + n);
    for (int64_t i = 0; i < n; ++i) {
        if (types[i] < TOKEN_TYPE_NORMAL || types[i] > TOKEN_TYPE_BYTE) {
            throw Error(path_ + ": tokenizer.token_types[" + std::to_string(i) + "] = " + std::to_string(types[i]) +
                        " is not a token type (1..6)");
        }
        // SentencePiece orders merges by score: a NaN would break the queue's strict weak order
        if (!std::isfinite(scores[i])) {
            throw Error(path_ + ": tokenizer.scores[" + std::to_string(i) + "] is not finite");
        }
        types_[size_t(i)] = TokenType(types[i]);
        token_to_id_.emplace(tokens_[size_t(i)], int32_t(i));  // the first of duplicate texts wins
    }

    bos_ = id_from_meta(file, meta, "bos_token_id", n);
    eos_ = id_from_meta(file, meta, "eos_token_id", n);
    unk_ = id_from_meta(file, meta, "unk_token_id", n);
    for (const Json & id : meta.get("eot_token_ids").is_array() ? meta.at("eot_token_ids").as_array() : std::vector<Json>{}) {
        const int64_t v = id.as_int("tokenizer eot_token_ids entry");
        if (v < 0 || v >= n) {
            throw Error(path_ + ": tokenizer eot_token_ids entry " + std::to_string(v) + " is outside the vocabulary");
        }
        eot_ids_.push_back(int32_t(v));
    }
    if (eos_ >= 0 && std::find(eot_ids_.begin(), eot_ids_.end(), eos_) == eot_ids_.end()) {
        eot_ids_.push_back(eos_);
    }
    add_bos_ = meta.get_bool("add_bos", false);
    add_eos_ = meta.get_bool("add_eos", false);
    add_space_prefix_ = meta.get_bool("add_space_prefix", false);
    ignore_merges_ = meta.get_bool("ignore_merges", false);
    byte_fallback_ = meta.get_bool("byte_fallback", false);
    remove_extra_whitespaces_ = meta.get_bool("remove_extra_whitespaces", false);
    chat_template_ = meta.get_string("chat_template", "");
    if ((add_bos_ && bos_ < 0) || (add_eos_ && eos_ < 0)) {
        throw Error(path_ + ": tokenizer asks to add BOS/EOS but has no bos_token_id/eos_token_id");
    }

    std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
    if (model_ == VOCAB_MODEL_BPE) {
        // a byte without a token is dropped from the input, as Hugging Face's BPE does without unk_token
        for (int b = 0; b < 256; ++b) {
            byte_ids_[b] = find(unicode_byte_to_utf8(uint8_t(b)));
        }
        const std::vector<std::string> merges = read_blob(file, "tokenizer.merges", "tokenizer.merge_offsets");
        merges_.reserve(merges.size());
        for (size_t r = 0; r < merges.size(); ++r) {
            const std::string & m = merges[r];
            const size_t sp = m.find(' ', 1);  // the left part may not be empty; a part may not contain ' '
            const int32_t left = sp == std::string::npos ? -1 : find(m.substr(0, sp));
            const int32_t right = sp == std::string::npos ? -1 : find(m.substr(sp + 1));
            const int32_t merged = sp == std::string::npos ? -1 : find(m.substr(0, sp) + m.substr(sp + 1));
            if (left < 0 || right < 0 || merged < 0) {
                throw Error(path_ + ": tokenizer.merges[" + std::to_string(r) + "] = '" + m +
                            "' is not 'left right' with left, right and their concatenation in the vocabulary");
            }
            merges_.emplace((uint64_t(uint32_t(left)) << 32) | uint32_t(right), std::make_pair(int32_t(r), merged));
        }
    } else {
        for (int32_t i = 0; i < int32_t(n); ++i) {
            const std::string & t = tokens_[size_t(i)];
            if (types_[size_t(i)] == TOKEN_TYPE_BYTE) {
                const int v = byte_token_value(t);
                if (v < 0) {
                    throw Error(path_ + ": tokenizer token " + std::to_string(i) +
                                " has the byte type but its text is not <0xNN> with two hex digits");
                }
                if (byte_ids_[v] < 0) {
                    byte_ids_[v] = i;  // the first of duplicates wins, as for token texts
                }
            }
        }
        spm_split_words_ = true;
        for (size_t i = 0; i < size_t(n) && spm_split_words_; ++i) {
            const std::string & t = tokens_[i];
            const size_t first_other = t.find_first_not_of(k_space_escape);
            spm_split_words_ = types_[i] != TOKEN_TYPE_NORMAL || first_other == std::string::npos ||
                               t.find(k_space_escape, first_other) == std::string::npos;
        }
        if (byte_fallback_) {
            for (int b = 0; b < 256; ++b) {
                if (byte_ids_[b] < 0) {
                    throw Error(path_ + ": byte_fallback tokenizer lacks the " + byte_token_name(b) + " byte token");
                }
            }
        }
    }

    // token bytes as decode emits them
    pieces_.resize(size_t(n));
    for (size_t i = 0; i < size_t(n); ++i) {
        const std::string & t = tokens_[i];
        std::string & p = pieces_[i];
        if (types_[i] == TOKEN_TYPE_BYTE) {
            const int v = byte_token_value(t);
            if (v >= 0) {
                p = std::string(1, char(v));
            }
        } else if (types_[i] != TOKEN_TYPE_NORMAL) {
            p = t;  // control, user-defined, unknown and unused tokens are plain text
        } else if (model_ == VOCAB_MODEL_BPE) {
            for (const UnicodeCpt & c : unicode_cpts_from_utf8(t)) {
                const int32_t b = unicode_utf8_to_byte(c.cpt);
                p += b >= 0 ? std::string(1, char(b)) : t.substr(c.offset, c.len);
            }
        } else {
            for (size_t k = 0; k < t.size();) {
                if (t.compare(k, 3, k_space_escape) == 0) {
                    p += ' ';
                    k += 3;
                } else {
                    p += t[k++];
                }
            }
        }
    }

    // texts matched whole in the input: user-defined always, control/unknown when asked (see encode)
    for (int32_t i = 0; i < int32_t(n); ++i) {
        const TokenType ty = types_[size_t(i)];
        const std::string & t = tokens_[size_t(i)];
        if (!t.empty() && (ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED || ty == TOKEN_TYPE_UNKNOWN)) {
            special_by_byte_[uint8_t(t[0])].push_back(i);
        }
    }
    for (auto & ids : special_by_byte_) {
        std::stable_sort(ids.begin(), ids.end(),
                         [&](int32_t a, int32_t b) { return tokens_[size_t(a)].size() > tokens_[size_t(b)].size(); });
    }
}

int32_t Vocab::find(const std::string & text) const {
    auto it = token_to_id_.find(text);
    return it == token_to_id_.end() ? -1 : it->second;
}

bool Vocab::is_eot(int32_t id) const {
    return std::find(eot_ids_.begin(), eot_ids_.end(), id) != eot_ids_.end();
}

const std::string & Vocab::token_text(int32_t id) const {
    if (id < 0 || id >= n_tokens()) {
        throw ArgError("token id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(n_tokens()) +
                       " tokens");
    }
    return tokens_[size_t(id)];
}

TokenType Vocab::token_type(int32_t id) const {
    token_text(id);  // range check
    return types_[size_t(id)];
}

std::vector<int32_t> Vocab::encode(const std::string & text, bool add_special, bool parse_special) const {
    std::vector<int32_t> out;
    if (add_special && add_bos_) {
        out.push_back(bos_);
    }
    // split off whole special tokens (longest match at each position); the text between them is
    // tokenized by the model on its own, as Hugging Face does with added tokens
    size_t raw_begin = 0;
    auto flush_raw = [&](size_t end) {
        if (end > raw_begin) {
            const std::string raw = text.substr(raw_begin, end - raw_begin);
            if (model_ == VOCAB_MODEL_BPE) {
                encode_bpe(raw, out);
            } else {
                encode_spm(raw, out);
            }
        }
    };
    for (size_t i = 0; i < text.size();) {
        int32_t match = -1;
        for (int32_t id : special_by_byte_[uint8_t(text[i])]) {
            const TokenType ty = types_[size_t(id)];
            if (!parse_special && ty != TOKEN_TYPE_USER_DEFINED) {
                continue;
            }
            const std::string & t = tokens_[size_t(id)];
            if (text.compare(i, t.size(), t) == 0) {
                match = id;
                break;
            }
        }
        if (match < 0) {
            ++i;
            continue;
        }
        flush_raw(i);
        out.push_back(match);
        i += tokens_[size_t(match)].size();
        raw_begin = i;
    }
    flush_raw(text.size());
    if (add_special && add_eos_) {
        out.push_back(eos_);
    }
    return out;
}

void Vocab::encode_bpe(const std::string & text, std::vector<int32_t> & out) const {
    for (const auto & w : unicode_pre_tokenize(text, pre_)) {
        encode_bpe_word(text.substr(w.first, w.second - w.first), out);
    }
}

namespace {

struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
};

// a candidate merge of symbols[left] and its right neighbour, valid while both still hold these ids
struct MergeCandidate {
    int32_t rank;
    int32_t left;
    int32_t left_id;
    int32_t right_id;
    int32_t merged;
    // lowest rank first, then leftmost (Hugging Face's BPE word merge order)
    bool operator<(const MergeCandidate & o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
};

}  // namespace

void Vocab::encode_bpe_word(const std::string & word, std::vector<int32_t> & out) const {
    if (ignore_merges_) {
        // Llama-3 (tiktoken): a word that is itself a token is taken whole
        std::string mapped;
        for (unsigned char b : word) {
            mapped += unicode_byte_to_utf8(b);
        }
        const int32_t id = find(mapped);
        if (id >= 0) {
            out.push_back(id);
            return;
        }
    }
    std::vector<Symbol> sym;
    sym.reserve(word.size());
    for (unsigned char b : word) {
        if (byte_ids_[b] >= 0) {
            sym.push_back({byte_ids_[b], int32_t(sym.size()) - 1, int32_t(sym.size()) + 1});
        }
    }
    if (sym.empty()) {
        return;
    }
    sym.back().next = -1;
    std::priority_queue<MergeCandidate> queue;
    auto try_pair = [&](int32_t left) {
        if (left < 0 || sym[size_t(left)].next < 0) {
            return;
        }
        const int32_t a = sym[size_t(left)].id;
        const int32_t b = sym[size_t(sym[size_t(left)].next)].id;
        auto it = merges_.find((uint64_t(uint32_t(a)) << 32) | uint32_t(b));
        if (it != merges_.end()) {
            queue.push({it->second.first, left, a, b, it->second.second});
        }
    };
    for (int32_t i = 0; i + 1 < int32_t(sym.size()); ++i) {
        try_pair(i);
    }
    while (!queue.empty()) {
        const MergeCandidate c = queue.top();
        queue.pop();
        Symbol & l = sym[size_t(c.left)];
        if (l.id != c.left_id || l.next < 0 || sym[size_t(l.next)].id != c.right_id) {
            continue;  // stale: one side was merged since this candidate was queued
        }
        Symbol & r = sym[size_t(l.next)];
        l.id = c.merged;
        l.next = r.next;
        if (r.next >= 0) {
            sym[size_t(r.next)].prev = c.left;
        }
        r.id = -1;
        try_pair(l.prev);
        try_pair(c.left);
    }
    for (int32_t i = 0; i >= 0 && i < int32_t(sym.size()); i = sym[size_t(i)].next) {
        out.push_back(sym[size_t(i)].id);
    }
}

namespace {

struct SpmSymbol {
    uint32_t offset;  // into the escaped text
    uint32_t len;
    int32_t prev;
    int32_t next;
};

struct SpmCandidate {
    float score;
    int32_t left;
    int32_t right;
    uint32_t len;  // merged byte length, to detect stale candidates
    // highest score first, then leftmost (SentencePiece's bpe_model.cc agenda order)
    bool operator<(const SpmCandidate & o) const { return score != o.score ? score < o.score : left > o.left; }
};

}  // namespace

void Vocab::encode_spm(const std::string & raw, std::vector<int32_t> & out) const {
    // identity normalization: optionally without leading, trailing and repeated spaces; then the dummy
    // prefix, and every space shown as ▁
    std::string text;
    text.reserve(raw.size() * 3 + 3);
    size_t b = 0, e = raw.size();
    if (remove_extra_whitespaces_) {
        while (b < e && raw[b] == ' ') {
            ++b;
        }
        while (e > b && raw[e - 1] == ' ') {
            --e;
        }
    }
    if (b == e) {
        return;
    }
    if (add_space_prefix_) {
        text += k_space_escape;
    }
    for (size_t i = b; i < e; ++i) {
        if (raw[i] != ' ') {
            text += raw[i];
        } else if (!(remove_extra_whitespaces_ && raw[i - 1] == ' ')) {
            text += k_space_escape;
        }
    }
    size_t seg = 0;
    if (spm_split_words_) {
        // a segment ends where a ▁ run starts after another character
        for (size_t p = 3; p + 3 <= text.size(); ++p) {
            if (text.compare(p, 3, k_space_escape) == 0 && text.compare(p - 3, 3, k_space_escape) != 0) {
                encode_spm_segment(text, seg, p, out);
                seg = p;
            }
        }
    }
    encode_spm_segment(text, seg, text.size(), out);
}

void Vocab::encode_spm_segment(const std::string & text, size_t begin, size_t end, std::vector<int32_t> & out) const {
    std::vector<SpmSymbol> sym;
    for (size_t i = begin; i < end;) {
        uint32_t len = 1;
        const unsigned char c = uint8_t(text[i]);
        if (c >= 0xC0) {  // a lead byte: keep the character whole (invalid input splits byte by byte)
            const std::vector<UnicodeCpt> one = unicode_cpts_from_utf8(text.substr(i, std::min<size_t>(4, end - i)));
            len = one[0].len;
        }
        sym.push_back({uint32_t(i), len, int32_t(sym.size()) - 1, int32_t(sym.size()) + 1});
        i += len;
    }
    if (sym.empty()) {
        return;
    }
    sym.back().next = -1;
    // only normal and user-defined pieces take part in merges (SentencePiece's `pieces_`)
    auto piece_id = [&](uint32_t offset, uint32_t len) -> int32_t {
        const int32_t id = find(text.substr(offset, len));
        return id >= 0 && (types_[size_t(id)] == TOKEN_TYPE_NORMAL || types_[size_t(id)] == TOKEN_TYPE_USER_DEFINED)
                   ? id : -1;
    };
    std::priority_queue<SpmCandidate> queue;
    auto try_pair = [&](int32_t left) {
        if (left < 0 || sym[size_t(left)].next < 0) {
            return;
        }
        const SpmSymbol & l = sym[size_t(left)];
        const SpmSymbol & r = sym[size_t(l.next)];
        const int32_t id = piece_id(l.offset, l.len + r.len);
        if (id >= 0) {
            queue.push({scores_[size_t(id)], left, l.next, l.len + r.len});
        }
    };
    for (int32_t i = 0; i + 1 < int32_t(sym.size()); ++i) {
        try_pair(i);
    }
    while (!queue.empty()) {
        const SpmCandidate c = queue.top();
        queue.pop();
        SpmSymbol & l = sym[size_t(c.left)];
        if (l.len == 0 || l.next != c.right || l.len + sym[size_t(c.right)].len != c.len) {
            continue;  // stale
        }
        SpmSymbol & r = sym[size_t(c.right)];
        l.len += r.len;
        l.next = r.next;
        if (r.next >= 0) {
            sym[size_t(r.next)].prev = c.left;
        }
        r.len = 0;
        try_pair(l.prev);
        try_pair(c.left);
    }
    for (int32_t i = 0; i >= 0; i = sym[size_t(i)].next) {
        const SpmSymbol & s = sym[size_t(i)];
        const int32_t id = piece_id(s.offset, s.len);
        if (id >= 0) {
            out.push_back(id);
        } else if (byte_fallback_) {
            for (uint32_t k = 0; k < s.len; ++k) {
                out.push_back(byte_ids_[uint8_t(text[s.offset + k])]);
            }
        } else if (unk_ >= 0) {
            out.push_back(unk_);
        } else {
            throw Error(path_ + ": text piece '" + text.substr(s.offset, s.len) +
                        "' is not in the vocabulary and the tokenizer has neither byte fallback nor an unknown token");
        }
    }
}

std::string Vocab::token_to_piece(int32_t id, bool special) const {
    const TokenType ty = token_type(id);
    if (!special && (ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_UNKNOWN || ty == TOKEN_TYPE_UNUSED)) {
        return std::string();
    }
    return pieces_[size_t(id)];
}

std::string Vocab::decode(const std::vector<int32_t> & ids, bool special) const {
    std::string out;
    bool strip = strips_leading_space();
    for (int32_t id : ids) {
        std::string piece = token_to_piece(id, special);
        if (strip && !piece.empty()) {
            if (piece[0] == ' ') {
                piece.erase(0, 1);
            }
            strip = false;
        }
        out += piece;
    }
    return out;
}

StreamDecoder::StreamDecoder(const Vocab & vocab, std::vector<std::string> stops, bool special)
    : vocab_(vocab), special_(special), strip_space_(vocab.strips_leading_space()) {
    for (std::string & s : stops) {
        if (s.empty()) {
            throw ArgError("stop strings must not be empty");
        }
        stops_.push_back(std::move(s));
    }
}

std::string StreamDecoder::push(int32_t id) {
    if (stopped_) {
        return std::string();
    }
    std::string piece = vocab_.token_to_piece(id, special_);
    if (strip_space_ && !piece.empty()) {
        if (piece[0] == ' ') {
            piece.erase(0, 1);
        }
        strip_space_ = false;
    }
    pending_ += piece;
    // only whole UTF-8 sequences are candidates for output; an incomplete tail waits for its next bytes
    const size_t complete = unicode_utf8_complete_len(pending_.data(), pending_.size());
    size_t stop_at = std::string::npos;
    for (const std::string & s : stops_) {
        stop_at = std::min(stop_at, pending_.substr(0, complete).find(s));
    }
    if (stop_at != std::string::npos) {
        stopped_ = true;
        std::string out = unicode_utf8_sanitize(pending_.substr(0, stop_at));
        pending_.clear();
        return out;
    }
    // hold back the longest tail that is a proper prefix of a stop string: it may still complete one
    size_t hold = 0;
    for (const std::string & s : stops_) {
        for (size_t k = std::min(complete, s.size() - 1); k > hold; --k) {
            if (pending_.compare(complete - k, k, s, 0, k) == 0) {
                hold = k;
                break;
            }
        }
    }
    const size_t emit = complete - hold;
    std::string out = unicode_utf8_sanitize(pending_.substr(0, emit));
    pending_.erase(0, emit);
    return out;
}

std::string StreamDecoder::flush() {
    if (stopped_) {
        return std::string();
    }
    std::string out = unicode_utf8_sanitize(pending_);
    pending_.clear();
    return out;
}

}  // namespace mq
