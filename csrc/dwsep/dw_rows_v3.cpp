// The depthwise row kernels at AVX2 + FMA (x86-64-v3): one translation unit per ISA level, so the
// levels compile in parallel (dw_row_impl.h).
#include "common/isa.h"

#if EFFOPS_X86
#define EFFOPS_ROWS_W 32
#define EFFOPS_ROWS_TARGET EFFOPS_TARGET_V3
#define EFFOPS_ROWS_NAME dw_row_v3
#include "dwsep/dw_row_impl.h"

namespace effops::dwsep {
EFFOPS_ROWS_INSTANTIATE(float, float, float)
EFFOPS_ROWS_INSTANTIATE(simd::bf16, simd::bf16, float)
EFFOPS_ROWS_INSTANTIATE(float, simd::bf16, float)
EFFOPS_ROWS_INSTANTIATE(simd::bf16, float, float)
}  // namespace effops::dwsep
#endif
