// The engine's one exception type: every user-facing failure (bad file, bad argument, overflow)
// is an mq::Error whose message names what is wrong and what was expected.
#pragma once

#include <stdexcept>
#include <string>

namespace mq {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string & msg) : std::runtime_error(msg) {}
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
