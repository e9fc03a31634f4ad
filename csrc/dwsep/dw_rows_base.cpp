// The depthwise row kernels at the baseline (SSE2): one translation unit per ISA level, so the
// levels compile in parallel (dw_row_impl.h). float64 has its only copy here.
#include "common/isa.h"

#define EFFOPS_ROWS_W 16
#define EFFOPS_ROWS_TARGET
#define EFFOPS_ROWS_NAME dw_row_base
#include "dwsep/dw_row_impl.h"

namespace effops::dwsep {
EFFOPS_ROWS_INSTANTIATE(float, float, float)
EFFOPS_ROWS_INSTANTIATE(simd::bf16, simd::bf16, float)
EFFOPS_ROWS_INSTANTIATE(float, simd::bf16, float)
EFFOPS_ROWS_INSTANTIATE(simd::bf16, float, float)
EFFOPS_ROWS_INSTANTIATE(double, double, double)
}  // namespace effops::dwsep
