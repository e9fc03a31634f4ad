// Host-side dtype dispatch of the CUDA entry points: calls f(T{}) with T the storage type of a
// CUDA array (float, __half, __nv_bfloat16), or fails naming the op and the argument.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/errors.h"
#include "common/ndarray.h"

namespace effops::cuda {

inline const nb::dlpack::dtype kF32 = nb::dtype<float>();
inline const nb::dlpack::dtype kF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
inline const nb::dlpack::dtype kBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};

template <class Array, class F>
void dispatch_float(const Array& x, const char* op, const char* what, F&& f) {
  if (x.dtype() == kF32) return f(float{});
  if (x.dtype() == kF16) return f(__half{});
  if (x.dtype() == kBF16) return f(__nv_bfloat16{});
  fail(op, ": ", what, " must be float32, float16 or bfloat16 on CUDA, got ", dtype_name(x.dtype()));
}

}  // namespace effops::cuda
