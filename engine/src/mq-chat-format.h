// Native chat formatting: the common chat formats recognised from a model's Jinja template text and
// produced without a template engine (the Python package renders the template itself with jinja2; the
// chat binary uses this). An unrecognised template falls back to a plain "role: content" format.
#pragma once

#include <string>
#include <vector>

namespace mq {

enum ChatFormat {
    CHAT_FORMAT_PLAIN,    // fallback: "role: content\n" lines, "assistant:" as the generation prompt
    CHAT_FORMAT_CHATML,   // <|im_start|>role\ncontent<|im_end|>\n (SmolLM2, Qwen2)
    CHAT_FORMAT_LLAMA2,   // <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s>
    CHAT_FORMAT_LLAMA3,   // <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
    CHAT_FORMAT_MISTRAL,  // <s>[INST] user [/INST]answer</s> [INST] ...
    CHAT_FORMAT_ZEPHYR,   // <|role|>\ncontent</s>\n
};

struct ChatMessage {
    std::string role;
    std::string content;
};

struct ChatTemplate {
    ChatFormat format = CHAT_FORMAT_PLAIN;
    std::string default_system;  // ChatML: the system turn the template inserts when none is given
};

const char * chat_format_name(ChatFormat format);

// recognise the format from the template text (markers such as <|im_start|>, [INST], <<SYS>>)
ChatTemplate chat_template_detect(const std::string & tmpl);

// the prompt text, as the model's template renders it for these messages; bos/eos are the token texts.
// Throws mq::ArgError where the template itself would raise (roles that do not alternate, a system
// message in a format without one).
std::string chat_template_apply(const ChatTemplate & tmpl, const std::vector<ChatMessage> & messages,
                                bool add_generation_prompt, const std::string & bos, const std::string & eos);

}  // namespace mq
