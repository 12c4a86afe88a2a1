// Native chat formats (see mq-chat-format.h). Each branch reproduces the reference template of its
// format character for character, including where it strips content or places BOS/EOS.
#include "mq-chat-format.h"

#include "mq-error.h"
#include "mq-unicode.h"

namespace mq {

const char * chat_format_name(ChatFormat format) {
    switch (format) {
        case CHAT_FORMAT_PLAIN: return "plain";
        case CHAT_FORMAT_CHATML: return "chatml";
        case CHAT_FORMAT_LLAMA2: return "llama2";
        case CHAT_FORMAT_LLAMA3: return "llama3";
        case CHAT_FORMAT_MISTRAL: return "mistral";
        case CHAT_FORMAT_ZEPHYR: return "zephyr";
    }
    return "unknown";
}

static bool contains(const std::string & s, const char * needle) {
    return s.find(needle) != std::string::npos;
}

// ChatML templates that insert a default system turn write it as one string literal:
// '<|im_start|>system\n' + text + '<|im_end|>' with the newline raw or escaped. An expression in place
// of the text (a variable, a concatenation) is not a literal and yields no default.
static std::string chatml_default_system(const std::string & tmpl) {
    const std::string head = "<|im_start|>system";
    for (size_t pos = tmpl.find(head); pos != std::string::npos; pos = tmpl.find(head, pos + 1)) {
        size_t p = pos + head.size();
        if (tmpl.compare(p, 1, "\n") == 0) {
            p += 1;
        } else if (tmpl.compare(p, 2, "\\n") == 0) {
            p += 2;
        } else {
            continue;
        }
        const size_t end = tmpl.find("<|im_end|>", p);
        if (end == std::string::npos || end == p) {
            continue;
        }
        const std::string text = tmpl.substr(p, end - p);
        if (text.find_first_of("'\"+{}") != std::string::npos) {
            continue;
        }
        std::string out;
        for (size_t k = 0; k < text.size(); ++k) {
            if (text[k] == '\\' && k + 1 < text.size() && text[k + 1] == 'n') {
                out += '\n';
                ++k;
            } else {
                out += text[k];
            }
        }
        return out;
    }
    return std::string();
}

ChatTemplate chat_template_detect(const std::string & tmpl) {
    ChatTemplate t;
    if (contains(tmpl, "<|im_start|>")) {
        t.format = CHAT_FORMAT_CHATML;
        t.default_system = chatml_default_system(tmpl);
    } else if (contains(tmpl, "<|start_header_id|>")) {
        t.format = CHAT_FORMAT_LLAMA3;
    } else if (contains(tmpl, "[INST]") && contains(tmpl, "<<SYS>>")) {
        t.format = CHAT_FORMAT_LLAMA2;
    } else if (contains(tmpl, "[INST]")) {
        t.format = CHAT_FORMAT_MISTRAL;
    } else if (contains(tmpl, "<|user|>") && contains(tmpl, "<|assistant|>")) {
        t.format = CHAT_FORMAT_ZEPHYR;
    }
    return t;
}

// Python's str.strip(): leading and trailing White_Space removed (Jinja's trim filter is the same)
static std::string strip(const std::string & s) {
    const std::vector<UnicodeCpt> cpts = unicode_cpts_from_utf8(s);
    size_t b = 0, e = cpts.size();
    while (b < e && (unicode_cpt_flags(cpts[b].cpt) & UNICODE_WHITESPACE)) {
        ++b;
    }
    while (e > b && (unicode_cpt_flags(cpts[e - 1].cpt) & UNICODE_WHITESPACE)) {
        --e;
    }
    return b == e ? std::string() : s.substr(cpts[b].offset, cpts[e - 1].offset + cpts[e - 1].len - cpts[b].offset);
}

// Llama-2 and Mistral templates require user/assistant/user/... after the optional system message:
// turn `turn` (counted from the first non-system message) is message `index`
static void check_alternating(const ChatMessage & m, size_t index, size_t turn) {
    if ((m.role == "user") != (turn % 2 == 0)) {
        throw ArgError("Conversation roles must alternate user/assistant/user/assistant/... (message " +
                       std::to_string(index) + " has role '" + m.role + "')");
    }
}

std::string chat_template_apply(const ChatTemplate & tmpl, const std::vector<ChatMessage> & msgs,
                                bool add_generation_prompt, const std::string & bos, const std::string & eos) {
    std::string out;
    switch (tmpl.format) {
        case CHAT_FORMAT_CHATML:
            if (!tmpl.default_system.empty() && (msgs.empty() || msgs[0].role != "system")) {
                out += "<|im_start|>system\n" + tmpl.default_system + "<|im_end|>\n";
            }
            for (const ChatMessage & m : msgs) {
                out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
            }
            if (add_generation_prompt) {
                out += "<|im_start|>assistant\n";
            }
            break;
        case CHAT_FORMAT_LLAMA3:
            for (size_t i = 0; i < msgs.size(); ++i) {
                if (i == 0) {
                    out += bos;
                }
                out += "<|start_header_id|>" + msgs[i].role + "<|end_header_id|>\n\n" + strip(msgs[i].content) +
                       "<|eot_id|>";
            }
            if (add_generation_prompt) {
                out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
            }
            break;
        case CHAT_FORMAT_LLAMA2: {
            // the system message goes inside the first user turn; the template has no generation prompt
            const bool has_system = !msgs.empty() && msgs[0].role == "system";
            const size_t first = has_system ? 1 : 0;
            for (size_t i = first; i < msgs.size(); ++i) {
                check_alternating(msgs[i], i, i - first);
                std::string content = msgs[i].content;
                if (i == first && has_system) {
                    content = "<<SYS>>\n" + msgs[0].content + "\n<</SYS>>\n\n" + content;
                }
                if (msgs[i].role == "user") {
                    out += bos + "[INST] " + strip(content) + " [/INST]";
                } else {
                    out += " " + strip(content) + " " + eos;
                }
            }
            break;
        }
        case CHAT_FORMAT_MISTRAL:
            // the template checks each message in turn: alternation first, then the role
            out += bos;
            for (size_t i = 0; i < msgs.size(); ++i) {
                check_alternating(msgs[i], i, i);
                if (msgs[i].role != "user" && msgs[i].role != "assistant") {
                    throw ArgError("Only user and assistant roles are supported! (message " + std::to_string(i) +
                                   " has role '" + msgs[i].role + "')");
                }
                out += msgs[i].role == "user" ? "[INST] " + msgs[i].content + " [/INST]" : msgs[i].content + eos + " ";
            }
            break;
        case CHAT_FORMAT_ZEPHYR:
            for (const ChatMessage & m : msgs) {
                out += "<|" + m.role + "|>\n" + m.content + eos + "\n";
            }
            if (add_generation_prompt) {
                out += "<|assistant|>\n";
            }
            break;
        case CHAT_FORMAT_PLAIN:
            for (const ChatMessage & m : msgs) {
                out += m.role + ": " + m.content + "\n";
            }
            if (add_generation_prompt) {
                out += "assistant:";
            }
            break;
    }
    return out;
}

}  // namespace mq
