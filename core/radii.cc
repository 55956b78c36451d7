#include "core/radii.h"

#include <cmath>
#include <exception>

#include "absl/strings/str_cat.h"
#include "boost/math/special_functions/beta.hpp"

namespace fibquant {
namespace {

absl::StatusOr<double> IbetaInv(double a, double b, double q) {
  try {
    const double x = boost::math::ibeta_inv(a, b, q);
    if (!std::isfinite(x)) {
      return absl::InternalError(absl::StrCat("ibeta_inv(", a, ", ", b, ", ", q, ") is not finite"));
    }
    return std::min(std::max(x, 0.0), 1.0);
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("ibeta_inv(", a, ", ", b, ", ", q, ") failed: ", e.what()));
  }
}

double MidQuantile(uint32_t index0, uint32_t n) {
  return (static_cast<double>(index0) + 0.5) / static_cast<double>(n);
}

}  // namespace

double BennettGershoBeta(uint32_t d, uint32_t k) {
  const double kd = static_cast<double>(k);
  return (kd / (kd + 2.0)) * ((static_cast<double>(d) - kd - 2.0) / 2.0) + 1.0;
}

absl::StatusOr<std::vector<double>> BetaQuantileRadii(uint32_t d, uint32_t k, uint32_t n) {
  if (k == 0 || k >= d) {
    return absl::InvalidArgumentError(
        absl::StrCat("BetaQuantileRadii: need 1 <= block_dim < ambient_dim; got k=", k, ", d=", d));
  }
  if (n == 0) return absl::InvalidArgumentError("BetaQuantileRadii: codebook_size must be >= 1");
  const double a = static_cast<double>(k) / 2.0;
  const double b = BennettGershoBeta(d, k);
  if (!(b > 0.0)) {
    return absl::InvalidArgumentError(absl::StrCat("BetaQuantileRadii: beta_{d,k} = ", b,
                                                   " must be > 0 (d=", d, ", k=", k, ")"));
  }
  std::vector<double> r(n);
  for (uint32_t i = 0; i < n; ++i) {
    absl::StatusOr<double> s = IbetaInv(a, b, MidQuantile(i, n));
    if (!s.ok()) return s.status();
    r[i] = std::sqrt(*s);
  }
  return r;
}

absl::StatusOr<std::vector<double>> K2ClosedFormRadii(uint32_t d, uint32_t n) {
  if (d <= 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("K2ClosedFormRadii: ambient_dim must be > 2; got ", d));
  }
  if (n == 0) return absl::InvalidArgumentError("K2ClosedFormRadii: codebook_size must be >= 1");
  const double e = 4.0 / static_cast<double>(d);
  std::vector<double> r(n);
  for (uint32_t i = 0; i < n; ++i) {
    r[i] = std::sqrt(1.0 - std::pow(1.0 - MidQuantile(i, n), e));
  }
  return r;
}

absl::StatusOr<std::vector<double>> ScalarQuantileCodewords(uint32_t d, uint32_t n) {
  if (d < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("ScalarQuantileCodewords: ambient_dim must be >= 2; got ", d));
  }
  if (n == 0) {
    return absl::InvalidArgumentError("ScalarQuantileCodewords: codebook_size must be >= 1");
  }
  const double b1 = (static_cast<double>(d) - 3.0) / 6.0 + 1.0;
  std::vector<double> c(n);
  for (uint32_t i = 0; i < n; ++i) {
    absl::StatusOr<double> s = IbetaInv(b1, b1, MidQuantile(i, n));
    if (!s.ok()) return s.status();
    c[i] = 2.0 * *s - 1.0;
  }
  return c;
}

void SampleSphericalBeta(uint32_t d, uint32_t k, Rng& rng, double* out) {
  const double a = rng.Gamma(static_cast<double>(k) / 2.0);
  const double b = rng.Gamma(static_cast<double>(d - k) / 2.0);
  const double r = std::sqrt(a / (a + b));
  double norm2;
  do {
    norm2 = 0.0;
    for (uint32_t i = 0; i < k; ++i) {
      out[i] = rng.Normal();
      norm2 += out[i] * out[i];
    }
  } while (norm2 == 0.0);
  const double norm = std::sqrt(norm2);
  for (uint32_t i = 0; i < k; ++i) out[i] = r * (out[i] / norm);
}

absl::StatusOr<std::vector<double>> SphericalBetaSamples(uint32_t d, uint32_t k, size_t m,
                                                         uint64_t seed) {
  if (k == 0 || k >= d) {
    return absl::InvalidArgumentError(
        absl::StrCat("SphericalBetaSamples: need 1 <= block_dim < ambient_dim; got k=", k,
                     ", d=", d));
  }
  if (m > (size_t{1} << 28) / k) {
    return absl::ResourceExhaustedError(
        absl::StrCat("SphericalBetaSamples: ", m, " samples x k=", k, " exceed 2^28 values"));
  }
  std::vector<double> out(m * k);
  Rng rng(seed);
  for (size_t s = 0; s < m; ++s) SampleSphericalBeta(d, k, rng, &out[s * k]);
  return out;
}

}  // namespace fibquant
