// The linear schemes the engine runs, one entry each (docs/format.md for the tensors, docs/numerics.md for the
// arithmetic, docs/architecture.md for what else an entry touches). A scheme's name is the one the converter writes
// into quant.linears (converter/schemes.py); the same name selects its kernels in each backend's table
// (cpu-backend.cpp, cuda-backend.cu), and Backend::prepare_linear rejects a scheme a backend has no entry for.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mq {

class File;
struct Linear;

// where a linear's input comes from, which decides the input-side tensors of the static scheme w4a4
enum LinearInput {
    LINEAR_INPUT_NORM,   // RMSNorm output: in_scale + in_map
    LINEAR_INPUT_SLOTS,  // another op's step-unit values (SwiGLU): in_map
    LINEAR_INPUT_CODES,  // attention output rounded directly: neither
};

struct Scheme {
    const char * name;
    // true: the linear takes int4 codes made by the op before it (Backend::linear_codes, a static W4A4 block);
    // false: fp32 activations (Backend::linear)
    bool takes_codes;
    // the format's limits on the packed input width Kp (a multiple of this; 0: no packed weights) and on the
    // group size along K (a multiple of this; 0: no groups)
    int32_t kp_multiple, group_multiple;
    // binds and validates lin's tensors in the file (lin.name, n, k set); throws naming the tensor
    void (*load)(const File & file, Linear & lin, LinearInput input);
    // a one-line description for docs and messages
    const char * about;
};

// every scheme, in the order docs/format.md lists them
const std::vector<Scheme> & schemes();
// the scheme named `name`, or nullptr
const Scheme * scheme_find(const std::string & name);
// "f16, w4a16g, w4a4d, w4a4"
std::string scheme_names();

}  // namespace mq
