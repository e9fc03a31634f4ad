// The depthwise row kernels at AVX-512 (x86-64-v4): one translation unit per ISA level, so the
// levels compile in parallel (dw_row_impl.h).
#include "common/isa.h"

#if EFFOPS_X86
#define EFFOPS_ROWS_W 64
#define EFFOPS_ROWS_TARGET EFFOPS_TARGET_V4
#define EFFOPS_ROWS_NAME dw_row_v4
#include "dwsep/dw_row_impl.h"

namespace effops::dwsep {
EFFOPS_ROWS_INSTANTIATE(float, float, float)
EFFOPS_ROWS_INSTANTIATE(simd::bf16, simd::bf16, float)
EFFOPS_ROWS_INSTANTIATE(float, simd::bf16, float)
EFFOPS_ROWS_INSTANTIATE(simd::bf16, float, float)
}  // namespace effops::dwsep
#endif
