// Fresh multi-megabyte outputs (torch maps a large tensor anew for every allocation: glibc's
// mmap threshold stops at 32 MiB) take one page fault per 4 KiB on first write - measured 250 ms
// for the 141 MB gradient of D0's head outputs on a 2-core VM, longer than the kernel, and a
// third of a 38 MB BatchNorm's training pass. Transparent huge pages are usually enabled in
// 'madvise' mode: advise_huge asks for them on the whole 2 MiB pages inside a buffer about to be
// written (a hint: errors are ignored; buffers under 8 MiB are left alone).
#pragma once
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace effops {

inline void advise_huge(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (bytes >= static_cast<int64_t>(4 * kHuge) && e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

}  // namespace effops
