// libFuzzer target: arbitrary bytes as a .mq model file. The reader, the config check, the tokenizer
// loader and the weight loading of the CPU backend must reject every malformed input with mq::Error
// (any other exception, a crash or a sanitizer report is a bug). Seed corpus: engine/fuzz/make-corpus.py.
#include "mq-error.h"
#include "mq-model.h"
#include "mq-vocab.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <sys/mman.h>
#include <unistd.h>

// the bytes as a file the reader can map: an anonymous in-memory file named through /proc/self/fd
static std::string write_memfd(const uint8_t * data, size_t size, int & fd) {
    fd = memfd_create("fuzz.mq", 0);
    if (fd < 0) {
        perror("memfd_create");
        abort();
    }
    for (size_t done = 0; done < size;) {
        const ssize_t w = write(fd, data + done, size - done);
        if (w <= 0) {
            perror("write");
            abort();
        }
        done += (size_t) w;
    }
    return "/proc/self/fd/" + std::to_string(fd);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    int fd = -1;
    const std::string path = write_memfd(data, size, fd);
    try {
        // the tokenizer loader on its own first: tokenizer-only files and files whose config is broken
        // still reach it
        mq::File file(path);
        mq::Vocab vocab(file);
        vocab.decode(vocab.encode("Hello world", true, true), true);
    } catch (const mq::Error &) {
    }
    try {
        mq::ModelParams p;
        p.device = "cpu";
        p.n_threads = 1;
        mq::Model model(path, p);
        // a file that loads is a model the engine can tokenize with
        const std::vector<int32_t> ids = model.vocab().encode("Hello world", true, true);
        model.vocab().decode(ids, true);
    } catch (const mq::Error &) {
        // the expected outcome for a malformed file
    }
    close(fd);
    return 0;
}
