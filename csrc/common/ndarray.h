// DLPack arrays as they cross from Python (nanobind). Inputs must already have the dtype and
// layout a kernel needs (the Python layer makes any copy explicitly); outputs are allocated by
// torch in Python and bound with .noconvert(), so a mismatch is an error, never a silent copy.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>

#include "common/errors.h"

namespace effops {
namespace nb = nanobind;

using CpuArray = nb::ndarray<nb::c_contig, nb::device::cpu>;

inline std::string dtype_name(const nb::dlpack::dtype& d) {
  const char* kind = d.code == uint8_t(nb::dlpack::dtype_code::Float)  ? "float"
                     : d.code == uint8_t(nb::dlpack::dtype_code::Int)  ? "int"
                     : d.code == uint8_t(nb::dlpack::dtype_code::UInt) ? "uint"
                     : d.code == uint8_t(nb::dlpack::dtype_code::Bfloat) ? "bfloat"
                                                                         : "other";
  return std::string(kind) + std::to_string(d.bits);
}

template <class T, class A>
T* data_of(const A& a) {
  return static_cast<T*>(a.data());
}

template <class A>
void check_dtype(const A& a, nb::dlpack::dtype want, const char* op, const char* name) {
  check(a.dtype() == want, op, ": ", name, " must be ", dtype_name(want), ", got ",
        dtype_name(a.dtype()));
}

template <class A>
void check_shape(const A& a, std::initializer_list<int64_t> shape, const char* op,
                 const char* name) {
  bool ok = a.ndim() == shape.size();
  size_t d = 0;
  for (int64_t s : shape) {
    if (!ok) break;
    ok = s < 0 || static_cast<int64_t>(a.shape(d)) == s;
    ++d;
  }
  if (ok) return;
  std::string want = "[", got = "[";
  d = 0;
  for (int64_t s : shape) want += (d++ ? ", " : "") + (s < 0 ? std::string("*") : std::to_string(s));
  for (size_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
  fail(op, ": ", name, " must have shape ", want, "], got ", got, "]");
}

// Calls f(float{}) or f(double{}) by the array's dtype.
template <class A, class F>
decltype(auto) dispatch_float(const A& a, const char* op, const char* name, F&& f) {
  if (a.dtype() == nb::dtype<float>()) return f(float{});
  if (a.dtype() == nb::dtype<double>()) return f(double{});
  fail(op, ": ", name, " must be float32 or float64 here (the Python layer widens fp16/bf16), got ",
       dtype_name(a.dtype()));
}

}  // namespace effops
