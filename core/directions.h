// Direction generators of the initial FibQuant codebook (docs/FORMAT.md, "Codebook: directions"):
// N unit vectors in R^k spread quasi-uniformly over the sphere S^(k-1).
//   k = 2: Fibonacci spiral (golden-angle turns); k = 3: Fibonacci sphere (equal-area latitude
//   bands); k >= 4: Roberts-Kronecker (generalised golden ratio phi_k, Gaussian quantile lift).
// The values are f64 and use libm/Boost transcendental functions, which are not guaranteed to be
// bit-identical across CPUs in the last ulp; the codebook rounds them to f32 before digesting.
// Owner: codebook module. Thread safety: pure functions.
#ifndef FIBQUANT_CORE_DIRECTIONS_H_
#define FIBQUANT_CORE_DIRECTIONS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace fibquant {

// The golden ratio as the literal 1.618033988749895 and theta_g = 1 - 1/phi (a fraction of a turn).
inline constexpr double kGoldenRatio = 1.618033988749895;
double GoldenTheta();

// phi_k: the root > 1 of x^(k+1) = x + 1, by 128 bisection steps on [1, 2] (x^(k+1) by repeated
// multiplication; the midpoint of the final bracket is returned). InvalidArgument for k == 0.
[[nodiscard]] absl::StatusOr<double> GeneralizedGoldenRatio(uint32_t k);

// Row-major N x k unit vectors. InvalidArgument for N == 0 (and k < 4 for RobertsKronecker);
// Internal if a value is not finite or a norm is zero.
[[nodiscard]] absl::StatusOr<std::vector<double>> FibonacciSpiral(uint32_t n);
[[nodiscard]] absl::StatusOr<std::vector<double>> FibonacciSphere(uint32_t n);
[[nodiscard]] absl::StatusOr<std::vector<double>> RobertsKronecker(uint32_t k, uint32_t n);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_DIRECTIONS_H_
