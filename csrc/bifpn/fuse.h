// CPU kernels of the BiFPN weighted fusion (NHWC; semantics in python/effops/ops/bifpn.py).
#pragma once
#include <cstdint>
#include <vector>

#include "dwsep/simd.h"

namespace effops::bifpn {

enum Mode : int { kIdentity = 0, kNearest = 1, kMaxPool = 2, kMaxPoolSym = 3 };

template <class T>
struct Input {
  const T* x;  // [N, H, W, C]
  int64_t H, W;
  int mode;
  double w;  // normalised weight
};

// out[n, oh, ow, c] = act(sum_i w_i R_i(x_i)[n, oh, ow, c]), out [N, Ho, Wo, C].
template <class T>
void fuse_forward(const std::vector<Input<T>>& in, int64_t N, int64_t C, int64_t Ho, int64_t Wo,
                  int act, T* out, int threads);

// Given g = dL/dout (F = float or double, [N, Ho, Wo, C]): grads[i] = dL/dx_i ([N, H_i, W_i, C],
// F) and gw[i] = dL/dw_i.
template <class T, class F>
void fuse_backward(const F* g, const std::vector<Input<T>>& in, int64_t N, int64_t C, int64_t Ho,
                   int64_t Wo, int act, const std::vector<F*>& grads, double* gw, int threads);

}  // namespace effops::bifpn
