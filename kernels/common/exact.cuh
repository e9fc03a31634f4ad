// Device-side helpers shared by the CUDA kernels (include from .cu files only).
#pragma once
#include <cuda_runtime.h>

namespace effops::cuda {

// Exactly rounded arithmetic: kernels that must agree bit for bit with the CPU kernels (NMS IoU)
// use these, so nvcc cannot contract a*b+c into one fma or use approximate division.
template <class T>
struct Exact;
template <>
struct Exact<float> {
  static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
  static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
};
template <>
struct Exact<double> {
  static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
  static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
  static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
};

}  // namespace effops::cuda
