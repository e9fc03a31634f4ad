// Width-generic float32 vector math for the loss kernels (GCC/Clang vector extensions): exp,
// log and log1p as branch-free polynomials, so a loop over W-byte vectors stays in registers
// at every ISA level (libm calls would scalarise it), and the same template with a 4-byte
// (one-lane) vector handles the tails. Loads/stores convert float16/bfloat16 storage.
//
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Cephes' degree-6 polynomial, 2^n built
// in the exponent bits (relative error ~1.2e-7 over [-87.3, 88.4]; inputs are clamped there).
// log: x = 2^k m, m in [sqrt(1/2), sqrt(2)), Cephes' logf polynomial (error ~1 ulp) for
// normal positive x. log1p(e), e in [0, 1]: log(1 + e) * e / ((1 + e) - 1) (exact rounding of
// the argument compensated; e itself where 1 + e rounds to 1).
#pragma once
#include <cstdint>
#include <cstring>

namespace effops::losses {

#define EFFOPS_VM_INLINE inline __attribute__((always_inline))

template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(W)));
  typedef int32_t I __attribute__((vector_size(W)));
  typedef uint32_t U __attribute__((vector_size(W)));
  typedef uint16_t H __attribute__((vector_size(W / 2)));
  typedef _Float16 Half __attribute__((vector_size(W / 2)));
  static constexpr int L = W / 4;
};

template <class V>
EFFOPS_VM_INLINE V vsplat(float s) {
  return s - V{};
}

// a ? b : c for vector masks (GCC's vector ternary).
template <class M, class V>
EFFOPS_VM_INLINE V vsel(M m, V a, V b) {
  return m ? a : b;
}

template <class F, class I>
EFFOPS_VM_INLINE F bits_to_f(I i) {
  F f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
template <class I, class F>
EFFOPS_VM_INLINE I f_to_bits(F f) {
  I i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

template <int W>
EFFOPS_VM_INLINE typename Vec<W>::F vexp(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  x = vsel(x > 88.37626f, vsplat<F>(88.37626f), x);
  x = vsel(x < -87.33654f, vsplat<F>(-87.33654f), x);
  F t = x * 1.44269504088896341f;
  F n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = vsplat<F>(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  I e = (__builtin_convertvector(n, I) + 127) << 23;
  return p * bits_to_f<F>(e);
}

// Natural log of normal positive x (callers clamp to >= FLT_MIN).
template <int W>
EFFOPS_VM_INLINE typename Vec<W>::F vlog(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  I b = f_to_bits<I>(x);
  I k = ((b >> 23) & 0xff) - 126;
  F m = bits_to_f<F>((b & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  auto small = m < 0.707106781186547524f;
  k = k - (small ? I{} + 1 : I{});
  m = vsel(small, m + m, m) - 1.0f;
  F z = m * m;
  F y = vsplat<F>(7.0376836292E-2f);
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  F kf = __builtin_convertvector(k, F);
  y = y + kf * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + kf * 0.693359375f;
}

// log1p(e) for e in [0, 1].
template <int W>
EFFOPS_VM_INLINE typename Vec<W>::F vlog1p01(typename Vec<W>::F e) {
  using F = typename Vec<W>::F;
  F u = 1.0f + e;
  F d = u - 1.0f;
  auto exact = d == 0.0f;
  F l = vlog<W>(u);
  return vsel(exact, e, l * (e / vsel(exact, vsplat<F>(1.0f), d)));
}

// ---- loads and stores of W/4 elements (float compute)
template <int W>
EFFOPS_VM_INLINE typename Vec<W>::F vload(const float* p) {
  typename Vec<W>::F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int W>
EFFOPS_VM_INLINE typename Vec<W>::F vload(const uint16_t* bf) {  // bfloat16 bits
  typename Vec<W>::H h;
  std::memcpy(&h, bf, sizeof h);
  typename Vec<W>::U u = __builtin_convertvector(h, typename Vec<W>::U) << 16;
  return bits_to_f<typename Vec<W>::F>(u);
}
template <int W>
EFFOPS_VM_INLINE typename Vec<W>::F vload(const _Float16* p) {
  typename Vec<W>::Half h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, typename Vec<W>::F);
}
template <int W>
EFFOPS_VM_INLINE void vstore(float* p, typename Vec<W>::F v) {
  std::memcpy(p, &v, sizeof v);
}
template <int W>
EFFOPS_VM_INLINE void vstore(uint16_t* p, typename Vec<W>::F v) {  // round to nearest even bfloat16
  using U = typename Vec<W>::U;
  U u = f_to_bits<U>(v);
  U nan = (u & 0x7fffffffu) > 0x7f800000u;
  U r = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  U q = (u >> 16) | 0x40u;
  U o = (nan & q) | (~nan & r);
  typename Vec<W>::H h = __builtin_convertvector(o, typename Vec<W>::H);
  std::memcpy(p, &h, sizeof h);
}
template <int W>
EFFOPS_VM_INLINE void vstore(_Float16* p, typename Vec<W>::F v) {
  typename Vec<W>::Half h = __builtin_convertvector(v, typename Vec<W>::Half);
  std::memcpy(p, &h, sizeof h);
}

template <int W>
EFFOPS_VM_INLINE float hsum(typename Vec<W>::F v) {
  float s = 0.0f;
  for (int i = 0; i < Vec<W>::L; ++i) s += v[i];
  return s;
}

}  // namespace effops::losses
