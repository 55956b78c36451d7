// Internal to the rotation module: the f32 batch kernels behind Rotation::ApplyBatch and
// ApplyInverseBatch, a portable scalar version (rotation.cc) and an AVX2+FMA version
// (rotation_avx2.cc, compiled with per-function target attributes and chosen at run time).
// Not part of the public contract; only core/rotation*.cc and tests/benchmarks include it.
// Thread safety: pure functions over caller-owned buffers.
#ifndef FIBQUANT_CORE_ROTATION_KERNELS_H_
#define FIBQUANT_CORE_ROTATION_KERNELS_H_

#include <cstddef>
#include <cstdint>

namespace fibquant::rotation_internal {

inline constexpr uint32_t kPanelWidth = 16;

// y[r][j] = sum_c x[r][c] * P[c][j] for r < n, j < d, where P (d x d) is packed as column panels:
// panel p (of ceil(d/16)) is the contiguous d x 16 block P[c][16p + l] at packed[p*d*16 + c*16 + l],
// zero-padded past column d. x and y are n x d row-major and must not alias.
void MatMulPanelsScalar(const float* x, float* y, size_t n, uint32_t d, const float* packed);
void MatMulPanelsAvx2(const float* x, float* y, size_t n, uint32_t d, const float* packed);

// Three-round randomized Walsh-Hadamard on each of n rows (d a power of two):
//   forward (inverse == false): y = H D3 H D2 H (S1 x)
//   inverse (inverse == true):  y = S1 (H D2 H D3 H x)
// where S1 = D1 * d^-1.5 (scale folded in), H the unnormalised FWHT. x and y must not alias.
void HadamardBatchScalar(const float* x, float* y, size_t n, uint32_t d, const float* s1,
                         const float* d2, const float* d3, bool inverse);
void HadamardBatchAvx2(const float* x, float* y, size_t n, uint32_t d, const float* s1,
                       const float* d2, const float* d3, bool inverse);

// Two-window randomized Hadamard on each of n rows (d not a power of two, p the largest power of two
// below it): per round, multiply by a sign vector, FWHT of [0, p), multiply, FWHT of [d - p, d);
// `signs` holds the 6*d vectors in application order with the window scales folded in
// (Rotation::PrepareWindowedF32); forward ends by scaling [d - p, d) by last_scale. x and y must not
// alias.
void HadamardWindowsBatchScalar(const float* x, float* y, size_t n, uint32_t d, uint32_t p,
                                const float* signs, float last_scale, bool inverse);
void HadamardWindowsBatchAvx2(const float* x, float* y, size_t n, uint32_t d, uint32_t p,
                              const float* signs, float last_scale, bool inverse);

}  // namespace fibquant::rotation_internal

#endif  // FIBQUANT_CORE_ROTATION_KERNELS_H_
