#include "mq-rope.h"

#include "mq-backend.h"

#include <algorithm>
#include <cmath>

namespace mq {

double rope_inv_freq(int32_t i, int32_t head_dim, const RopeParams & rp) {
    // theta^(-2i/d) in float64, with Llama-3 frequency scaling when configured (docs/numerics.md)
    const double f = std::pow((double) rp.theta, -(2.0 * i) / head_dim);
    if (rp.factor <= 0.0f) {
        return f;
    }
    const double pi = 3.14159265358979323846;
    const double wavelen = 2.0 * pi / f;
    double smooth = ((double) rp.original_max_pos / wavelen - rp.low_freq_factor) /
                    ((double) rp.high_freq_factor - rp.low_freq_factor);
    smooth = std::min(1.0, std::max(0.0, smooth));
    return (1.0 - smooth) * f / rp.factor + smooth * f;
}

}  // namespace mq
