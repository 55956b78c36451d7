// AVX2+FMA f32 batch kernels for rotations. Every function here carries
// __attribute__((target("avx2,fma"))) so the rest of the build stays baseline x86-64; Rotation only
// calls them after RotationSimdAvailable() confirmed the CPU has both. These are encode/decode fast
// paths, never digested: FMA rounding may differ from the scalar kernel in the last bits, and tests
// bound both against the f64 reference.
#include <immintrin.h>

#include <cstring>

#include "core/rotation_kernels.h"

namespace fibquant::rotation_internal {
namespace {

#define FQ_AVX2 __attribute__((target("avx2,fma")))

// MR rows x kPanelWidth columns of Y from one packed panel; accumulators stay in registers.
constexpr int kVecs = static_cast<int>(kPanelWidth / 8);
template <int MR>
FQ_AVX2 inline void Micro(const float* x, float* y, size_t d, const float* panel, size_t col0) {
  __m256 acc[MR][kVecs];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < kVecs; ++q) acc[r][q] = _mm256_setzero_ps();
  for (size_t c = 0; c < d; ++c) {
    __m256 b[kVecs];
    for (int q = 0; q < kVecs; ++q) b[q] = _mm256_loadu_ps(panel + c * kPanelWidth + 8 * q);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * d + c);
      for (int q = 0; q < kVecs; ++q) acc[r][q] = _mm256_fmadd_ps(a, b[q], acc[r][q]);
    }
  }
  if (d - col0 >= kPanelWidth) {
    for (int r = 0; r < MR; ++r)
      for (int q = 0; q < kVecs; ++q) _mm256_storeu_ps(y + r * d + col0 + 8 * q, acc[r][q]);
  } else {  // last, partial panel
    const size_t width = d - col0;
    alignas(32) float tmp[kPanelWidth];
    for (int r = 0; r < MR; ++r) {
      for (int q = 0; q < kVecs; ++q) _mm256_store_ps(tmp + 8 * q, acc[r][q]);
      std::memcpy(y + r * d + col0, tmp, width * sizeof(float));
    }
  }
}

}  // namespace

FQ_AVX2 void MatMulPanelsAvx2(const float* x, float* y, size_t n, uint32_t dim,
                              const float* packed) {
  const size_t d = dim;
  const size_t panels = (d + kPanelWidth - 1) / kPanelWidth;
  constexpr size_t kMr = 12 / kVecs;
  // A block of rows stays in L1/L2 while every panel (d*64 bytes) streams over it.
  constexpr size_t kRowBlock = 48;
  for (size_t r0 = 0; r0 < n; r0 += kRowBlock) {
    const size_t r1 = r0 + kRowBlock < n ? r0 + kRowBlock : n;
    for (size_t p = 0; p < panels; ++p) {
      const float* panel = packed + p * d * kPanelWidth;
      const size_t col0 = p * kPanelWidth;
      size_t r = r0;
      for (; r + kMr <= r1; r += kMr) Micro<kMr>(x + r * d, y + r * d, d, panel, col0);
      switch (r1 - r) {
        case 5: Micro<5>(x + r * d, y + r * d, d, panel, col0); break;
        case 4: Micro<4>(x + r * d, y + r * d, d, panel, col0); break;
        case 3: Micro<3>(x + r * d, y + r * d, d, panel, col0); break;
        case 2: Micro<2>(x + r * d, y + r * d, d, panel, col0); break;
        case 1: Micro<1>(x + r * d, y + r * d, d, panel, col0); break;
        default: break;
      }
    }
  }
}

namespace {

// Stages h = 1, 2, 4 of the FWHT inside one 8-lane register. Each stage computes
// lane j: a + b (j in the low half of its pair group) or a - b (high half) as t + (v ^ signmask),
// which is bit-identical to the scalar butterfly (a + (-b) == a - b exactly in IEEE arithmetic).
FQ_AVX2 inline __m256 InRegister3(__m256 v) {
  const __m256 m1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0,
                                                          INT32_MIN));
  const __m256 m2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, INT32_MIN, INT32_MIN, 0, 0, INT32_MIN,
                                                          INT32_MIN));
  const __m256 m4 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, INT32_MIN, INT32_MIN, INT32_MIN,
                                                          INT32_MIN));
  // t holds each lane's partner. Low lane: t = b, v = a, t + v = b + a == a + b (IEEE addition is
  // commutative). High lane: t = a, v = b, t + (-v) = a - b.
  __m256 t = _mm256_permute_ps(v, 0xB1);  // h = 1: swap adjacent lanes
  v = _mm256_add_ps(t, _mm256_xor_ps(v, m1));
  t = _mm256_permute_ps(v, 0x4E);  // h = 2: swap lane pairs within each 128-bit half
  v = _mm256_add_ps(t, _mm256_xor_ps(v, m2));
  t = _mm256_permute2f128_ps(v, v, 0x01);  // h = 4: swap the 128-bit halves
  v = _mm256_add_ps(t, _mm256_xor_ps(v, m4));
  return v;
}

// Unnormalised FWHT of one row in place, d >= 8 a power of two. Same butterfly pairs and operations as the scalar Fwht, so the result is bit-identical.
FQ_AVX2 inline void FwhtRow(float* x, size_t d) {
  for (size_t i = 0; i < d; i += 8) _mm256_storeu_ps(x + i, InRegister3(_mm256_loadu_ps(x + i)));
  size_t h = 8;
  // Two stages at a time (radix 4) halve the passes over the row.
  for (; 4 * h <= d; h *= 4) {
    for (size_t i = 0; i < d; i += 4 * h) {
      for (size_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j);
        const __m256 b = _mm256_loadu_ps(x + j + h);
        const __m256 c = _mm256_loadu_ps(x + j + 2 * h);
        const __m256 e = _mm256_loadu_ps(x + j + 3 * h);
        // stage h: (a, b) and (c, e); stage 2h: (a', c') and (b', e').
        const __m256 a1 = _mm256_add_ps(a, b), b1 = _mm256_sub_ps(a, b);
        const __m256 c1 = _mm256_add_ps(c, e), e1 = _mm256_sub_ps(c, e);
        _mm256_storeu_ps(x + j, _mm256_add_ps(a1, c1));
        _mm256_storeu_ps(x + j + 2 * h, _mm256_sub_ps(a1, c1));
        _mm256_storeu_ps(x + j + h, _mm256_add_ps(b1, e1));
        _mm256_storeu_ps(x + j + 3 * h, _mm256_sub_ps(b1, e1));
      }
    }
  }
  for (; h < d; h *= 2) {
    for (size_t i = 0; i < d; i += 2 * h) {
      for (size_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j);
        const __m256 b = _mm256_loadu_ps(x + j + h);
        _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
      }
    }
  }
}

FQ_AVX2 inline void MulRow(const float* in, const float* s, float* out, size_t d) {
  for (size_t i = 0; i < d; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(in + i), _mm256_loadu_ps(s + i)));
  }
}

// Whole-row FWHT on NV registers (d = 8*NV <= 256; the compiler spills some at 256): all three
// rounds of one vector run without touching memory except the sign vectors. Stages h = 1, 2, 4
// are done per register first; they never cross a register, so this is the same set of butterflies
// in a dependency-respecting order.
template <int NV, int HV>
FQ_AVX2 inline void StageRegs(__m256 (&v)[NV]) {
  if constexpr (HV < NV) {
#pragma GCC unroll 32
    for (int p = 0; p < NV / 2; ++p) {  // butterfly p pairs j and j + HV
      const int j = (p / HV) * (2 * HV) + p % HV;
      const __m256 a = v[j];
      const __m256 b = v[j + HV];
      v[j] = _mm256_add_ps(a, b);
      v[j + HV] = _mm256_sub_ps(a, b);
    }
    StageRegs<NV, 2 * HV>(v);
  }
}

template <int NV>
FQ_AVX2 inline void FwhtRegs(__m256 (&v)[NV]) {
#pragma GCC unroll 32
  for (int k = 0; k < NV; ++k) v[k] = InRegister3(v[k]);
  StageRegs<NV, 1>(v);
}

template <int NV>
FQ_AVX2 inline void MulRegs(__m256 (&v)[NV], const float* s) {
#pragma GCC unroll 32
  for (int k = 0; k < NV; ++k) v[k] = _mm256_mul_ps(v[k], _mm256_loadu_ps(s + 8 * k));
}

template <int NV>
FQ_AVX2 void HadamardRowsRegs(const float* x, float* y, size_t n, const float* s1, const float* d2,
                              const float* d3, bool inverse) {
  constexpr size_t d = 8 * NV;
  for (size_t r = 0; r < n; ++r) {
    __m256 v[NV];
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) v[k] = _mm256_loadu_ps(x + r * d + 8 * k);
    if (!inverse) {
      MulRegs(v, s1);
      FwhtRegs(v);
      MulRegs(v, d2);
      FwhtRegs(v);
      MulRegs(v, d3);
      FwhtRegs(v);
    } else {
      FwhtRegs(v);
      MulRegs(v, d3);
      FwhtRegs(v);
      MulRegs(v, d2);
      FwhtRegs(v);
      MulRegs(v, s1);
    }
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) _mm256_storeu_ps(y + r * d + 8 * k, v[k]);
  }
}

}  // namespace

FQ_AVX2 void HadamardBatchAvx2(const float* x, float* y, size_t n, uint32_t dim, const float* s1,
                               const float* d2, const float* d3, bool inverse) {
  const size_t d = dim;
  switch (d) {
    case 8: return HadamardRowsRegs<1>(x, y, n, s1, d2, d3, inverse);
    case 16: return HadamardRowsRegs<2>(x, y, n, s1, d2, d3, inverse);
    case 32: return HadamardRowsRegs<4>(x, y, n, s1, d2, d3, inverse);
    case 64: return HadamardRowsRegs<8>(x, y, n, s1, d2, d3, inverse);
    case 128: return HadamardRowsRegs<16>(x, y, n, s1, d2, d3, inverse);
    case 256: return HadamardRowsRegs<32>(x, y, n, s1, d2, d3, inverse);
    default: break;
  }
  if (d < 8) {  // too short for a register; the scalar kernel is exact and already cheap
    HadamardBatchScalar(x, y, n, dim, s1, d2, d3, inverse);
    return;
  }
  for (size_t r = 0; r < n; ++r) {
    const float* in = x + r * d;
    float* out = y + r * d;
    if (!inverse) {
      MulRow(in, s1, out, d);
      FwhtRow(out, d);
      MulRow(out, d2, out, d);
      FwhtRow(out, d);
      MulRow(out, d3, out, d);
      FwhtRow(out, d);
    } else {
      std::memcpy(out, in, d * sizeof(float));
      FwhtRow(out, d);
      MulRow(out, d3, out, d);
      FwhtRow(out, d);
      MulRow(out, d2, out, d);
      FwhtRow(out, d);
      MulRow(out, s1, out, d);
    }
  }
}

// Two-window rows held in NV registers (d = 8*NV, window P = 8*PV): the whole three rounds run
// without touching memory except the sign vectors, as HadamardRowsRegs does for one window. Window B
// starts at register NV - PV because d - P is a multiple of 8. The window FWHT is FwhtRegs on a
// register sub-array (the compiler keeps the copies in registers), so the butterflies and the bits
// are those of the scalar kernel.
template <int NV, int PV, int OFF>
FQ_AVX2 inline void FwhtWindowRegs(__m256 (&v)[NV]) {
  __m256 w[PV];
#pragma GCC unroll 32
  for (int k = 0; k < PV; ++k) w[k] = v[OFF + k];
  FwhtRegs<PV>(w);
#pragma GCC unroll 32
  for (int k = 0; k < PV; ++k) v[OFF + k] = w[k];
}

template <int NV, int PV>
FQ_AVX2 void HadamardWindowRowsRegs(const float* x, float* y, size_t n, const float* signs, float last_scale,
                                    bool inverse) {
  constexpr size_t d = 8 * NV;
  const __m256 scale = _mm256_set1_ps(last_scale);
  for (size_t r = 0; r < n; ++r) {
    __m256 v[NV];
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) v[k] = _mm256_loadu_ps(x + r * d + 8 * k);
    if (!inverse) {
      for (size_t round = 0; round < 3; ++round) {
        MulRegs(v, signs + 2 * round * d);
        FwhtWindowRegs<NV, PV, 0>(v);
        MulRegs(v, signs + (2 * round + 1) * d);
        FwhtWindowRegs<NV, PV, NV - PV>(v);
      }
#pragma GCC unroll 32
      for (int k = NV - PV; k < NV; ++k) v[k] = _mm256_mul_ps(v[k], scale);
    } else {
      for (size_t round = 3; round-- > 0;) {
        FwhtWindowRegs<NV, PV, NV - PV>(v);
        MulRegs(v, signs + (2 * round + 1) * d);
        FwhtWindowRegs<NV, PV, 0>(v);
        MulRegs(v, signs + 2 * round * d);
      }
    }
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) _mm256_storeu_ps(y + r * d + 8 * k, v[k]);
  }
}

// Any length: 8 lanes at a time, then scalar for the tail (the product is the same IEEE multiply).
FQ_AVX2 inline void MulRowTail(float* x, const float* s, size_t d) {
  size_t i = 0;
  for (; i + 8 <= d; i += 8) {
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(s + i)));
  }
  for (; i < d; ++i) x[i] *= s[i];
}

FQ_AVX2 void HadamardWindowsBatchAvx2(const float* x, float* y, size_t n, uint32_t dim, uint32_t window,
                                      const float* signs, float last_scale, bool inverse) {
  const size_t d = dim, p = window;
  if (d % 8 == 0) {  // the common head_dims that are not powers of two: 80, 96, 112, 160, 192, 224
    using Fn = void (*)(const float*, float*, size_t, const float*, float, bool);
    static constexpr Fn kRegs[] = {
        nullptr, nullptr, nullptr,
        HadamardWindowRowsRegs<3, 2>, nullptr, HadamardWindowRowsRegs<5, 4>,
        HadamardWindowRowsRegs<6, 4>, HadamardWindowRowsRegs<7, 4>, nullptr,
        HadamardWindowRowsRegs<9, 8>, HadamardWindowRowsRegs<10, 8>, HadamardWindowRowsRegs<11, 8>,
        HadamardWindowRowsRegs<12, 8>, HadamardWindowRowsRegs<13, 8>, HadamardWindowRowsRegs<14, 8>,
        HadamardWindowRowsRegs<15, 8>, nullptr, HadamardWindowRowsRegs<17, 16>,
        HadamardWindowRowsRegs<18, 16>, HadamardWindowRowsRegs<19, 16>, HadamardWindowRowsRegs<20, 16>,
        HadamardWindowRowsRegs<21, 16>, HadamardWindowRowsRegs<22, 16>, HadamardWindowRowsRegs<23, 16>,
        HadamardWindowRowsRegs<24, 16>, HadamardWindowRowsRegs<25, 16>, HadamardWindowRowsRegs<26, 16>,
        HadamardWindowRowsRegs<27, 16>, HadamardWindowRowsRegs<28, 16>, HadamardWindowRowsRegs<29, 16>,
        HadamardWindowRowsRegs<30, 16>, HadamardWindowRowsRegs<31, 16>};
    const size_t nv = d / 8;
    if (nv < sizeof(kRegs) / sizeof(kRegs[0]) && kRegs[nv] != nullptr) {
      return kRegs[nv](x, y, n, signs, last_scale, inverse);
    }
  }
  if (p < 8) {  // too short for a register; the scalar kernel is exact and already cheap
    HadamardWindowsBatchScalar(x, y, n, dim, window, signs, last_scale, inverse);
    return;
  }
  for (size_t r = 0; r < n; ++r) {
    float* out = y + r * d;
    std::memcpy(out, x + r * d, d * sizeof(float));
    if (!inverse) {
      for (size_t round = 0; round < 3; ++round) {
        MulRowTail(out, signs + 2 * round * d, d);
        FwhtRow(out, p);
        MulRowTail(out, signs + (2 * round + 1) * d, d);
        FwhtRow(out + d - p, p);
      }
      for (size_t i = d - p; i < d; ++i) out[i] *= last_scale;
    } else {
      for (size_t round = 3; round-- > 0;) {
        FwhtRow(out + d - p, p);
        MulRowTail(out, signs + (2 * round + 1) * d, d);
        FwhtRow(out, p);
        MulRowTail(out, signs + 2 * round * d, d);
      }
    }
  }
}

#undef FQ_AVX2

}  // namespace fibquant::rotation_internal
