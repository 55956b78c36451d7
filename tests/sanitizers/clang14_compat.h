// Force-included (-include) by the clang-14 builds of scripts/ci-fuzz and scripts/ci-sanitizers
// (tsan) only. clang-14 rejects __builtin_cpu_supports("f16c") ("invalid cpu feature string";
// accepted from clang 15), which core/codec_kernels.cc uses for its F16C dispatch, so those
// builds could not compile the core. This maps the builtin to a function with the same answers:
// "f16c" from CPUID leaf 1 (ECX bit 29, <cpuid.h> bit_F16C), every other feature from the real
// builtin. Reported to the codec owner (docs/RELIABILITY.md); delete once the core builds with
// clang-14 as is.
#ifndef FIBQUANT_TESTS_SANITIZERS_CLANG14_COMPAT_H_
#define FIBQUANT_TESTS_SANITIZERS_CLANG14_COMPAT_H_
#if defined(__clang__) && __clang_major__ < 15 && defined(__x86_64__)
#include <cpuid.h>

static inline int fq_clang14_cpu_supports(const char* f) {
  const auto eq = [](const char* a, const char* b) {
    while (*a != 0 && *a == *b) ++a, ++b;
    return *a == *b;
  };
  if (eq(f, "f16c")) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
  }
  if (eq(f, "avx2")) return __builtin_cpu_supports("avx2");
  if (eq(f, "fma")) return __builtin_cpu_supports("fma");
  if (eq(f, "avx")) return __builtin_cpu_supports("avx");
  if (eq(f, "sse4.1")) return __builtin_cpu_supports("sse4.1");
  if (eq(f, "avx512f")) return __builtin_cpu_supports("avx512f");
  return 0;  // unknown here: take the portable path
}
#define __builtin_cpu_supports(feature) fq_clang14_cpu_supports(feature)
#endif
#endif  // FIBQUANT_TESTS_SANITIZERS_CLANG14_COMPAT_H_
