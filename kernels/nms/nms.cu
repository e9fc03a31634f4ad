// CUDA kernels of the NMS family.
//
// nms_keep (exact greedy NMS over class segments):
//   mask_kernel   one block of 64 threads per (row tile, column tile, image) in the upper
//                 triangle: thread r writes the 64-bit word of row i = 64 * row_tile + r whose
//                 bit k says box j = 64 * col_tile + k is in i's segment, after i, and has
//                 IoU(i, j) > thr. Tiles beyond every row's segment are skipped (never read).
//   reduce_kernel one block per image walks the row tiles in order. The 64 rows of a tile are
//                 decided by one thread from the diagonal words (a row is kept unless a kept row
//                 before it, in this or an earlier tile, set its bit); then all threads OR the
//                 kept rows' words into the removed bitset of the later words of the segment.
//   IoU arithmetic is exactly rounded (no fma contraction, IEEE division), so decisions equal
//   the CPU kernel's bit for bit.
// soft_nms: one block; each step is a block-wide argmax and a parallel decay (sequential by
//   nature: every selection depends on all earlier decays).
// matrix_decay: two all-pairs passes (cmax, then decay), tiled through shared memory.
#include <cfloat>
#include <cmath>

#include "common/cuda_check.h"
#include "common/exact.cuh"
#include "nms/nms.cuh"

namespace effops::cuda::nms {
namespace {

__host__ __device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }

template <class T>
__device__ __forceinline__ T area(T x1, T y1, T x2, T y2) {
  using E = Exact<T>;
  return E::mul(E::sub(x2, x1), E::sub(y2, y1));
}

// Same operations and order as the CPU kernel (and torchvision's CPU kernel).
template <class T>
__device__ __forceinline__ T iou(T ax1, T ay1, T ax2, T ay2, T aa, T bx1, T by1, T bx2, T by2,
                                 T ba) {
  using E = Exact<T>;
  T xx1 = ax1 < bx1 ? bx1 : ax1;
  T yy1 = ay1 < by1 ? by1 : ay1;
  T xx2 = bx2 < ax2 ? bx2 : ax2;
  T yy2 = by2 < ay2 ? by2 : ay2;
  T w = E::sub(xx2, xx1);
  T h = E::sub(yy2, yy1);
  w = T(0) < w ? w : T(0);
  h = T(0) < h ? h : T(0);
  T inter = E::mul(w, h);
  return E::div(inter, E::sub(E::add(aa, ba), inter));
}

template <class T>
__global__ void __launch_bounds__(64)
    mask_kernel(const T* __restrict__ boxes, const int32_t* __restrict__ seg_end,
                const int32_t* __restrict__ counts, T thr, uint64_t* __restrict__ mask, int64_t K,
                int64_t W) {
  const int64_t ct = blockIdx.x, rt = blockIdx.y, b = blockIdx.z;
  if (ct < rt) return;
  const int64_t r0 = rt * 64, c0 = ct * 64;
  const int32_t* se = seg_end + b * K;
  if (c0 >= se[lmin(r0 + 63, K - 1)]) return;
  const T* bx = boxes + b * K * 4;
  __shared__ T cb[64][5];
  const int tid = threadIdx.x;
  if (c0 + tid < K) {
    const T* r = bx + (c0 + tid) * 4;
    cb[tid][0] = r[0], cb[tid][1] = r[1], cb[tid][2] = r[2], cb[tid][3] = r[3];
    cb[tid][4] = area(r[0], r[1], r[2], r[3]);
  }
  __syncthreads();
  const int64_t i = r0 + tid;
  if (i >= K) return;
  const T* r = bx + i * 4;
  const T x1 = r[0], y1 = r[1], x2 = r[2], y2 = r[3], a = area(x1, y1, x2, y2);
  const int64_t hi = lmin(lmin(se[i], counts[b]), c0 + 64);
  uint64_t word = 0;
  for (int64_t j = lmax(i + 1, c0); j < hi; ++j) {
    const int k = static_cast<int>(j - c0);
    if (iou(x1, y1, x2, y2, a, cb[k][0], cb[k][1], cb[k][2], cb[k][3], cb[k][4]) > thr)
      word |= 1ull << k;
  }
  mask[(b * K + i) * W + ct] = word;
}

__global__ void reduce_kernel(const uint64_t* __restrict__ mask,
                              const int32_t* __restrict__ seg_end,
                              const int32_t* __restrict__ counts, uint64_t* __restrict__ removed,
                              uint8_t* __restrict__ keep, int64_t K, int64_t W) {
  const int64_t b = blockIdx.x;
  const int64_t count = counts[b];
  const uint64_t* m = mask + b * K * W;
  const int32_t* se = seg_end + b * K;
  uint64_t* rem = removed + b * W;
  uint8_t* kp = keep + b * K;
  __shared__ uint64_t diag[64];
  __shared__ uint64_t kept_bits;
  const int64_t tiles = (count + 63) / 64;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * 64;
    if (threadIdx.x < 64) {
      const int64_t i = r0 + threadIdx.x;
      diag[threadIdx.x] = i < count ? m[i * W + t] : 0ull;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t cur = rem[t], kb = 0;
      const int rows = static_cast<int>(lmin(64, count - r0));
      for (int k = 0; k < rows; ++k)
        if (!((cur >> k) & 1ull)) {
          kb |= 1ull << k;
          cur |= diag[k];
        }
      kept_bits = kb;
    }
    __syncthreads();
    const uint64_t kb = kept_bits;
    if (threadIdx.x < 64 && r0 + threadIdx.x < K)
      kp[r0 + threadIdx.x] = (r0 + threadIdx.x < count) && ((kb >> threadIdx.x) & 1ull);
    const int64_t wend = (static_cast<int64_t>(se[lmin(r0 + 63, count - 1)]) - 1) / 64;
    for (int64_t w = t + 1 + threadIdx.x; w <= wend; w += blockDim.x) {
      uint64_t acc = 0, bits = kb;
      while (bits) {
        const int k = __ffsll(static_cast<long long>(bits)) - 1;
        bits &= bits - 1;
        acc |= m[(r0 + k) * W + w];
      }
      rem[w] |= acc;
    }
    __syncthreads();  // the next tile reads removed[] and reuses diag / kept_bits
  }
  for (int64_t i = tiles * 64 + threadIdx.x; i < K; i += blockDim.x) kp[i] = 0;
}

// ------------------------------------------------------------------ soft-NMS
// Dead boxes hold NaN in work[] (NaN scores are rejected before the call).
template <class T>
__global__ void __launch_bounds__(1024)
    soft_kernel(const T* __restrict__ boxes, int64_t n, T thr, double sigma, int method,
                double score_thr, int64_t* __restrict__ keep, T* __restrict__ out,
                T* __restrict__ work, int64_t* __restrict__ count) {
  __shared__ T best_s[32];
  __shared__ int64_t best_i[32];
  __shared__ int64_t sel;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  int64_t k = 0;
  while (true) {
    // argmax: highest score, ties by lower index
    T bs = T(0);
    int64_t bi = -1;
    for (int64_t i = tid; i < n; i += blockDim.x) {
      const T v = work[i];
      if (v == v && (bi < 0 || v > bs)) bs = v, bi = i;  // i increases: keeps the lowest index
    }
    for (int off = 16; off > 0; off >>= 1) {
      const T os = __shfl_down_sync(0xffffffffu, bs, off);
      const int64_t oi = __shfl_down_sync(0xffffffffu, bi, off);
      if (oi >= 0 && (bi < 0 || os > bs || (os == bs && oi < bi))) bs = os, bi = oi;
    }
    if (lane == 0) best_s[warp] = bs, best_i[warp] = bi;
    __syncthreads();
    if (tid == 0) {
      T s = T(0);
      int64_t i = -1;
      for (int w = 0; w < nwarps; ++w) {
        const int64_t oi = best_i[w];
        const T os = best_s[w];
        if (oi >= 0 && (i < 0 || os > s || (os == s && oi < i))) s = os, i = oi;
      }
      if (i >= 0 && static_cast<double>(s) < score_thr) i = -1;
      if (i >= 0) {
        keep[k] = i;
        out[k] = s;
        work[i] = NAN;
      }
      sel = i;
    }
    __syncthreads();
    const int64_t i = sel;
    if (i < 0) break;
    ++k;
    const T* r = boxes + i * 4;
    const T x1 = r[0], y1 = r[1], x2 = r[2], y2 = r[3], a = area(x1, y1, x2, y2);
    for (int64_t q = tid; q < n; q += blockDim.x) {
      const T cur = work[q];
      if (cur != cur) continue;
      const T* o = boxes + q * 4;
      const T v = iou(x1, y1, x2, y2, a, o[0], o[1], o[2], o[3], area(o[0], o[1], o[2], o[3]));
      double w;
      if (method == 0) {
        if (!(v > thr)) continue;
        w = 1.0 - static_cast<double>(v);
      } else {
        if (!(v > T(0))) continue;
        w = exp(-(static_cast<double>(v) * v) / sigma);
      }
      const T nv = static_cast<T>(static_cast<double>(cur) * w);
      work[q] = static_cast<double>(nv) < score_thr ? T(NAN) : nv;
    }
    __syncthreads();
  }
  if (tid == 0) count[0] = k;
}

template <class T>
__global__ void init_work(const T* __restrict__ scores, int64_t n, double score_thr,
                          T* __restrict__ work) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) work[i] = static_cast<double>(scores[i]) < score_thr ? T(NAN) : scores[i];
}

// ------------------------------------------------------------------ Matrix NMS
constexpr int kMatrixBlock = 128;

// PASS 0: out[j] = max IoU of j with a higher-scored box of its class (rows [seg_start[j], j)).
// PASS 1: out[j] = min(1, min over those rows with IoU > 0 of f(IoU) / f(cmax_row)).
template <class T, int PASS>
__global__ void __launch_bounds__(kMatrixBlock)
    matrix_kernel(const T* __restrict__ boxes, const int32_t* __restrict__ seg_start, int64_t n,
                  int kernel, double sigma, const double* __restrict__ cmax,
                  double* __restrict__ out) {
  __shared__ T rb[kMatrixBlock][5];
  __shared__ double rc[kMatrixBlock];
  __shared__ int64_t lo_s;
  const int64_t j0 = blockIdx.x * static_cast<int64_t>(kMatrixBlock);
  const int64_t j = j0 + threadIdx.x;
  const bool valid = j < n;
  T x1 = 0, y1 = 0, x2 = 0, y2 = 0, a = 0;
  int64_t s0 = n;
  if (valid) {
    const T* r = boxes + j * 4;
    x1 = r[0], y1 = r[1], x2 = r[2], y2 = r[3], a = area(x1, y1, x2, y2);
    s0 = seg_start[j];
  }
  if (threadIdx.x == 0) lo_s = seg_start[j0];  // rows sorted by class: the block's lowest start
  __syncthreads();
  const int64_t hi = lmin(j0 + kMatrixBlock, n);
  double acc = PASS == 0 ? 0.0 : 1.0;
  for (int64_t i0 = lo_s; i0 < hi; i0 += kMatrixBlock) {
    const int64_t i = i0 + threadIdx.x;
    if (i < n) {
      const T* r = boxes + i * 4;
      rb[threadIdx.x][0] = r[0], rb[threadIdx.x][1] = r[1];
      rb[threadIdx.x][2] = r[2], rb[threadIdx.x][3] = r[3];
      rb[threadIdx.x][4] = area(r[0], r[1], r[2], r[3]);
      if (PASS == 1) rc[threadIdx.x] = cmax[i];
    }
    __syncthreads();
    if (valid) {
      const int64_t from = lmax(i0, s0), to = lmin(i0 + kMatrixBlock, j);
      for (int64_t r = from; r < to; ++r) {
        const int k = static_cast<int>(r - i0);
        const T v = iou(rb[k][0], rb[k][1], rb[k][2], rb[k][3], rb[k][4], x1, y1, x2, y2, a);
        if (!(v > T(0))) continue;
        const double dv = static_cast<double>(v);
        if (PASS == 0) {
          acc = dv > acc ? dv : acc;
        } else {
          const double cm = rc[k];
          double ratio;
          if (kernel == 1) {
            ratio = exp(-sigma * (dv * dv - cm * cm));
          } else {
            const double den = 1.0 - cm;
            ratio = den > 0 ? (1.0 - dv) / den : INFINITY;
          }
          acc = ratio < acc ? ratio : acc;
        }
      }
    }
    __syncthreads();
  }
  if (valid) out[j] = acc;
}

}  // namespace

template <class T>
void nms_keep(const T* boxes, const int32_t* seg_end, const int32_t* counts, T thr,
              uint64_t* mask, uint64_t* removed, uint8_t* keep, int64_t B, int64_t K,
              cudaStream_t stream) {
  if (B == 0 || K == 0) return;
  const int64_t W = (K + 63) / 64;
  if (W > 65535) throw std::runtime_error("nms: too many boxes for the CUDA kernel (K > 4,194,240)");
  if (B > 65535) throw std::runtime_error("nms: batch too large for the CUDA kernel (B > 65535)");
  dim3 grid(static_cast<unsigned>(W), static_cast<unsigned>(W), static_cast<unsigned>(B));
  mask_kernel<T><<<grid, 64, 0, stream>>>(boxes, seg_end, counts, thr, mask, K, W);
  check_launch("nms mask kernel");
  reduce_kernel<<<static_cast<unsigned>(B), 256, 0, stream>>>(mask, seg_end, counts, removed,
                                                               keep, K, W);
  check_launch("nms reduce kernel");
}

template <class T>
void soft_nms(const T* boxes, const T* scores, int64_t n, T thr, double sigma, int method,
              double score_thr, int64_t* keep, T* out, T* work, int64_t* count,
              cudaStream_t stream) {
  if (n > 0) {
    init_work<T><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(scores, n, score_thr,
                                                                            work);
    check_launch("soft_nms init kernel");
  }
  soft_kernel<T><<<1, 1024, 0, stream>>>(boxes, n, thr, sigma, method, score_thr, keep, out,
                                         work, count);
  check_launch("soft_nms kernel");
}

template <class T>
void matrix_decay(const T* boxes, const int32_t* seg_start, int64_t n, int kernel, double sigma,
                  double* cmax, double* decay, cudaStream_t stream) {
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>((n + kMatrixBlock - 1) / kMatrixBlock);
  matrix_kernel<T, 0><<<blocks, kMatrixBlock, 0, stream>>>(boxes, seg_start, n, kernel, sigma,
                                                           nullptr, cmax);
  check_launch("matrix_nms cmax kernel");
  matrix_kernel<T, 1><<<blocks, kMatrixBlock, 0, stream>>>(boxes, seg_start, n, kernel, sigma,
                                                           cmax, decay);
  check_launch("matrix_nms decay kernel");
}

#define EFFOPS_NMS_CUDA_INSTANTIATE(T)                                                           \
  template void nms_keep<T>(const T*, const int32_t*, const int32_t*, T, uint64_t*, uint64_t*,   \
                            uint8_t*, int64_t, int64_t, cudaStream_t);                           \
  template void soft_nms<T>(const T*, const T*, int64_t, T, double, int, double, int64_t*, T*,   \
                            T*, int64_t*, cudaStream_t);                                         \
  template void matrix_decay<T>(const T*, const int32_t*, int64_t, int, double, double*, double*, \
                                cudaStream_t);
EFFOPS_NMS_CUDA_INSTANTIATE(float)
EFFOPS_NMS_CUDA_INSTANTIATE(double)

}  // namespace effops::cuda::nms
