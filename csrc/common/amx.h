// AMX tile helpers shared by the bf16 (dwsep/gemm_amx.h) and int8 (qconv/qpw.cpp) GEMMs: the
// tile configuration (palette 1, tmm0-7 all 16 rows x 64 bytes), configure / release, and the
// tile instructions as inline assembly with memory clobbers (GCC's <amxtileintrin.h> macros
// declare no memory effects, so the compiler could move packing stores past a tile load; its
// _tile_loadconfig tells the compiler it reads 8 bytes of the 64). No compiler flag or target
// attribute is needed; the CPU / OS checks are in common/isa.h (amx(), amx_int8()).
#pragma once
#include <cstdint>

#include "common/isa.h"

#if EFFOPS_HAS_AMX_ASM
namespace effops::tiles {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Configure this thread's tiles before a task's first block; release() after its last (a
// thread holding tile state makes every context switch save 8 KB more).
inline void configure() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
  __asm__ volatile("ldtilecfg (%0)" ::"r"(&c) : "memory");
}
inline void release() { __asm__ volatile("tilerelease" ::: "memory"); }

}  // namespace effops::tiles

#define EFFOPS_TILE_LOAD(t, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define EFFOPS_TILE_STORE(t, base, stride) \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define EFFOPS_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
// tmm c += tmm a (16 x 32 bf16) x tmm b (16 x 16 bf16 pairs)
#define EFFOPS_TILE_DPBF16(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
// tmm c (int32) += tmm a (16 x 64 uint8) x tmm b (16 x 16 int8 quads)
#define EFFOPS_TILE_DPBUSD(c, a, b) __asm__ volatile("tdpbusd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

namespace effops::tiles {

// The 2 x 2 block both AMX GEMMs run: tmm0-3 the accumulators of rows 0-15 / 16-31 x columns
// 0-15 / 16-31, tmm4-5 the two A tiles, tmm6-7 the two B tiles.
enum class Dot { kBf16, kU8S8 };  // tdpbf16ps (bf16 pairs, float sums) or tdpbusd (uint8 x int8, int32)

inline void zero_block() {
  EFFOPS_TILE_ZERO(0);
  EFFOPS_TILE_ZERO(1);
  EFFOPS_TILE_ZERO(2);
  EFFOPS_TILE_ZERO(3);
}
// The accumulators += the A rows at a (16 rows, then 16 more, as bytes `as` apart) times the B
// rows at b (the two 64-byte halves of rows `bs` bytes apart).
template <Dot D>
inline void dot_block(const void* a, int64_t as, const void* b, int64_t bs) {
  const char* ac = static_cast<const char*>(a);
  const char* bc = static_cast<const char*>(b);
  EFFOPS_TILE_LOAD(4, ac, as);
  EFFOPS_TILE_LOAD(5, ac + 16 * as, as);
  EFFOPS_TILE_LOAD(6, bc, bs);
  EFFOPS_TILE_LOAD(7, bc + 64, bs);
  if constexpr (D == Dot::kBf16) {
    EFFOPS_TILE_DPBF16(0, 4, 6);
    EFFOPS_TILE_DPBF16(1, 4, 7);
    EFFOPS_TILE_DPBF16(2, 5, 6);
    EFFOPS_TILE_DPBF16(3, 5, 7);
  } else {
    EFFOPS_TILE_DPBUSD(0, 4, 6);
    EFFOPS_TILE_DPBUSD(1, 4, 7);
    EFFOPS_TILE_DPBUSD(2, 5, 6);
    EFFOPS_TILE_DPBUSD(3, 5, 7);
  }
}
// The accumulators to c, a [32][32] block of 4-byte floats or int32s.
inline void store_block(void* c) {
  char* cc = static_cast<char*>(c);
  EFFOPS_TILE_STORE(0, cc, 128);
  EFFOPS_TILE_STORE(1, cc + 64, 128);
  EFFOPS_TILE_STORE(2, cc + 16 * 128, 128);
  EFFOPS_TILE_STORE(3, cc + 16 * 128 + 64, 128);
}

}  // namespace effops::tiles
#endif
