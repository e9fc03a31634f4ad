// Errors raised by effops kernels. std::invalid_argument becomes ValueError in Python,
// std::runtime_error becomes RuntimeError (nanobind's standard translation).
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace effops {

template <class... Args>
[[noreturn]] inline void fail(const Args&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

template <class... Args>
inline void check(bool ok, const Args&... parts) {
  if (!ok) fail(parts...);
}

// The largest size, stride, padding or dilation an entry point accepts (Python bounds them to
// the same value): with every such operand below 2^31, the kernels' index expressions (products
// of two of them plus a few more) stay far inside int64.
constexpr int64_t kMaxSize = (int64_t{1} << 31) - 1;

// a + b and a * b, or a ValueError naming `what` when the exact result does not fit int64.
inline int64_t checked_add(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) fail(op, ": ", what, " overflows int64");
  return r;
}
inline int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) fail(op, ": ", what, " overflows int64");
  return r;
}

}  // namespace effops
