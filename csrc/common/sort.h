// Stable sorting helpers shared by the kernels.
//
// Score order everywhere in effops is the order of torch.sort(scores, descending=True,
// stable=True): larger first, NaN before everything (torch treats NaN as the largest value),
// -0.0 equal to +0.0, ties by lower index. desc_key() maps a score to an unsigned integer whose
// ascending order is exactly that order, so a stable LSD radix sort over the keys yields it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace effops {

inline uint32_t desc_key(float f) {
  if (std::isnan(f)) return 0u;
  if (f == 0.0f) f = 0.0f;  // -0.0 and +0.0 compare equal
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending in f
  return ~u;                                         // descending in f; NaN (0) stays first
}

inline uint64_t desc_key(double f) {
  if (std::isnan(f)) return 0u;
  if (f == 0.0) f = 0.0;
  uint64_t u;
  std::memcpy(&u, &f, sizeof u);
  u = (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
  return ~u;
}

// Ascending order of signed integers as unsigned keys.
inline uint64_t asc_key(int64_t v) { return static_cast<uint64_t>(v) ^ 0x8000000000000000ull; }

// Stable sort of positions 0..n-1 by keys[pos] ascending; writes the permutation to perm.
// LSD radix sort with 8-bit digits; digits on which all keys agree are skipped, so small
// class ids or scores that share high bits cost one or two passes.
template <class K>
void stable_argsort(const K* keys, int64_t n, int64_t* perm, std::vector<K>& kbuf,
                    std::vector<int64_t>& pbuf) {
  static_assert(std::is_unsigned<K>::value, "radix keys are unsigned");
  if (n <= 0) return;
  if (n < 128) {
    for (int64_t i = 0; i < n; ++i) perm[i] = i;
    std::stable_sort(perm, perm + n, [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
    return;
  }
  constexpr int D = sizeof(K);
  std::vector<int64_t> hist(static_cast<size_t>(D) * 256, 0);
  for (int64_t i = 0; i < n; ++i) {
    K k = keys[i];
    for (int d = 0; d < D; ++d) ++hist[d * 256 + ((k >> (8 * d)) & 0xff)];
  }
  kbuf.resize(static_cast<size_t>(2 * n));
  pbuf.resize(static_cast<size_t>(n));
  K* ka = kbuf.data();
  K* kb = kbuf.data() + n;
  int64_t* pa = perm;
  int64_t* pb = pbuf.data();
  for (int64_t i = 0; i < n; ++i) {
    ka[i] = keys[i];
    pa[i] = i;
  }
  for (int d = 0; d < D; ++d) {
    int64_t* h = &hist[d * 256];
    if (*std::max_element(h, h + 256) == n) continue;  // all keys share this digit
    int64_t sum = 0;
    for (int b = 0; b < 256; ++b) {
      int64_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      int64_t dst = h[(ka[i] >> (8 * d)) & 0xff]++;
      kb[dst] = ka[i];
      pb[dst] = pa[i];
    }
    std::swap(ka, kb);
    std::swap(pa, pb);
  }
  if (pa != perm) std::copy(pa, pa + n, perm);
}

}  // namespace effops
