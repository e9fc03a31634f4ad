// Array-level entry points of training-mode BatchNorm + activation over NHWC rows (checked
// shapes / dtypes, dispatch). x is [M, C]: the rows of a channels_last tensor, M = N * H * W.
#pragma once
#include <optional>

#include "common/ndarray.h"

namespace effops::norm {

using Opt = std::optional<CpuArray>;

// Batch statistics of x (mean, biased var, invstd = 1 / sqrt(var + eps), per channel) and
// y = act((x - mean) * invstd * weight + bias); pooled (optional, [images, C]): the mean of y
// over each image's rows (x holds `images` images of M / images rows each).
void bn_act_forward_api(const CpuArray& x, int64_t images, const Opt& weight, const Opt& bias, double eps, int act,
                        const CpuArray& y, const CpuArray& mean, const CpuArray& invstd, const CpuArray& var,
                        const Opt& pooled, int threads);
// Gradients of the forward above given dL/dy (and dL/dpooled when given): grad_x, grad_weight,
// grad_bias (per channel).
void bn_act_backward_api(const CpuArray& grad, const CpuArray& x, int64_t images, const Opt& weight, const Opt& bias,
                         const CpuArray& mean, const CpuArray& invstd, const Opt& grad_pooled, int act,
                         const CpuArray& grad_x, const CpuArray& grad_weight, const CpuArray& grad_bias, int threads);

}  // namespace effops::norm
