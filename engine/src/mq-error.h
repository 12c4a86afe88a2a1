// The engine's one exception type: every user-facing failure (bad file, bad argument, overflow)
// is an mq::Error whose message names what is wrong and what was expected.
#pragma once

#include <stdexcept>
#include <string>

namespace mq {

// msg with every byte that is not part of well-formed UTF-8 written as \xNN: messages quote names and
// texts from untrusted files, and must stay valid text (a Python str, a terminal line)
inline std::string error_text(const std::string & msg) {
    static const char * hex = "0123456789ABCDEF";
    std::string out;
    for (size_t i = 0; i < msg.size();) {
        const unsigned char c = (unsigned char) msg[i];
        size_t n = c < 0x80 ? 1 : (c >= 0xC2 && c <= 0xDF) ? 2 : (c >= 0xE0 && c <= 0xEF) ? 3 : (c >= 0xF0 && c <= 0xF4) ? 4 : 0;
        bool ok = n > 0 && i + n <= msg.size();
        for (size_t k = 1; ok && k < n; k++) {
            ok = ((unsigned char) msg[i + k] & 0xC0) == 0x80;
        }
        if (ok && n >= 3) {
            // shortest form, no surrogates, at most U+10FFFF (the second byte's range decides)
            const unsigned char c1 = (unsigned char) msg[i + 1];
            ok = !(c == 0xE0 && c1 < 0xA0) && !(c == 0xED && c1 >= 0xA0) && !(c == 0xF0 && c1 < 0x90) &&
                 !(c == 0xF4 && c1 >= 0x90);
        }
        if (ok && (c >= 0x20 || c == '\n' || c == '\t')) {
            out.append(msg, i, n);
            i += n;
        } else {
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
            i += 1;
        }
    }
    return out;
}

class Error : public std::runtime_error {
public:
    explicit Error(const std::string & msg) : std::runtime_error(error_text(msg)) {}
};

// argument errors (invalid sampling value, empty prompt, ...) map to ValueError in Python
class ArgError : public Error {
public:
    explicit ArgError(const std::string & msg) : Error(msg) {}
};

// context overflow: prompt + generation longer than the context window
class ContextOverflow : public Error {
public:
    explicit ContextOverflow(const std::string & msg) : Error(msg) {}
};

}  // namespace mq
