// libFuzzer target: tokenizer encode / decode / stream-decode on arbitrary bytes, for every tokenizer
// file in $MQ_FUZZ_TOKENIZERS (a directory of tokenizer .mq files; engine/fuzz/make-corpus.py writes
// them). Input layout: byte 0 picks the tokenizer and the flags, the rest is text to encode and, read
// as little-endian 16-bit values modulo the vocabulary size, token ids to decode.
#include "mq-error.h"
#include "mq-vocab.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <memory>
#include <string>
#include <vector>

namespace {

struct Loaded {
    std::unique_ptr<mq::File> file;
    std::unique_ptr<mq::Vocab> vocab;
};

std::vector<Loaded> load_all() {
    const char * dir = getenv("MQ_FUZZ_TOKENIZERS");
    if (!dir) {
        fprintf(stderr, "fuzz-tokenizer: set MQ_FUZZ_TOKENIZERS to a directory of tokenizer .mq files\n");
        abort();
    }
    std::vector<std::string> names;
    if (DIR * d = opendir(dir)) {
        while (dirent * e = readdir(d)) {
            const std::string n = e->d_name;
            if (n.size() > 3 && n.compare(n.size() - 3, 3, ".mq") == 0) {
                names.push_back(std::string(dir) + "/" + n);
            }
        }
        closedir(d);
    }
    std::sort(names.begin(), names.end());
    std::vector<Loaded> out;
    for (const std::string & n : names) {
        Loaded l;
        l.file.reset(new mq::File(n));
        l.vocab.reset(new mq::Vocab(*l.file));
        out.push_back(std::move(l));
    }
    if (out.empty()) {
        fprintf(stderr, "fuzz-tokenizer: no .mq files in %s\n", dir);
        abort();
    }
    return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    static const std::vector<Loaded> toks = load_all();
    if (size < 1) {
        return 0;
    }
    const mq::Vocab & v = *toks[data[0] % toks.size()].vocab;
    const bool add_special = data[0] & 0x10, parse_special = data[0] & 0x20, special = data[0] & 0x40;
    const std::string text((const char *) data + 1, size - 1);

    const std::vector<int32_t> ids = v.encode(text, add_special, parse_special);
    for (int32_t id : ids) {
        if (id < 0 || id >= v.n_tokens()) {
            fprintf(stderr, "encode produced id %d outside [0, %d)\n", id, v.n_tokens());
            abort();
        }
    }
    v.decode(ids, special);

    std::vector<int32_t> raw;
    for (size_t i = 1; i + 1 < size; i += 2) {
        raw.push_back((int32_t) ((data[i] | (data[i + 1] << 8)) % v.n_tokens()));
    }
    v.decode(raw, special);
    std::vector<std::string> stops;
    if (size > 4) {
        stops.push_back(std::string((const char *) data + 1, 3));
    }
    mq::StreamDecoder sd(v, stops, special);
    std::string streamed;
    for (int32_t id : raw) {
        streamed += sd.push(id);
        if (sd.stopped()) {
            break;
        }
    }
    streamed += sd.flush();
    // the stream decoder promises complete UTF-8
    if (mq::unicode_utf8_sanitize(streamed) != streamed) {
        fprintf(stderr, "StreamDecoder emitted invalid UTF-8\n");
        abort();
    }
    return 0;
}
