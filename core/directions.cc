#include "core/directions.h"

#include <cmath>
#include <numbers>

#include "absl/strings/str_cat.h"
#include "boost/math/distributions/normal.hpp"

namespace fibquant {
namespace {

constexpr double kTwoPi = 2.0 * std::numbers::pi;

absl::Status CheckCount(uint32_t n) {
  if (n == 0) return absl::InvalidArgumentError("direction count N must be >= 1; got 0");
  return absl::OkStatus();
}

absl::Status CheckFinite(const std::vector<double>& v, const char* what) {
  for (size_t i = 0; i < v.size(); ++i) {
    if (!std::isfinite(v[i])) {
      return absl::InternalError(absl::StrCat(what, ": non-finite value at position ", i));
    }
  }
  return absl::OkStatus();
}

}  // namespace

double GoldenTheta() { return 1.0 - 1.0 / kGoldenRatio; }

absl::StatusOr<double> GeneralizedGoldenRatio(uint32_t k) {
  if (k == 0) return absl::InvalidArgumentError("GeneralizedGoldenRatio: k must be >= 1; got 0");
  double lo = 1.0, hi = 2.0;
  for (int step = 0; step < 128; ++step) {
    const double mid = 0.5 * (lo + hi);
    double p = mid;  // mid^(k+1) by k repeated multiplications
    for (uint32_t j = 0; j < k; ++j) p *= mid;
    if (p - mid - 1.0 > 0.0) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return 0.5 * (lo + hi);
}

absl::StatusOr<std::vector<double>> FibonacciSpiral(uint32_t n) {
  if (absl::Status s = CheckCount(n); !s.ok()) return s;
  const double g = GoldenTheta();
  std::vector<double> out(2 * static_cast<size_t>(n));
  for (uint32_t t = 0; t < n; ++t) {
    const double theta = kTwoPi * static_cast<double>(t) * g;
    out[2 * t] = std::cos(theta);
    out[2 * t + 1] = std::sin(theta);
  }
  if (absl::Status s = CheckFinite(out, "FibonacciSpiral"); !s.ok()) return s;
  return out;
}

absl::StatusOr<std::vector<double>> FibonacciSphere(uint32_t n) {
  if (absl::Status s = CheckCount(n); !s.ok()) return s;
  const double g = GoldenTheta();
  std::vector<double> out(3 * static_cast<size_t>(n));
  for (uint32_t t = 0; t < n; ++t) {
    const double z = 1.0 - (2.0 * static_cast<double>(t) + 1.0) / static_cast<double>(n);
    const double theta = kTwoPi * static_cast<double>(t) * g;
    const double rho = std::sqrt(std::max(0.0, 1.0 - z * z));
    out[3 * t] = rho * std::cos(theta);
    out[3 * t + 1] = rho * std::sin(theta);
    out[3 * t + 2] = z;
  }
  if (absl::Status s = CheckFinite(out, "FibonacciSphere"); !s.ok()) return s;
  return out;
}

absl::StatusOr<std::vector<double>> RobertsKronecker(uint32_t k, uint32_t n) {
  if (k < 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("RobertsKronecker: block dimension k must be >= 4; got ", k));
  }
  if (absl::Status s = CheckCount(n); !s.ok()) return s;
  absl::StatusOr<double> phi = GeneralizedGoldenRatio(k);
  if (!phi.ok()) return phi.status();
  // alpha_j = 1 / phi^j with phi^j by repeated multiplication (phi^1 = phi, phi^j = phi^(j-1) * phi).
  std::vector<double> alpha(k);
  double power = 1.0;
  for (uint32_t j = 0; j < k; ++j) {
    power *= *phi;
    alpha[j] = 1.0 / power;
  }
  const boost::math::normal_distribution<double> normal;
  std::vector<double> out(static_cast<size_t>(k) * n);
  for (uint32_t t = 0; t < n; ++t) {
    double* u = &out[static_cast<size_t>(t) * k];
    const double offset = static_cast<double>(t) + 0.5;
    double norm2 = 0.0;
    for (uint32_t j = 0; j < k; ++j) {
      const double x = offset * alpha[j];
      double w = x - std::floor(x);
      w = std::min(std::max(w, 1e-12), 1.0 - 1e-12);
      u[j] = boost::math::quantile(normal, w);
      norm2 += u[j] * u[j];
    }
    const double norm = std::sqrt(norm2);
    if (!(norm > 0.0) || !std::isfinite(norm)) {
      return absl::InternalError(
          absl::StrCat("RobertsKronecker: direction ", t, " has zero or non-finite norm"));
    }
    for (uint32_t j = 0; j < k; ++j) u[j] /= norm;
  }
  if (absl::Status s = CheckFinite(out, "RobertsKronecker"); !s.ok()) return s;
  return out;
}

}  // namespace fibquant
