// Seeded orthogonal rotations Π applied to unit vectors before blocking (docs/FORMAT.md, "Rotation";
// normative construction in docs/format/rotation.md).
//
// Two algorithms, each with its own version string bound into profile and rotation digests:
//  - kRotationHaarQr: d*d standard normals from Rng(seed) filled column-major, Householder QR,
//    Mezzadri sign correction (negate column j of Q when R[j][j] < 0); stored row-major f64.
//  - kRotationHadamard: y = H D3 H D2 H D1 x / d^(3/2), D_i random +-1 diagonals from Rng(seed),
//    H the unnormalised Walsh-Hadamard matrix, for a power-of-two d; any other d runs each round on
//    two overlapping power-of-two windows [0, P) and [d - P, d) (P the largest power of two <= d),
//    each with its own signs and normalised FWHT. O(d log d) either way.
// Construction is exact and CPU-independent (the matrix bits / signs are digested); the f64 Apply
// paths are the reference; the f32 batch paths (AVX2+FMA or portable) are for the fast codec.
// Thread safety: immutable after Create(); all methods are const and safe to call concurrently.
// SetRotationKernelForTesting is a process-wide switch meant for tests and benchmarks only.
// Ownership: the rotation engineer (core/rotation*.cc, docs/format/rotation.md).
#ifndef FIBQUANT_CORE_ROTATION_H_
#define FIBQUANT_CORE_ROTATION_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fibquant {

inline constexpr std::string_view kRotationSchema = "fq_rotation_v1";

// Which f32 batch kernel ApplyBatch / ApplyInverseBatch use. kAuto picks AVX2+FMA when the CPU has
// both (checked once with __builtin_cpu_supports), else the portable scalar kernel; kScalar forces the
// portable kernel so tests can check both against the f64 reference on an AVX2 machine.
enum class RotationKernel : uint8_t { kAuto = 0, kScalar = 1 };
void SetRotationKernelForTesting(RotationKernel kernel);
// True when the running CPU supports AVX2 and FMA (so kAuto uses the SIMD kernel).
bool RotationSimdAvailable();

class Rotation {
 public:
  // InvalidArgument for an unknown algorithm or dim == 0; ResourceExhausted for
  // dim > kMaxRotationDim.
  [[nodiscard]] static absl::StatusOr<Rotation> Create(std::string_view algorithm, uint32_t dim,
                                                       uint64_t seed);

  uint32_t dim() const { return dim_; }
  uint64_t seed() const { return seed_; }
  const std::string& algorithm() const { return algorithm_; }
  bool is_hadamard() const;
  // Hadamard: the FWHT window length P (== dim() for a power of two). Haar: 0.
  uint32_t hadamard_window() const { return window_; }

  // Reference: y = Π x, x and y of length dim, f64 (left-to-right sums for the matrix form).
  // x == y is allowed (Haar then allocates a temporary); partial overlap is not.
  void Apply(const double* x, double* y) const;
  // Reference inverse: x = Πᵀ y.
  void ApplyInverse(const double* y, double* x) const;

  // Fast: n row-major f32 vectors (n x dim), in and out may not alias. SIMD where available.
  // Allocate nothing; n == 0 is a no-op. Within 1e-5 * ||x|| per coordinate of the f64 reference.
  void ApplyBatch(const float* x, float* y, size_t n) const;
  void ApplyInverseBatch(const float* y, float* x, size_t n) const;

  // Haar: the d*d matrix, row-major. Hadamard: empty.
  const std::vector<double>& matrix() const { return matrix_; }
  // Hadamard: 3*d signs (+1/-1) for D1, D2, D3 (power-of-two d), or 6*d signs for the two-window
  // form (round r: window-A signs at 2r*d, window-B signs at (2r+1)*d). Haar: empty.
  const std::vector<int8_t>& signs() const { return signs_; }

  // "sha256:" digest of the canonical encoding (schema, algorithm, dim, seed, matrix or signs).
  const std::string& digest() const { return digest_; }

 private:
  Rotation() = default;
  std::string algorithm_;
  uint32_t dim_ = 0;
  uint64_t seed_ = 0;
  std::vector<double> matrix_;
  // Haar fast path: M (for the inverse, X = Y M) and Mᵀ (forward, Y = X Mᵀ) in f32, packed as
  // column panels of W = rotation_internal::kPanelWidth lanes: panel p holds rows c = 0..d-1,
  // lanes p*W..p*W+W-1, zero padded past d. Each panel is contiguous so the kernel streams it from L1.
  std::vector<float> packed_fwd_;
  std::vector<float> packed_inv_;
  // Hadamard fast path: D1 * d^-1.5, D2, D3 as f32 (the scale is folded into D1; H is linear).
  std::vector<float> sign1_scaled_f32_;
  std::vector<float> sign2_f32_;
  std::vector<float> sign3_f32_;
  std::vector<int8_t> signs_;
  // Two-window Hadamard (dim not a power of two): window length, and the 6*d f32 sign vectors with
  // the window scales folded in, one set for each direction (see PrepareWindowedF32).
  uint32_t window_ = 0;
  std::vector<float> windowed_fwd_f32_;
  std::vector<float> windowed_inv_f32_;
  float window_scale_f32_ = 0;
  void PrepareWindowedF32();
  std::string digest_;
};

}  // namespace fibquant

#endif  // FIBQUANT_CORE_ROTATION_H_
