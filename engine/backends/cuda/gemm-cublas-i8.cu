// The integer schemes' prefill GEMM on cuBLAS (gemm-cublas-i8.cuh): widen the int4 weights of a block of output
// columns to int8, one cuBLAS int8 GEMM into int32 sums, one epilogue kernel.
#include "gemm-cublas-i8.cuh"

#include "cublas.cuh"
#include "cuda-common.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace mq {

namespace {

constexpr size_t WORK_MAX = size_t(64) << 20;  // bytes of widened weights + int32 sums per block of columns
constexpr int EPI_COLS = 128, EPI_ROWS = 32;  // an epilogue block's tile

int32_t min_m() {
    static const int32_t v = [] {
        const char * e = std::getenv("MERGEQUANT_CUBLAS_I8_MIN_M");
        if (!e || !*e) return 64;
        char * end = nullptr;
        const long x = std::strtol(e, &end, 10);
        if (*end != '\0' || x < 17) {
            throw Error(std::string("MERGEQUANT_CUBLAS_I8_MIN_M='") + e + "': expected an integer >= 17 (smaller m "
                        "takes the GEMV)");
        }
        return (int32_t) std::min<long>(x, INT32_MAX);
    }();
    return v;
}

// MERGEQUANT_I8_LORA_ANY=1: the any-rank epilogue kernel for every rank (a measurement switch)
bool lora_any() {
    static const bool v = [] {
        const char * e = std::getenv("MERGEQUANT_I8_LORA_ANY");
        return e && std::string(e) == "1";
    }();
    return v;
}

bool widened(I8Weights fmt) {
    return fmt != I8Weights::I8;
}

// the output columns of one block: a multiple of 128 whose widened weights (two buffers) and sums fit WORK_MAX
// (at least 128)
int64_t block_cols(int32_t m, int64_t n, int64_t k, I8Weights fmt) {
    const size_t per_col = (size_t) m * sizeof(int32_t) + (widened(fmt) ? 2 * (size_t) k : 0);
    const int64_t cols = std::max<int64_t>(EPI_COLS, (int64_t) (WORK_MAX / per_col) / EPI_COLS * EPI_COLS);
    return std::min(cols, (n + EPI_COLS - 1) / EPI_COLS * EPI_COLS);
}

size_t round256(size_t b) {
    return (b + 255) / 256 * 256;
}

// w8[r][k] = q[n0 + r][k] (· gscale[n0 + r][k / group]) for the block's rows r < rows: each thread widens 16 bytes
// (32 codes, inside one group: group is a multiple of 64) into two 16-byte stores
__global__ void widen_int4_kernel(const uint8_t * __restrict__ q, const uint8_t * __restrict__ gscale, int ng,
                                  int group, int64_t k, int64_t pieces, int8_t * __restrict__ w8) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;  // piece of 16 packed bytes
    if (i >= pieces) return;
    const int64_t per_row = k / 32, r = i / per_row, kk = (i % per_row) * 32;
    const uint4 v = ((const uint4 *) q)[i];
    const int gs = gscale ? gscale[r * ng + kk / group] : 1;
    const uint32_t in[4] = {v.x, v.y, v.z, v.w};
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint32_t lo = 0, hi = 0;
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const uint32_t byte = (in[j] >> (8 * b)) & 0xFF;
            const int c0 = ((int) (byte << 28)) >> 28, c1 = ((int) (byte << 24)) >> 28;  // low, high nibble
            const uint32_t pair = ((uint32_t) (uint8_t) (int8_t) (c0 * gs)) | ((uint32_t) (uint8_t) (int8_t) (c1 * gs) << 8);
            if (b < 2) {
                lo |= pair << (16 * b);
            } else {
                hi |= pair << (16 * (b - 2));
            }
        }
        out[2 * j] = lo, out[2 * j + 1] = hi;
    }
    uint4 * dst = (uint4 *) (w8 + r * k + kk);
    dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
    dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
}

// the epilogue's operations (gemm-cublas-i8.cuh) on one integer sum, in their order; each operand a pointer to
// its value, or null where the epilogue has none
__device__ __forceinline__ float i8_value(int32_t acc, const float * scale, const float * add, const float * row_scale,
                                          const float * bias) {
    const float f = (float) acc;
    float v = scale ? __fmul_rn(f, *scale) : f;
    if (add) v = __fadd_rn(v, *add);
    if (row_scale) v = __fmul_rn(v, *row_scale);
    if (bias) v = __fadd_rn(v, *bias);
    return v;
}

// one output y[m, n] of the epilogue, given its integer sum and its low-rank value (lora: the fp32 of the float64
// sum; used where has_lora, else add[m, n] where add is given)
__device__ __forceinline__ void i8_finish(int32_t acc, bool has_lora, float lora, int m, int n, int N,
                                          const float * __restrict__ scale, const float * __restrict__ add,
                                          const float * __restrict__ row_scale, const float * __restrict__ bias,
                                          int accumulate, float * __restrict__ y) {
    const float * a = has_lora ? &lora : add ? add + (size_t) m * N + n : nullptr;
    const float v = i8_value(acc, scale ? scale + n : nullptr, a, row_scale ? row_scale + m : nullptr,
                             bias ? bias + n : nullptr);
    float * yo = y + (size_t) m * N + n;
    *yo = accumulate ? __fadd_rn(*yo, v) : v;
}

// the epilogue over the int32 sums c [m][ldc] of columns n0 .. n0 + ldc - 1 of y [m][n], no low-rank branch: a
// block has 32 rows x 128 columns, a thread one column and every other row (coalesced along the row)
__global__ void __launch_bounds__(256) i8_epilogue_kernel(const int32_t * __restrict__ c, int ldc, int n0, int M, int N,
                                                          const float * __restrict__ scale, const float * __restrict__ add,
                                                          const float * __restrict__ row_scale,
                                                          const float * __restrict__ bias, int accumulate,
                                                          float * __restrict__ y) {
    const int cl = blockIdx.x * EPI_COLS + (threadIdx.x & (EPI_COLS - 1)), n = n0 + cl, mb = blockIdx.y * EPI_ROWS;
    if (n >= N || cl >= ldc) return;
    for (int r = threadIdx.x / EPI_COLS; r < EPI_ROWS && mb + r < M; r += 2) {
        const int m = mb + r;
        i8_finish(c[(size_t) m * ldc + cl], false, 0.0f, m, n, N, scale, add, row_scale, bias, accumulate, y);
    }
}

// the same with the low-rank up-projection: lora[m, n] = fp32(Σ_i b[n, i] · l[m, i]), fma in float64 for
// i = 0, 1, .. (the tiled GEMM's order). The kernel is bound by the int32 sums it reads and the fp32 outputs it
// reads (accumulate) and writes, not by the float64 fmas (rank 32: 64 a value against 12 bytes), so a thread
// owns one column: its R values of b in registers (one 2R-byte row of the file's lora_b), the block's ROWS rows
// of l staged in shared memory (read as broadcast pairs), and the sums and old outputs of all its rows loaded
// before the first fma, so that each thread has 2·ROWS loads in flight while the block stages l.
template <int R, int ROWS>
__global__ void __launch_bounds__(EPI_COLS) i8_epilogue_lora_kernel(const int32_t * __restrict__ c, int ldc, int n0,
                                                                    int M, int N, const float * __restrict__ scale,
                                                                    const float * __restrict__ row_scale,
                                                                    const float * __restrict__ bias, GemmLora lo,
                                                                    int accumulate, float * __restrict__ y) {
    __shared__ double2 sl[ROWS][R / 2];
    const int cl = blockIdx.x * EPI_COLS + threadIdx.x, n = n0 + cl, mb = blockIdx.y * ROWS;
    const int rows = min(ROWS, M - mb);
    const bool live = n < N && cl < ldc;
    int32_t acc[ROWS];
    float old[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        acc[r] = live && r < rows ? c[(size_t) (mb + r) * ldc + cl] : 0;
        old[r] = live && accumulate && r < rows ? y[(size_t) (mb + r) * N + n] : 0.0f;
    }
    for (int q = threadIdx.x; q < ROWS * R / 2; q += EPI_COLS) {
        const int r = q / (R / 2), i = q % (R / 2);
        sl[r][i] = r < rows ? ((const double2 *) (lo.l + (size_t) (mb + r) * R))[i] : make_double2(0.0, 0.0);
    }
    double b[R];
    {
        const uint4 * src = (const uint4 *) ((const __half *) lo.b + (size_t) (live ? n : 0) * R);
#pragma unroll
        for (int j = 0; j < R / 8; j++) {
            const uint4 v = src[j];
            const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int h = 0; h < 4; h++) {
                const __half2 p = *(const __half2 *) &w[h];
                b[8 * j + 2 * h] = (double) __low2float(p), b[8 * j + 2 * h + 1] = (double) __high2float(p);
            }
        }
    }
    __syncthreads();
    if (!live) return;
    const float sc = scale ? scale[n] : 1.0f, bs = bias ? bias[n] : 0.0f;
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        if (r >= rows) break;
        double s = 0.0;
#pragma unroll
        for (int i = 0; i < R / 2; i++) {
            const double2 l2 = sl[r][i];
            s = fma(b[2 * i], l2.x, s);
            s = fma(b[2 * i + 1], l2.y, s);
        }
        const int m = mb + r;
        const float lv = (float) s;
        const float v = i8_value(acc[r], scale ? &sc : nullptr, &lv, row_scale ? row_scale + m : nullptr,
                                 bias ? &bs : nullptr);
        y[(size_t) m * N + n] = accumulate ? __fadd_rn(old[r], v) : v;
    }
}

// the same for any rank up to CUBLAS_I8_MAX_RANK: a block has 64 rows x 128 columns, the tile's l rows and b
// columns staged in shared memory as doubles (sl[row][i], sb[i][col]); thread (tx, ty) = (tid % 32, tid / 32) owns
// columns tx + 32·j (j < 4) of rows ty + 8·r (r < 8)
constexpr int LORA_ROWS = 64;
__global__ void __launch_bounds__(256) i8_epilogue_lora_any_kernel(const int32_t * __restrict__ c, int ldc, int n0, int M,
                                                                   int N, const float * __restrict__ scale,
                                                                   const float * __restrict__ row_scale,
                                                                   const float * __restrict__ bias, GemmLora lo,
                                                                   int accumulate, float * __restrict__ y) {
    extern __shared__ double lsm[];
    const int rank = lo.rank, tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int c0 = blockIdx.x * EPI_COLS, mb = blockIdx.y * LORA_ROWS;
    double * sb = lsm;                    // [rank][EPI_COLS]
    double * sl = lsm + rank * EPI_COLS;  // [LORA_ROWS][rank]
    for (int q = threadIdx.x; q < rank * EPI_COLS; q += blockDim.x) {
        const int i = q / EPI_COLS, cc = c0 + q % EPI_COLS, nn = n0 + cc;
        sb[q] = nn < N && cc < ldc ? (double) __half2float(((const __half *) lo.b)[(size_t) nn * rank + i]) : 0.0;
    }
    for (int q = threadIdx.x; q < rank * LORA_ROWS; q += blockDim.x) {
        const int r = q / rank, i = q % rank;
        sl[q] = mb + r < M ? lo.l[(size_t) (mb + r) * rank + i] : 0.0;
    }
    __syncthreads();
    double s[8][4] = {};
    for (int i = 0; i < rank; i++) {
        double bv[4], lv[8];
#pragma unroll
        for (int j = 0; j < 4; j++) bv[j] = sb[i * EPI_COLS + tx + 32 * j];
#pragma unroll
        for (int r = 0; r < 8; r++) lv[r] = sl[(ty + 8 * r) * rank + i];
#pragma unroll
        for (int r = 0; r < 8; r++)
#pragma unroll
            for (int j = 0; j < 4; j++) s[r][j] = fma(bv[j], lv[r], s[r][j]);
    }
#pragma unroll
    for (int r = 0; r < 8; r++) {
        const int m = mb + ty + 8 * r;
        if (m >= M) break;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int cl = c0 + tx + 32 * j, n = n0 + cl;
            if (n >= N || cl >= ldc) continue;
            i8_finish(c[(size_t) m * ldc + cl], true, (float) s[r][j], m, n, N, scale, nullptr, row_scale, bias,
                      accumulate, y);
        }
    }
}

// The widening of block i + 1 runs on a second stream while block i's GEMM runs (memory-bound beside
// compute-bound), into the other of two buffers: a side stream and its events per calling stream (each backend
// has its own stream, and its ops run one at a time; two backends on one device never share events), made at
// first use.
struct Side {
    cudaStream_t stream = nullptr;
    cudaEvent_t start = nullptr, end = nullptr, widened[2] = {}, done[2] = {};
};
Side * side_for_stream(cudaStream_t st) {
    static std::mutex mu;
    static std::map<std::pair<int, cudaStream_t>, Side *> sides;
    std::lock_guard<std::mutex> lock(mu);
    Side *& s = sides[{cuda_current_device(), st}];
    if (!s) {
        Side * n = new Side();
        cuda_check(cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking), "cudaStreamCreate (int8 GEMM)");
        for (cudaEvent_t * e : {&n->start, &n->end, &n->widened[0], &n->widened[1], &n->done[0], &n->done[1]}) {
            cuda_check(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "cudaEventCreate (int8 GEMM)");
        }
        s = n;
    }
    return s;
}

void widen_block(const void * w, I8Weights fmt, const uint8_t * gscale, int ng, int64_t group, int64_t k, int64_t n0,
                 int64_t nc, int8_t * w8, cudaStream_t st) {
    const int64_t pieces = nc * (k / 32);
    widen_int4_kernel<<<(unsigned) ((pieces + 255) / 256), 256, 0, st>>>(
        (const uint8_t *) w + (size_t) n0 * (k / 2), fmt == I8Weights::I4G ? gscale + (size_t) n0 * ng : nullptr, ng,
        (int) group, k, pieces, w8);
    cuda_check_launch("widen_int4_kernel");
}

}  // namespace

bool cuda_cublas_i8_enabled(int32_t m) {
    return m >= min_m() && cuda_cublas_available();
}

size_t cuda_cublas_i8_work_bytes(int32_t m, int64_t n, int64_t k, I8Weights fmt) {
    const int64_t cols = block_cols(m, n, k, fmt);
    return (widened(fmt) ? 2 * round256((size_t) cols * k) : 0) + round256((size_t) cols * m * sizeof(int32_t));
}

bool cuda_gemm_i8_cublas(const void * w, I8Weights fmt, const uint8_t * gscale, int64_t group, int64_t n, int64_t k,
                         const int8_t * a, int32_t m, const I8Epilogue & ep, float * y, void * work, size_t work_bytes,
                         cudaStream_t st) {
    if (m <= 0 || !cuda_cublas_i8_enabled(m)) return false;
    if (k <= 0 || k % (widened(fmt) ? 64 : 16) != 0 || n <= 0 || (fmt == I8Weights::I4G && (!gscale || group <= 0 ||
                                                                                               group % 64 != 0 || k % group != 0))) {
        throw Error("CUDA int8 GEMM (cuBLAS): K = " + std::to_string(k) + " must be a positive multiple of " +
                    (widened(fmt) ? "64" : "16") + ", N = " + std::to_string(n) + " positive, w4a8g's group (" +
                    std::to_string(group) + ") a multiple of 64 dividing K");
    }
    if (ep.lo.rank > CUBLAS_I8_MAX_RANK || (ep.lo.rank > 0 && (!ep.lo.b || !ep.lo.l || ep.add))) {
        throw Error("CUDA int8 GEMM (cuBLAS): the low-rank epilogue takes rank <= " + std::to_string(CUBLAS_I8_MAX_RANK) +
                    " with lora_b and l and no other add (rank " + std::to_string(ep.lo.rank) + ")");
    }
    if (work_bytes < cuda_cublas_i8_work_bytes(m, n, k, fmt)) {
        throw Error("CUDA int8 GEMM (cuBLAS): a work buffer of " + std::to_string(work_bytes) + " bytes, " +
                    std::to_string(cuda_cublas_i8_work_bytes(m, n, k, fmt)) + " needed");
    }
    const size_t smem = (size_t) ep.lo.rank * (EPI_COLS + LORA_ROWS) * sizeof(double);
    static std::atomic<uint64_t> smem_set{0};
    cuda_once_per_device(smem_set, [] {
        cuda_check(cudaFuncSetAttribute(i8_epilogue_lora_any_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int) (CUBLAS_I8_MAX_RANK * (EPI_COLS + LORA_ROWS) * sizeof(double))),
                   "cudaFuncSetAttribute(i8_epilogue_lora_any_kernel)");
    });
    const int64_t cols = block_cols(m, n, k, fmt), wbytes = widened(fmt) ? (int64_t) round256((size_t) cols * k) : 0;
    int8_t * w8[2] = {(int8_t *) work, (int8_t *) work + wbytes};
    int32_t * sums = (int32_t *) ((uint8_t *) work + 2 * wbytes);
    const int ng = fmt == I8Weights::I4G ? (int) (k / group) : 0;
    // the widening on the side stream, except inside a graph capture (then all on st)
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    cuda_check(cudaStreamIsCapturing(st, &cap), "cudaStreamIsCapturing");
    Side * side = widened(fmt) && cap == cudaStreamCaptureStatusNone ? side_for_stream(st) : nullptr;
    if (side) {  // the side stream starts after st's work so far (the buffers may still be read by the last GEMM)
        cuda_check(cudaEventRecord(side->start, st), "cudaEventRecord");
        cuda_check(cudaStreamWaitEvent(side->stream, side->start, 0), "cudaStreamWaitEvent");
        widen_block(w, fmt, gscale, ng, group, k, 0, std::min(cols, n), w8[0], side->stream);
        cuda_check(cudaEventRecord(side->widened[0], side->stream), "cudaEventRecord");
    }
    // st waits for the side stream's last widening before it goes on (the caller may reuse the work buffer)
    auto join = [&] {
        if (!side) return;
        cuda_check(cudaEventRecord(side->end, side->stream), "cudaEventRecord");
        cuda_check(cudaStreamWaitEvent(st, side->end, 0), "cudaStreamWaitEvent");
    };
    int64_t b = 0;  // the block's index
    for (int64_t n0 = 0; n0 < n; n0 += cols, b++) {
        const int64_t nc = std::min(cols, n - n0);
        const int8_t * wb;
        if (side) {
            const int64_t n1 = n0 + cols;
            if (n1 < n) {  // the next block, into the other buffer once the GEMM before this one has read it
                if (b >= 1) cuda_check(cudaStreamWaitEvent(side->stream, side->done[(b + 1) % 2], 0), "cudaStreamWaitEvent");
                widen_block(w, fmt, gscale, ng, group, k, n1, std::min(cols, n - n1), w8[(b + 1) % 2], side->stream);
                cuda_check(cudaEventRecord(side->widened[(b + 1) % 2], side->stream), "cudaEventRecord");
            }
            cuda_check(cudaStreamWaitEvent(st, side->widened[b % 2], 0), "cudaStreamWaitEvent");
            wb = w8[b % 2];
        } else if (widened(fmt)) {
            widen_block(w, fmt, gscale, ng, group, k, n0, nc, w8[0], st);
            wb = w8[0];
        } else {
            wb = (const int8_t *) w + (size_t) n0 * k;
        }
        const int err = cuda_cublas_gemm_i8(wb, nc, k, a, m, sums, nc, st);
        if (err != 0) {
            join();
            if (n0 == 0) return false;  // cuBLAS declines the shape: the caller's GEMM runs (nothing written yet)
            throw Error("CUDA int8 GEMM: cublasGemmEx failed with status " + std::to_string(err) + " at column " +
                        std::to_string(n0));
        }
        const unsigned gx = (unsigned) ((nc + EPI_COLS - 1) / EPI_COLS);
        if (ep.lo.rank > 0) {
            const int acc = ep.accumulate ? 1 : 0;
            auto one_column = [&](auto kernel, int rows) {
                kernel<<<dim3(gx, (unsigned) ((m + rows - 1) / rows)), EPI_COLS, 0, st>>>(
                    sums, (int) nc, (int) n0, m, (int) n, ep.scale, ep.row_scale, ep.bias, ep.lo, acc, y);
                cuda_check_launch("i8_epilogue_lora_kernel");
            };
            if (ep.lo.rank == 16 && !lora_any()) {
                one_column(i8_epilogue_lora_kernel<16, 32>, 32);
            } else if (ep.lo.rank == 32 && !lora_any()) {
                one_column(i8_epilogue_lora_kernel<32, 16>, 16);
            } else if (ep.lo.rank == 8 && !lora_any()) {
                one_column(i8_epilogue_lora_kernel<8, 32>, 32);
            } else {
                i8_epilogue_lora_any_kernel<<<dim3(gx, (unsigned) ((m + LORA_ROWS - 1) / LORA_ROWS)), 256, smem, st>>>(
                    sums, (int) nc, (int) n0, m, (int) n, ep.scale, ep.row_scale, ep.bias, ep.lo, acc, y);
                cuda_check_launch("i8_epilogue_lora_any_kernel");
            }
        } else {
            i8_epilogue_kernel<<<dim3(gx, (unsigned) ((m + EPI_ROWS - 1) / EPI_ROWS)), 256, 0, st>>>(
                sums, (int) nc, (int) n0, m, (int) n, ep.scale, ep.add, ep.row_scale, ep.bias, ep.accumulate ? 1 : 0, y);
            cuda_check_launch("i8_epilogue_kernel");
        }
        if (side) cuda_check(cudaEventRecord(side->done[b % 2], st), "cudaEventRecord");  // block b's buffer is free
    }
    join();
    return true;
}

}  // namespace mq
