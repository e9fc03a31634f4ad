// The depthwise row kernels at AVX-512 for bf16 outputs on CPUs with AVX512_BF16: the v4 kernels
// (dw_row_impl.h) with the stores rounded by vcvtneps2bf16 (one instruction for the ~7 of the
// emulated round to nearest even; denormal results to zero, as the bf16 GEMMs there read them).
// Picked at run time by dw_row (dw_core.h).
#include "common/isa.h"

#if EFFOPS_X86 && EFFOPS_HAS_BF16_TARGET
#define EFFOPS_ROWS_W 64
#define EFFOPS_ROWS_TARGET EFFOPS_TARGET_BF16
#define EFFOPS_ROWS_NAME dw_row_v4bf
#define EFFOPS_ROWS_NATIVE_BF16 1
#include "dwsep/dw_row_impl.h"

namespace effops::dwsep {
EFFOPS_ROWS_INSTANTIATE(simd::bf16, simd::bf16, float)
EFFOPS_ROWS_INSTANTIATE(float, simd::bf16, float)
}  // namespace effops::dwsep
#endif
