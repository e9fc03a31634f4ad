// The x86 ISA level the CPU kernels run at: detected once, capped at run time by
// EFFOPS_ISA / effops.set_isa() (never above what the CPU has), so one machine can test and
// benchmark every path users run.
//
// Kernels that are compiled per level use EFFOPS_ISA_DISPATCH_W (below) or switch on isa()
// themselves; each level's copy is compiled with a target attribute, so the distributed build
// needs no -march flag.
#pragma once
#include <atomic>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EFFOPS_X86 1
#define EFFOPS_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define EFFOPS_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define EFFOPS_X86 0
#define EFFOPS_TARGET_V4
#define EFFOPS_TARGET_V3
#endif
// x86-64-v4 plus AVX512_BF16 (vdpbf16ps): the bf16 GEMMs (gemm_bf16.h, pw.cpp); GCC >= 10 or
// clang knows the target.
#if EFFOPS_X86 && (defined(__clang__) || __GNUC__ >= 10)
#define EFFOPS_HAS_BF16_TARGET 1
#define EFFOPS_TARGET_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#else
#define EFFOPS_HAS_BF16_TARGET 0
#endif

namespace effops {

enum Isa { kBase = 0, kV3 = 1, kV4 = 2 };

// What this CPU supports: x86-64-v4 (AVX-512 F/BW/VL/DQ), x86-64-v3 (AVX2 + FMA), or baseline.
inline Isa detected_isa() {
#if EFFOPS_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return kV4;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kV3;
    return kBase;
  }();
  return isa;
#else
  return kBase;
#endif
}

// Int8 dot-product extensions, used by the qconv kernels on top of a level: AVX-512 VNNI (with
// x86-64-v4) and AVX-VNNI (its VEX-encoded 256-bit forms, with x86-64-v3).
inline bool cpu_has_avx512vnni() {
#if EFFOPS_X86
  static const bool has = [] { __builtin_cpu_init(); return __builtin_cpu_supports("avx512vnni") != 0; }();
  return has;
#else
  return false;
#endif
}
inline bool cpu_has_avxvnni() {
#if EFFOPS_X86
  static const bool has = [] { __builtin_cpu_init(); return __builtin_cpu_supports("avxvnni") != 0; }();
  return has;
#else
  return false;
#endif
}

// AMX (tile matrix unit) with bf16 tiles: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7,
// EDX bits 24 and 22) and Linux grants this process the tile data state (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA: without it the first tile instruction faults).
// Asked once; EFFOPS_HAS_AMX_ASM: this compiler emits the tile instructions (inline assembly).
#if EFFOPS_X86 && defined(__linux__)
#define EFFOPS_HAS_AMX_ASM 1
#else
#define EFFOPS_HAS_AMX_ASM 0
#endif
// CPUID leaf 7 EDX: bit 24 AMX-TILE, 22 AMX-BF16, 25 AMX-INT8 (0 without AMX or the permission).
inline unsigned amx_features() {
#if EFFOPS_HAS_AMX_ASM
  static const unsigned f = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1u)) return 0u;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;  // <asm/prctl.h>, the kernel's xfeature number
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0 ? d : 0u;
  }();
  return f;
#else
  return 0;
#endif
}
inline bool cpu_has_amx_bf16() { return (amx_features() >> 22) & 1u; }
inline bool cpu_has_amx_int8() { return (amx_features() >> 25) & 1u; }

// The cap set by set_isa(); one definition across translation units (inline variable).
inline std::atomic<int> g_isa_cap{kV4};
// set_amx(false) (EFFOPS_AMX=0) turns the AMX kernels off, so one machine tests both paths.
inline std::atomic<bool> g_amx_on{true};
// set_vnni(false) (EFFOPS_VNNI=0) runs the int8 kernels without the VNNI dot products (the AVX2
// emulation or the scalar code), as on a CPU without them.
inline std::atomic<bool> g_vnni_on{true};
inline bool vnni_on() { return g_vnni_on.load(std::memory_order_relaxed); }
inline bool set_vnni(bool on) {
  g_vnni_on.store(on, std::memory_order_relaxed);
  return on;
}
// The int8 kernels' AVX2 level uses AVX-VNNI (vpdpbusd / vpdpwssd on ymm).
inline bool vnni256() { return vnni_on() && cpu_has_avxvnni(); }

// The level kernels run at: the detected one, capped.
inline Isa isa() {
  int cap = g_isa_cap.load(std::memory_order_relaxed);
  int d = detected_isa();
  return static_cast<Isa>(cap < d ? cap : d);
}

// Cap the level (0 baseline, 1 AVX2, 2 AVX-512); returns the level now in use.
inline int set_isa(int level) {
  g_isa_cap.store(level < 0 ? 0 : (level > kV4 ? kV4 : level), std::memory_order_relaxed);
  return isa();
}

// The AMX bf16 kernels run: the CPU and OS allow them, they are on, and the level is AVX-512
// (their epilogues are the AVX-512 ones; set_isa below it turns them off too).
inline bool amx() {
  return g_amx_on.load(std::memory_order_relaxed) && isa() == kV4 && cpu_has_amx_bf16();
}
// The AMX int8 GEMM (qconv/qpw.cpp) runs: as amx(), with AMX-INT8.
inline bool amx_int8() {
  return g_amx_on.load(std::memory_order_relaxed) && isa() == kV4 && cpu_has_amx_int8();
}
inline bool set_amx(bool on) {
  g_amx_on.store(on, std::memory_order_relaxed);
  return amx();
}

inline const char* isa_name(Isa i) {
  switch (i) {
    case kV4: return "avx512";
    case kV3: return "avx2";
    default: return "baseline";
  }
}

}  // namespace effops

// Define NAME(PARAMS) that runs BODY<W> ARGS compiled for the level isa() picks, W the level's
// native vector width in bytes (64 AVX-512, 32 AVX2, 16 baseline). BODY must be an
// EFFOPS_INLINE template (inlined into each level's copy). PARAMS and ARGS are parenthesised.
#if EFFOPS_X86
#define EFFOPS_ISA_DISPATCH_W(NAME, BODY, PARAMS, ARGS)              \
  EFFOPS_TARGET_V4 static void NAME##_v4 PARAMS { BODY<64> ARGS; }   \
  EFFOPS_TARGET_V3 static void NAME##_v3 PARAMS { BODY<32> ARGS; }   \
  static void NAME##_base PARAMS { BODY<16> ARGS; }                  \
  void NAME PARAMS {                                                 \
    switch (::effops::isa()) {                                       \
      case ::effops::kV4: return NAME##_v4 ARGS;                     \
      case ::effops::kV3: return NAME##_v3 ARGS;                     \
      default: return NAME##_base ARGS;                              \
    }                                                                \
  }
#else
#define EFFOPS_ISA_DISPATCH_W(NAME, BODY, PARAMS, ARGS) \
  void NAME PARAMS { BODY<16> ARGS; }
#endif
