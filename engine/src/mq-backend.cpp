// Backend registry glue that does not depend on which backends were compiled in.
#include "mq-backend.h"

namespace mq {

#ifndef MERGEQUANT_HAVE_CUDA
bool backend_cuda_built() {
    return false;
}

std::unique_ptr<Backend> backend_cuda_create(int32_t, std::string & why) {
    why = "this build of mergequant has no CUDA backend (rebuild with MERGEQUANT_CUDA=ON and a CUDA compiler)";
    return nullptr;
}
#endif

}  // namespace mq
