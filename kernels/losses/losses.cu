// CUDA kernels of the detection losses (formulas: python/effops/ops/_losses_ref.py).
//
// Focal loss: a grid-stride loop over the N x C logits, one element per thread step; class
// targets are compared with the element's class on the fly (no one-hot in memory); every block
// writes the sum of its elements (a fixed set, a fixed tree: deterministic) to partial[block].
// A class >= C makes the row's loss NaN (no host synchronisation to raise an error).
// Anchor matching: one thread per anchor and image. Pass 1 computes the IoU with every valid gt
// with effdet's float32 operation order (explicit _rn intrinsics: no FMA contraction), keeps
// the anchor's best gt (strict >: the first wins ties) and raises each gt's best-anchor key
// (IoU bits << 32 | ~anchor: the larger IoU, then the lower anchor) with a warp reduction and
// one atomicMax per warp - order independent, so deterministic. Pass 2 applies the force
// matches (the lowest gt whose key names the anchor), thresholds, labels and box encoding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/cuda_check.h"
#include "common/float_math.cuh"
#include "losses/losses.cuh"

namespace effops::cuda::losses {
namespace {

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x == 0)
    for (int i = 0; i < kThreads / 32; ++i) s += warp_sums[i];
  return s;
}

template <class T>
__global__ void focal_kernel(FocalArgs a) {
  const int64_t n = a.N * a.C;
  const T* x = static_cast<const T*>(a.x);
  T* grad = static_cast<T*>(a.grad);
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / a.C, c = i - row * a.C;
    float t, w = 1.f;
    if (a.cls) {
      const int64_t k = a.cls[row];
      t = k == c ? 1.f : 0.f;
      w = k == -2 ? 0.f : (k >= a.C ? __int_as_float(0x7fc00000) : 1.f);
    } else {
      t = a.dense[i];
    }
    if (a.ignore_mode == 1 && a.ignore[row]) w = 0.f;
    if (a.ignore_mode == 2 && a.ignore[i]) w = 0.f;
    const float v = to_f(x[i]);
    const float e = expf(-fabsf(v));
    const float s = 1.f / (1.f + e), es = e * s;
    const bool pos = v >= 0.f;
    const float p = pos ? s : es, om = pos ? es : s;
    const float l1p = log1pf(e);
    const float spp = (pos ? v : 0.f) + l1p, spn = (pos ? 0.f : -v) + l1p;
    const float ts = t * a.ls_scale + a.ls_add;
    const float ce = spp - v * ts;
    float q, r, lq;
    if (t == 1.f) {
      q = om, r = p, lq = -spp;
    } else if (t == 0.f) {
      q = p, r = om, lq = -spn;
    } else {
      q = t * om + (1.f - t) * p;
      r = q > 0.f ? p * om / q : 0.f;
      lq = logf(fmaxf(q, 1.17549435e-38f));
    }
    const float mod = a.gamma == 0.f ? 1.f : (a.gamma == 1.f ? q : (a.gamma == 2.f ? q * q : expf(a.gamma * lq)));
    const float wa = w * (t * a.alpha1 + (1.f - t) * a.alpha0);
    const float loss = wa * mod * ce;
    float g = mod * (p - ts);
    if (a.gamma != 0.f) g += a.gamma * mod * (1.f - 2.f * t) * r * ce;
    if (a.loss) a.loss[i] = loss;
    else acc += loss;
    if (grad) grad[i] = from_f<T>(wa * g);
  }
  if (a.partial) {
    const float s = block_sum(acc);
    if (threadIdx.x == 0) a.partial[blockIdx.x] = s;
  }
}

__device__ __forceinline__ float dmax(float a, float b) { return a > b ? 1.f : (a == b ? 0.5f : 0.f); }

__global__ void box_kernel(const float* pred, const float* target, const float* mask, bool mask4, int64_t N, int kind,
                           float delta, float* loss, float* partial, float* grad) {
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    const float* p = pred + 4 * i;
    const float* g = target + 4 * i;
    if (kind == 2) {
      const float eps = 1e-7f, m = mask[i];
      const float x1 = p[0], y1 = p[1], x2 = p[2], y2 = p[3], gx1 = g[0], gy1 = g[1], gx2 = g[2], gy2 = g[3];
      const float iw = fminf(x2, gx2) - fmaxf(x1, gx1), ih = fminf(y2, gy2) - fmaxf(y1, gy1);
      const bool over = iw > 0.f && ih > 0.f;
      const float inter = over ? iw * ih : 0.f;
      const float pw = x2 - x1, ph = y2 - y1;
      const float uni = pw * ph + (gx2 - gx1) * (gy2 - gy1) - inter;
      const float cw = fmaxf(x2, gx2) - fminf(x1, gx1), ch = fmaxf(y2, gy2) - fminf(y1, gy1);
      const float area_c = cw * ch;
      const float l = (1.f - (inter / (uni + eps) - (area_c - uni) / (area_c + eps))) * m;
      if (loss) loss[i] = l;
      else acc += l;
      if (grad) {
        const float ue = uni + eps, ce = area_c + eps;
        const float gi = over ? -1.f / ue - inter / (ue * ue) + 1.f / ce : 0.f;
        const float ga = inter / (ue * ue) - 1.f / ce, gc = ue / (ce * ce);
        float* d = grad + 4 * i;
        d[0] = (-gi * ih * dmax(x1, gx1) - ga * ph - gc * ch * dmax(-x1, -gx1)) * m;
        d[1] = (-gi * iw * dmax(y1, gy1) - ga * pw - gc * cw * dmax(-y1, -gy1)) * m;
        d[2] = (gi * ih * dmax(-x2, -gx2) + ga * ph + gc * ch * dmax(x2, gx2)) * m;
        d[3] = (gi * iw * dmax(-y2, -gy2) + ga * pw + gc * cw * dmax(y2, gy2)) * m;
      }
    } else {
      for (int c = 0; c < 4; ++c) {
        const float m = mask4 ? mask[4 * i + c] : mask[i];
        const float e = p[c] - g[c], ae = fabsf(e);
        float l, d;
        if (kind == 0) {
          const float q = fminf(ae, delta);
          l = 0.5f * q * q + delta * (ae - q);
          d = fminf(fmaxf(e, -delta), delta);
        } else {
          l = ae;
          d = e > 0.f ? 1.f : (e < 0.f ? -1.f : 0.f);
        }
        if (loss) loss[4 * i + c] = l * m;
        else acc += l * m;
        if (grad) grad[4 * i + c] = d * m;
      }
    }
  }
  if (partial) {
    const float s = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
  }
}

// effdet's IoU (gt g, anchor a; y1 x1 y2 x2), float32 without contraction.
__device__ __forceinline__ float iou_effdet(const float* g, float ga, float ay1, float ax1, float ay2, float ax2,
                                            float aa) {
  float ih = __fsub_rn(fminf(g[2], ay2), fmaxf(g[0], ay1));
  float iw = __fsub_rn(fminf(g[3], ax2), fmaxf(g[1], ax1));
  ih = ih < 0.f ? 0.f : ih;
  iw = iw < 0.f ? 0.f : iw;
  const float inter = __fmul_rn(ih, iw);
  const float uni = __fsub_rn(__fadd_rn(ga, aa), inter);
  return inter == 0.f ? 0.f : __fdiv_rn(inter, uni);
}

constexpr int kGtTile = 128;

__global__ void match_pass1(const float* anchors, int64_t A, const float* gt, const uint8_t* valid, int64_t G,
                            unsigned long long* keys, int64_t* arg_out, float* best_out) {
  __shared__ float sg[kGtTile][5];
  __shared__ int sv[kGtTile];
  const int64_t b = blockIdx.y;
  const int64_t a = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const bool live = a < A;
  float ay1 = 0.f, ax1 = 0.f, ay2 = 0.f, ax2 = 0.f, aa = 0.f;
  if (live) {
    const float* p = anchors + 4 * a;
    ay1 = p[0], ax1 = p[1], ay2 = p[2], ax2 = p[3];
    aa = __fmul_rn(__fsub_rn(ay2, ay1), __fsub_rn(ax2, ax1));
  }
  float best = -1.f;
  int64_t arg = -1;
  for (int64_t t0 = 0; t0 < G; t0 += kGtTile) {
    const int nt = static_cast<int>(G - t0 < kGtTile ? G - t0 : kGtTile);
    __syncthreads();
    for (int j = threadIdx.x; j < nt; j += blockDim.x) {
      const float* q = gt + 4 * (b * G + t0 + j);
      sg[j][0] = q[0], sg[j][1] = q[1], sg[j][2] = q[2], sg[j][3] = q[3];
      sg[j][4] = __fmul_rn(__fsub_rn(q[2], q[0]), __fsub_rn(q[3], q[1]));
      sv[j] = valid[b * G + t0 + j];
    }
    __syncthreads();
    for (int j = 0; j < nt; ++j) {
      if (!sv[j]) continue;  // uniform across the block
      const float v = live ? iou_effdet(sg[j], sg[j][4], ay1, ax1, ay2, ax2, aa) : -1.f;
      if (live && v > best) best = v, arg = t0 + j;
      unsigned long long key =
          live ? (static_cast<unsigned long long>(__float_as_uint(v)) << 32) | (0xffffffffull - static_cast<uint32_t>(a))
               : 0ull;
      for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, key, o);
        key = other > key ? other : key;
      }
      if ((threadIdx.x & 31) == 0 && key) atomicMax(keys + b * G + t0 + j, key);
    }
  }
  if (live) arg_out[b * A + a] = arg, best_out[4 * (b * A + a)] = best;
}

__global__ void match_pass2(const float* anchors, int64_t A, const float* gt, const int64_t* labels,
                            const uint8_t* valid, int64_t G, float mt, float ut, int64_t ignored_class,
                            const unsigned long long* keys, int64_t* cls, float* box, float* npos) {
  const int64_t b = blockIdx.y;
  const int64_t a = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (a >= A) return;
  const int64_t i = b * A + a;
  const int64_t arg = cls[i];
  const float best = box[4 * i];
  int64_t m = -1;
  if (arg >= 0) {
    m = best < ut ? -1 : (best < mt ? -2 : arg);
    for (int64_t j = 0; j < G; ++j) {
      const unsigned long long k = keys[b * G + j];
      if (valid[b * G + j] && k && 0xffffffffull - (k & 0xffffffffull) == static_cast<unsigned long long>(a)) {
        m = j;
        break;
      }
    }
  }
  float* o = box + 4 * i;
  if (m >= 0) {
    cls[i] = labels[b * G + m];
    const float* g = gt + 4 * (b * G + m);
    const float* an = anchors + 4 * a;
    const float eps = 1e-7f;
    float wa = __fsub_rn(an[3], an[1]), ha = __fsub_rn(an[2], an[0]);
    const float yca = __fadd_rn(an[0], __fdiv_rn(ha, 2.f)), xca = __fadd_rn(an[1], __fdiv_rn(wa, 2.f));
    float w = __fsub_rn(g[3], g[1]), h = __fsub_rn(g[2], g[0]);
    const float yc = __fadd_rn(g[0], __fdiv_rn(h, 2.f)), xc = __fadd_rn(g[1], __fdiv_rn(w, 2.f));
    ha = __fadd_rn(ha, eps), wa = __fadd_rn(wa, eps), h = __fadd_rn(h, eps), w = __fadd_rn(w, eps);
    o[0] = __fdiv_rn(__fsub_rn(yc, yca), ha);
    o[1] = __fdiv_rn(__fsub_rn(xc, xca), wa);
    o[2] = logf(__fdiv_rn(h, ha));
    o[3] = logf(__fdiv_rn(w, wa));
    atomicAdd(npos + b, 1.f);  // integer counts below 2^24: exact in any order
  } else {
    cls[i] = m == -2 ? ignored_class : -1;
    o[0] = o[1] = o[2] = o[3] = 0.f;
  }
}

int blocks_for(int64_t n) { return static_cast<int>(std::max<int64_t>(1, std::min(kMaxBlocks, (n + kThreads - 1) / kThreads))); }

}  // namespace

int64_t focal_blocks(int64_t n) { return blocks_for(n); }
int64_t box_blocks(int64_t n) { return blocks_for(n); }
int64_t match_blocks(int64_t A) { return (A + kThreads - 1) / kThreads; }

template <class T>
void focal_forward(const FocalArgs& a, cudaStream_t stream) {
  focal_kernel<T><<<blocks_for(a.N * a.C), kThreads, 0, stream>>>(a);
  check_launch("focal_loss");
}
template void focal_forward<float>(const FocalArgs&, cudaStream_t);
template void focal_forward<__half>(const FocalArgs&, cudaStream_t);
template void focal_forward<__nv_bfloat16>(const FocalArgs&, cudaStream_t);

void box_forward(const float* pred, const float* target, const float* mask, bool mask4, int64_t N, int kind,
                 float delta, float* loss, float* partial, float* grad, cudaStream_t stream) {
  box_kernel<<<blocks_for(N), kThreads, 0, stream>>>(pred, target, mask, mask4, N, kind, delta, loss, partial, grad);
  check_launch("box_loss");
}

void match_anchors(const float* anchors, int64_t A, const float* gt, const int64_t* labels, const uint8_t* valid,
                   int64_t B, int64_t G, float match_thr, float unmatched_thr, int64_t ignored_class,
                   unsigned long long* keys, int64_t* cls, float* box, float* npos, cudaStream_t stream) {
  if (A == 0 || B == 0) return;
  const dim3 grid(static_cast<unsigned>(match_blocks(A)), static_cast<unsigned>(B));
  match_pass1<<<grid, kThreads, 0, stream>>>(anchors, A, gt, valid, G, keys, cls, box);
  check_launch("match_anchors (pass 1)");
  match_pass2<<<grid, kThreads, 0, stream>>>(anchors, A, gt, labels, valid, G, match_thr, unmatched_thr,
                                             ignored_class, keys, cls, box, npos);
  check_launch("match_anchors (pass 2)");
}

}  // namespace effops::cuda::losses
