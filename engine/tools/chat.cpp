// mergequant-chat: a standalone chat program over the engine (no Python).
//
//   mergequant-chat -m model.mq                       interactive; /exit quits, /clear starts over
//   mergequant-chat -m model.mq -p "Hello" -n 64      one reply and exit
//
// The conversation stays in the KV cache: each turn re-renders the whole conversation with the model's
// chat format and only the tokens after the cached prefix are prefilled. The first Ctrl-C stops the reply
// being generated; a second one (or one while waiting for input) exits.
#include "mq-chat-format.h"
#include "mq-context.h"
#include "mq-error.h"
#include "mq-model.h"
#include "mq-vocab.h"

#include <csignal>
#include <new>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

volatile sig_atomic_t g_generating = 0;
volatile sig_atomic_t g_interrupted = 0;

void on_sigint(int) {
    if (g_generating && !g_interrupted) {
        g_interrupted = 1;  // stop this reply, keep the program
        return;
    }
    const char msg[] = "\n";
    ssize_t r = write(STDERR_FILENO, msg, sizeof(msg) - 1);
    (void) r;
    _exit(130);
}

struct Args {
    std::string model;
    std::string prompt;
    bool has_prompt = false;
    std::string system;
    std::string device = "auto";
    int32_t n_predict = 512;
    int32_t threads = 0;
    int32_t n_ctx = 0;
    mq::KvType kv_type = mq::KV_TYPE_F16;
    bool timings = false;
    mq::SamplingParams sampling;
};

void usage(FILE * out) {
    fprintf(out,
            "usage: mergequant-chat -m MODEL [options]\n"
            "\n"
            "Chat with a .mq model (convert one with `mergequant convert`). Without -p the program is\n"
            "interactive: type a message, /clear to forget the conversation, /exit (or Ctrl-D) to quit;\n"
            "Ctrl-C stops the reply being generated, a second Ctrl-C exits.\n"
            "\n"
            "options:\n"
            "  -m, --model FILE        model file (.mq)\n"
            "  -p, --prompt TEXT       answer one message and exit\n"
            "  -sys, --system TEXT     system message\n"
            "  -n, --n-predict N       tokens per reply at most (default 512)\n"
            "  --temp T                temperature, 0 = greedy (default 0.8)\n"
            "  --top-k K               top-k, 0 = off (default 40)\n"
            "  --top-p P               top-p, 1 = off (default 0.95)\n"
            "  --min-p P               min-p, 0 = off (default 0.05)\n"
            "  --repeat-penalty R      repetition penalty, 1 = off (default 1.0)\n"
            "  --seed S                random seed (default: random)\n"
            "  --device D              auto | cpu | cuda | cuda:N (default auto)\n"
            "  -t, --threads N         CPU threads (default: one per core)\n"
            "  -c, --ctx-size N        context length (default: min(the model's, 4096))\n"
            "  --kv-cache T            KV cache type: fp16 (default) or int8 (a model converted with --kv-int8)\n"
            "  --timings               print prefill and decode tokens/s after each reply\n"
            "  -h, --help              this help\n");
}

[[noreturn]] void die(const std::string & msg) {
    fprintf(stderr, "mergequant-chat: error: %s\n", msg.c_str());
    exit(1);
}

long parse_int(const char * opt, const char * v) {
    char * end = nullptr;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (!*v || *end || errno) {
        die(std::string("invalid value '") + v + "' for " + opt + ": expected an integer");
    }
    return x;
}

float parse_float(const char * opt, const char * v) {
    char * end = nullptr;
    float x = strtof(v, &end);
    if (!*v || *end) {
        die(std::string("invalid value '") + v + "' for " + opt + ": expected a number");
    }
    return x;
}

Args parse_args(int argc, char ** argv) {
    Args a;
    for (int i = 1; i < argc; i++) {
        std::string o = argv[i];
        if (o == "-h" || o == "--help") {
            usage(stdout);
            exit(0);
        }
        if (i + 1 >= argc) {
            if (o.rfind("-", 0) == 0 && o != "--timings") {
                die("option " + o + " needs a value (see --help)");
            }
        }
        const char * v = i + 1 < argc ? argv[i + 1] : "";
        if (o == "--timings") {
            a.timings = true;
            continue;
        }
        if (o == "-m" || o == "--model") {
            a.model = v;
        } else if (o == "-p" || o == "--prompt") {
            a.prompt = v;
            a.has_prompt = true;
        } else if (o == "-sys" || o == "--system") {
            a.system = v;
        } else if (o == "-n" || o == "--n-predict") {
            a.n_predict = (int32_t) parse_int(o.c_str(), v);
        } else if (o == "--temp") {
            a.sampling.temperature = parse_float(o.c_str(), v);
        } else if (o == "--top-k") {
            a.sampling.top_k = (int32_t) parse_int(o.c_str(), v);
        } else if (o == "--top-p") {
            a.sampling.top_p = parse_float(o.c_str(), v);
        } else if (o == "--min-p") {
            a.sampling.min_p = parse_float(o.c_str(), v);
        } else if (o == "--repeat-penalty") {
            a.sampling.repetition_penalty = parse_float(o.c_str(), v);
        } else if (o == "--seed") {
            a.sampling.seed = parse_int(o.c_str(), v);
        } else if (o == "--device") {
            a.device = v;
        } else if (o == "-t" || o == "--threads") {
            a.threads = (int32_t) parse_int(o.c_str(), v);
        } else if (o == "-c" || o == "--ctx-size") {
            a.n_ctx = (int32_t) parse_int(o.c_str(), v);
        } else if (o == "--kv-cache") {
            try {
                a.kv_type = mq::kv_type_parse(v);
            } catch (const mq::ArgError &) {
                die(std::string("invalid value '") + v + "' for --kv-cache: expected fp16 or int8");
            }
        } else {
            die("unknown option '" + o + "' (see --help)");
        }
        i++;
    }
    if (a.model.empty()) {
        usage(stderr);
        die("no model given: use -m MODEL");
    }
    if (a.has_prompt && a.prompt.empty()) {
        die("empty prompt given with -p");
    }
    if (a.n_predict < 1) {
        die("invalid -n " + std::to_string(a.n_predict) + ": must be >= 1");
    }
    if (a.threads < 0) {
        die("invalid --threads " + std::to_string(a.threads) + ": must be >= 1");
    }
    return a;
}

// generates one reply to `messages`, streaming it to stdout; returns the reply text
std::string reply(mq::Context & ctx, const mq::ChatTemplate & fmt, const std::vector<mq::ChatMessage> & messages,
                  const Args & a) {
    const mq::Vocab & vocab = ctx.model().vocab();
    const std::string bos = vocab.bos() >= 0 ? vocab.token_to_piece(vocab.bos(), true) : "";
    const std::string eos = vocab.eos() >= 0 ? vocab.token_to_piece(vocab.eos(), true) : "";
    const std::string text = mq::chat_template_apply(fmt, messages, true, bos, eos);
    // the rendered text carries its own BOS where the format wants one
    std::vector<int32_t> prompt = vocab.encode(text, false, true);
    mq::GenerateParams gp;
    gp.max_tokens = a.n_predict;
    gp.sampling = a.sampling;
    if (fmt.format == mq::CHAT_FORMAT_PLAIN) {
        gp.stop = {"\nuser:"};  // the plain format has no end-of-turn token: stop at the next turn
    }
    // keep room for the reply: shrink it to what the context still holds
    const int32_t room = ctx.n_ctx() - (int32_t) prompt.size();
    if (room < 1) {
        throw mq::ContextOverflow("the conversation (" + std::to_string(prompt.size()) +
                                  " tokens) no longer fits the context of " + std::to_string(ctx.n_ctx()) +
                                  " tokens: use /clear");
    }
    gp.max_tokens = std::min(gp.max_tokens, room);
    g_interrupted = 0;
    g_generating = 1;
    mq::Generator gen(ctx, prompt, gp);
    std::string out, piece;
    while (!g_interrupted) {
        piece.clear();
        bool more = gen.next(piece);
        fwrite(piece.data(), 1, piece.size(), stdout);
        fflush(stdout);
        out += piece;
        if (!more) {
            break;
        }
    }
    g_generating = 0;
    printf("\n");
    if (a.timings) {
        const mq::Timings & t = gen.timings();
        fprintf(stderr, "[prefill: %d tokens (%d cached), %.1f tok/s | decode: %d tokens, %.1f tok/s]\n", t.n_prefill,
                t.n_cached, t.prefill_ms > 0 ? t.n_prefill * 1e3 / t.prefill_ms : 0.0, t.n_decode,
                t.decode_ms > 0 ? t.n_decode * 1e3 / t.decode_ms : 0.0);
    }
    return out;
}

}  // namespace

int main(int argc, char ** argv) {
    Args a = parse_args(argc, argv);
    try {
        a.sampling.validate();
        mq::ModelParams mp;
        mp.device = a.device;
        mp.n_threads = a.threads;
        auto model = std::make_shared<mq::Model>(a.model, mp);
        mq::ContextParams cp;
        cp.n_ctx = a.n_ctx;
        cp.kv_type = a.kv_type;
        mq::Context ctx(model, cp);
        const mq::ChatTemplate fmt = mq::chat_template_detect(model->vocab().chat_template());
        if (fmt.format == mq::CHAT_FORMAT_PLAIN) {
            fprintf(stderr, "mergequant-chat: warning: the model's chat template is not one of the known formats "
                            "(ChatML, Llama-2, Llama-3, Mistral, Zephyr): using a plain 'role: content' format\n");
        }
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = on_sigint;
        sigaction(SIGINT, &sa, nullptr);

        std::vector<mq::ChatMessage> messages;
        if (!a.system.empty()) {
            messages.push_back({"system", a.system});
        }
        if (a.has_prompt) {
            messages.push_back({"user", a.prompt});
            reply(ctx, fmt, messages, a);
            return 0;
        }
        fprintf(stderr, "mergequant-chat: %s on %s. /exit quits, /clear starts over, Ctrl-C stops a reply.\n",
                a.model.c_str(), model->backend().name().c_str());
        std::string line;
        for (;;) {
            fprintf(stdout, "> ");
            fflush(stdout);
            if (!std::getline(std::cin, line)) {
                printf("\n");
                return 0;
            }
            if (line == "/exit") {
                return 0;
            }
            if (line == "/clear") {
                messages.resize(a.system.empty() ? 0 : 1);
                ctx.truncate(0);
                continue;
            }
            if (line.empty()) {
                continue;
            }
            messages.push_back({"user", line});
            try {
                messages.push_back({"assistant", reply(ctx, fmt, messages, a)});
            } catch (const mq::ContextOverflow & e) {
                messages.pop_back();
                fprintf(stderr, "mergequant-chat: %s\n", e.what());
            }
        }
    } catch (const mq::Error & e) {
        die(e.what());
    } catch (const std::bad_alloc &) {
        // the memory plan refuses what it can foresee; anything else is still one line, not an abort
        die("out of memory");
    } catch (const std::exception & e) {
        die(std::string("internal error: ") + e.what());
    }
}
