// The pointwise GEMM for bf16 activations on CPUs with AMX (Intel's tile matrix unit: AMX-TILE
// + AMX-BF16, Sapphire Rapids and later): tdpbf16ps multiplies a 16 x 32 bf16 tile of A by a
// 16 x 16 tile of bf16 pairs of W into a 16 x 16 float tile, 8192 multiply-adds per
// instruction (the vdpbf16ps kernel of gemm_bf16.h does 32 per instruction). Measured on a
// 2-vCPU Xeon with AMX: a large bf16 matmul runs at 1471 GFLOP/s there against 196 GFLOP/s in
// float32.
//
// Numbers: the vdpbf16ps kernel's (gemm_bf16.h): A (times the SE channel scale when there is
// one) and W rounded to bf16 (round to nearest even), every product accumulated in float (the
// unit flushes bf16 denormal inputs and float denormal results to zero; its additions round to
// nearest even); only the order of the sums differs.
//
// Layout: the bf16-pair weight panels of gemm_bf16.h ([K2p][32][2] per panel of 32 output
// channels) with K2p rounded up to whole 32-k chunks (zeros past K): the two 16-channel halves of
// a panel's 16 pairs are the two B tiles (rows 128 bytes apart). A block is 32 rows x 32
// channels: two A tiles (rows 0-15, 16-31; straight from the bf16 activations with stride lda,
// or from a packed buffer), two B tiles, four float accumulator tiles (tmm0-3), stored to a
// [32][32] float tile for the float AVX-512 epilogue (gemm_core.h).
//
// The tile configuration and instructions: common/amx.h; the CPU check and the Linux permission
// request (arch_prctl ARCH_REQ_XCOMP_PERM for the tile data state, without which the first tile
// instruction faults): common/isa.h (cpu_has_amx_bf16, amx()).
#pragma once
#include <cstdint>

#include "common/amx.h"
#include "common/isa.h"
#include "dwsep/gemm_bf16.h"

#if EFFOPS_HAS_BF16DOT && EFFOPS_HAS_AMX_ASM
#define EFFOPS_HAS_AMX 1
#else
#define EFFOPS_HAS_AMX 0
#endif

namespace effops::dwsep::amx {

inline constexpr int kRows = 32;   // rows of A per block (two 16-row tiles)
inline constexpr int kKChunk = 32; // k's per tile (16 bf16 pairs, 64 bytes a row)

// Pairs per panel for K: whole chunks (zeros past K).
inline int64_t panel_pairs(int64_t K) { return (K + kKChunk - 1) / kKChunk * (kKChunk / 2); }

#if EFFOPS_HAS_AMX
using ::effops::tiles::configure;
using ::effops::tiles::release;

// c[32][32] (row stride 32 floats) = the 32 rows of A times the panel b, over kc chunks of 32
// k's: chunks [0, kf) from a (row stride as bytes), chunk kf (when kf < kc: the K tail) from
// tail, 32 rows of 32 bf16 with zeros past K.
inline void block(const uint16_t* a, int64_t as, int64_t kf, const uint16_t* tail, int64_t kc,
                  const uint16_t* b, float* c) {
  using namespace ::effops::tiles;
  zero_block();
  for (int64_t k = 0; k < kc; ++k) {
    const bool main = k < kf;
    dot_block<Dot::kBf16>(main ? a + k * kKChunk : tail, main ? as : int64_t(kKChunk * 2),
                          b + k * (kKChunk / 2) * kBfNR * 2, kBfNR * 4);
  }
  store_block(c);
}
#endif

}  // namespace effops::dwsep::amx
