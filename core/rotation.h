// Seeded orthogonal rotations Π applied to unit vectors before blocking (docs/FORMAT.md, "Rotation").
//
// Two algorithms, each with its own version string bound into profile and rotation digests:
//  - kRotationHaarQr: d*d standard normals from Rng(seed) filled column-major, Householder QR,
//    Mezzadri sign correction (negate column j of Q when R[j][j] < 0); stored row-major f64.
//  - kRotationHadamard: y = H D3 H D2 H D1 x / d^(3/2), D_i random +-1 diagonals from Rng(seed),
//    H the unnormalised Walsh-Hadamard matrix; power-of-two d only; O(d log d).
// The f64 paths are the reference (and digested); the f32 batch paths are for the fast codec.
// Thread safety: immutable after Create(); all methods are const and safe to call concurrently.
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

class Rotation {
 public:
  // InvalidArgument for an unknown algorithm, dim == 0, or a non-power-of-two dim under Hadamard;
  // ResourceExhausted for dim > kMaxAmbientDim.
  [[nodiscard]] static absl::StatusOr<Rotation> Create(std::string_view algorithm, uint32_t dim,
                                                       uint64_t seed);

  uint32_t dim() const { return dim_; }
  uint64_t seed() const { return seed_; }
  const std::string& algorithm() const { return algorithm_; }
  bool is_hadamard() const;

  // Reference: y = Π x, x and y of length dim, f64 (left-to-right sums for the matrix form).
  void Apply(const double* x, double* y) const;
  // Reference inverse: x = Πᵀ y.
  void ApplyInverse(const double* y, double* x) const;

  // Fast: n row-major f32 vectors (n x dim), in and out may not alias. SIMD where available.
  void ApplyBatch(const float* x, float* y, size_t n) const;
  void ApplyInverseBatch(const float* y, float* x, size_t n) const;

  // Haar: the d*d matrix, row-major. Hadamard: empty.
  const std::vector<double>& matrix() const { return matrix_; }
  // Hadamard: 3*d signs (+1/-1) for D1, D2, D3. Haar: empty.
  const std::vector<int8_t>& signs() const { return signs_; }

  // "sha256:" digest of the canonical encoding (schema, algorithm, dim, seed, matrix or signs).
  const std::string& digest() const { return digest_; }

 private:
  Rotation() = default;
  std::string algorithm_;
  uint32_t dim_ = 0;
  uint64_t seed_ = 0;
  std::vector<double> matrix_;
  std::vector<float> matrix_f32_;  // fast path copy
  std::vector<int8_t> signs_;
  std::string digest_;
};

}  // namespace fibquant

#endif  // FIBQUANT_CORE_ROTATION_H_
