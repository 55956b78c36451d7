// The radial side of FibQuant (docs/FORMAT.md, "Codebook: radii" and "Codebook: training source"):
// Bennett-Gersho Beta-quantile radii of the initial codebook, the k = 1 scalar-baseline codewords,
// and the canonical spherical-Beta source (a k-block of a uniform unit vector in R^d) used to train
// and to evaluate codebooks.
// Radii use Boost.Math / libm (not bit-identical across CPUs in the last ulp: the codebook rounds
// them to f32); the sampler uses only the project Rng (PortableLog/Exp inside), +, *, / and sqrt,
// so its output is bit-identical everywhere.
// Owner: codebook module. Thread safety: pure functions; an Rng passed in must not be shared.
#ifndef FIBQUANT_CORE_RADII_H_
#define FIBQUANT_CORE_RADII_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "core/rng.h"

namespace fibquant {

// beta_{d,k} = (k/(k+2)) * (d-k-2)/2 + 1: the second shape of the Beta(k/2, beta) law of r^2 that
// the MSE-optimal (point density ~ f^(k/(k+2))) codebook follows. Evaluated as
// (k/(k+2)) * ((d-k-2)/2) + 1 in f64.
double BennettGershoBeta(uint32_t d, uint32_t k);

// Mid-quantile radii r_n = sqrt(ibeta_inv(k/2, beta_{d,k}, (n - 1/2)/N)), n = 1..N (Boost
// ibeta_inv). InvalidArgument unless 1 <= k < d and N >= 1; Internal if Boost fails.
[[nodiscard]] absl::StatusOr<std::vector<double>> BetaQuantileRadii(uint32_t d, uint32_t k,
                                                                    uint32_t n);

// k = 2 closed form r_n = sqrt(1 - (1 - q_n)^(4/d)) (std::pow). InvalidArgument unless d > 2, N >= 1.
[[nodiscard]] absl::StatusOr<std::vector<double>> K2ClosedFormRadii(uint32_t d, uint32_t n);

// The k = 1 scalar baseline: codeword t = 2 * ibeta_inv(b1, b1, (t + 1/2)/N) - 1 with
// b1 = (d-3)/6 + 1, i.e. Bennett-Gersho companding (density ~ f^(1/3)) of one coordinate's marginal
// f(x) ~ (1 - x^2)^((d-3)/2). InvalidArgument unless d >= 2 and N >= 1.
[[nodiscard]] absl::StatusOr<std::vector<double>> ScalarQuantileCodewords(uint32_t d, uint32_t n);

// One draw of the canonical source into out[0..k): a = Gamma(k/2), b = Gamma((d-k)/2),
// r2 = a/(a+b); k normals g (all k redrawn while sum g_i^2 == 0); n = sqrt(sum g_i^2);
// out[i] = sqrt(r2) * (g_i / n). Requires 1 <= k < d (not checked).
void SampleSphericalBeta(uint32_t d, uint32_t k, Rng& rng, double* out);

// M consecutive draws from Rng(seed), row-major M x k. InvalidArgument unless 1 <= k < d;
// ResourceExhausted if M*k exceeds 2^28 values (2 GiB).
[[nodiscard]] absl::StatusOr<std::vector<double>> SphericalBetaSamples(uint32_t d, uint32_t k,
                                                                       size_t m, uint64_t seed);

// XORed into codebook_seed to seed the training sampler (ASCII "FQUANT").
inline constexpr uint64_t kTrainingSeedXor = 0x465155414E54ull;

}  // namespace fibquant

#endif  // FIBQUANT_CORE_RADII_H_
