// Helpers shared by the CUDA backend's ops: error checks that throw mq::Error naming the failed call.
#pragma once

#include "../../src/mq-error.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace mq {

inline void cuda_check(cudaError_t err, const char * what) {
    if (err != cudaSuccess) {
        throw Error(std::string("CUDA: ") + what + " failed: " + cudaGetErrorString(err));
    }
}

// after every launch: a bad configuration is reported here, not at the next synchronization
inline void cuda_check_launch(const char * kernel) {
    cuda_check(cudaGetLastError(), kernel);
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mq
