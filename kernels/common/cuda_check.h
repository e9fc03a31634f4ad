// CUDA error handling shared by the CUDA kernels: every runtime call and every launch is
// checked, and a failure becomes std::runtime_error (RuntimeError in Python) naming the op.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace effops::cuda {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": CUDA error " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}

// After a launch: configuration errors are reported here; asynchronous faults surface at the
// next synchronising call, as usual in CUDA.
inline void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

}  // namespace effops::cuda
