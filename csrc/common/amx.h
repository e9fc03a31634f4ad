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
#endif
