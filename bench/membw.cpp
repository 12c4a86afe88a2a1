// Streaming-read bandwidth of this machine: every thread sums its own slice of a buffer much larger than
// the caches, with 64-byte vector loads; the best of several passes is reported in GB/s.
//   g++ -O3 -march=native -pthread bench/membw.cpp -o membw && ./membw [threads] [MiB]
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

static double sum_slice(const float * p, size_t n) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (size_t i = 0; i + 64 <= n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
        a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        s += p[i];
    }
    return s;
#endif
}

int main(int argc, char ** argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    const size_t mib = argc > 2 ? (size_t) atoll(argv[2]) : 1024;
    const size_t n = mib * 1024 * 1024 / sizeof(float);
    float * buf = (float *) aligned_alloc(64, n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        buf[i] = 1.0f;
    }
    double best = 0.0, sink = 0.0;
    for (int rep = 0; rep < 5; rep++) {
        std::vector<std::thread> ts;
        std::vector<double> sums(threads);
        auto t0 = std::chrono::steady_clock::now();
        const size_t per = n / threads / 64 * 64;
        for (int t = 0; t < threads; t++) {
            ts.emplace_back([&, t] { sums[t] = sum_slice(buf + t * per, per); });
        }
        for (auto & t : ts) {
            t.join();
        }
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        for (double v : sums) {
            sink += v;
        }
        best = std::max(best, (double) per * threads * sizeof(float) / s / 1e9);
    }
    printf("%.2f\n", best);
    fprintf(stderr, "(checksum %.0f)\n", sink);
    return 0;
}
