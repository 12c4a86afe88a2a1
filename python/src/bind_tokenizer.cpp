// Python binding of the tokenizer alone: `Tokenizer(path)` loads only the vocabulary of a model file
// (a tokenizer-only .mq works), `StreamDecoder` for incremental detokenization, and `format_chat` /
// `chat_format` for the native chat formats the chat binary uses.
#include "mq-chat-format.h"
#include "mq-error.h"
#include "mq-file.h"
#include "mq-vocab.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

struct Tokenizer {
    std::unique_ptr<mq::File> file;
    std::unique_ptr<mq::Vocab> vocab;
};

// token bytes need not be valid UTF-8 on their own: invalid sequences become U+FFFD, as bytes.decode does
nb::str utf8_to_str(const std::string & s) {
    PyObject * o = PyUnicode_DecodeUTF8(s.data(), Py_ssize_t(s.size()), "replace");
    if (!o) {
        throw nb::python_error();
    }
    return nb::steal<nb::str>(o);
}

std::vector<mq::ChatMessage> to_messages(const nb::list & messages) {
    std::vector<mq::ChatMessage> out;
    for (size_t i = 0; i < messages.size(); ++i) {
        nb::handle h = messages[i];
        if (!nb::isinstance<nb::dict>(h) || !nb::borrow<nb::dict>(h).contains("role") ||
            !nb::borrow<nb::dict>(h).contains("content")) {
            throw mq::ArgError("messages[" + std::to_string(i) + "] must be a dict with 'role' and 'content'");
        }
        nb::dict m = nb::borrow<nb::dict>(h);
        out.push_back({nb::cast<std::string>(m["role"]), nb::cast<std::string>(m["content"])});
    }
    return out;
}

}  // namespace

void bind_tokenizer(nb::module_ & m) {
    nb::class_<Tokenizer>(m, "Tokenizer")
        .def("__init__",
             [](Tokenizer * self, const std::string & path) {
                 nb::gil_scoped_release release;
                 auto file = std::make_unique<mq::File>(path);
                 auto vocab = std::make_unique<mq::Vocab>(*file);
                 new (self) Tokenizer{std::move(file), std::move(vocab)};
             },
             "path"_a)
        .def("encode",
             [](const Tokenizer & t, const std::string & text, bool add_special, bool special) {
                 nb::gil_scoped_release release;
                 return t.vocab->encode(text, add_special, special);
             },
             "text"_a, "add_special"_a = true, "special"_a = false,
             "token ids of text; add_special adds BOS/EOS per the tokenizer, special matches control-token text")
        .def("decode",
             [](const Tokenizer & t, const std::vector<int32_t> & ids, bool special) {
                 std::string s;
                 {
                     nb::gil_scoped_release release;
                     s = t.vocab->decode(ids, special);
                 }
                 return utf8_to_str(s);
             },
             "ids"_a, "special"_a = false)
        .def("token_to_piece",
             [](const Tokenizer & t, int32_t id, bool special) {
                 const std::string s = t.vocab->token_to_piece(id, special);
                 return nb::bytes(s.data(), s.size());
             },
             "id"_a, "special"_a = true, "the raw bytes one token stands for")
        .def("stream_decoder",
             [](const Tokenizer & t, std::vector<std::string> stops, bool special) {
                 return new mq::StreamDecoder(*t.vocab, std::move(stops), special);
             },
             "stops"_a = std::vector<std::string>(), "special"_a = false, nb::keep_alive<0, 1>())
        .def_prop_ro("n_vocab", [](const Tokenizer & t) { return t.vocab->n_tokens(); })
        .def_prop_ro("bos_id", [](const Tokenizer & t) { return t.vocab->bos(); })
        .def_prop_ro("eos_id", [](const Tokenizer & t) { return t.vocab->eos(); })
        .def_prop_ro("eot_ids", [](const Tokenizer & t) { return t.vocab->eot_ids(); })
        .def_prop_ro("add_bos", [](const Tokenizer & t) { return t.vocab->add_bos(); })
        .def_prop_ro("add_eos", [](const Tokenizer & t) { return t.vocab->add_eos(); })
        .def_prop_ro("chat_template", [](const Tokenizer & t) { return t.vocab->chat_template(); });

    nb::class_<mq::StreamDecoder>(m, "StreamDecoder")
        .def("push", &mq::StreamDecoder::push, "id"_a, "text that became final with this token")
        .def("flush", &mq::StreamDecoder::flush, "the held-back text at the end of generation")
        .def_prop_ro("stopped", &mq::StreamDecoder::stopped);

    m.def("chat_format",
          [](const std::string & tmpl) { return std::string(mq::chat_format_name(mq::chat_template_detect(tmpl).format)); },
          "template"_a, "the native chat format recognised in a Jinja template ('plain' when none is)");
    m.def("format_chat",
          [](const std::string & tmpl, const nb::list & messages, bool add_generation_prompt, const std::string & bos,
             const std::string & eos) {
              return mq::chat_template_apply(mq::chat_template_detect(tmpl), to_messages(messages),
                                             add_generation_prompt, bos, eos);
          },
          "template"_a, "messages"_a, "add_generation_prompt"_a = true, "bos_token"_a = "", "eos_token"_a = "",
          "the prompt text of messages in the native format recognised in template");
}
