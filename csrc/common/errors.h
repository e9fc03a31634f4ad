// Errors raised by effops kernels. std::invalid_argument becomes ValueError in Python,
// std::runtime_error becomes RuntimeError (nanobind's standard translation).
#pragma once
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

}  // namespace effops
