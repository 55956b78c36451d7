// Tests for the initial-codebook ingredients: direction generators (golden constants, first
// directions, unit norm, determinism), Bennett-Gersho radii and the spherical-Beta sampler.
#include <cmath>
#include <vector>

#include "core/directions.h"
#include "core/radii.h"
#include "core/rng.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

void ExpectUnitRows(const std::vector<double>& v, uint32_t k) {
  ASSERT_EQ(v.size() % k, 0u);
  for (size_t r = 0; r < v.size() / k; ++r) {
    double s = 0;
    for (uint32_t j = 0; j < k; ++j) {
      ASSERT_TRUE(std::isfinite(v[r * k + j]));
      s += v[r * k + j] * v[r * k + j];
    }
    EXPECT_NEAR(std::sqrt(s), 1.0, 1e-12) << "row " << r;
  }
}

TEST(Directions, GoldenConstants) {
  EXPECT_NEAR(GoldenTheta(), 0.3819660112501052, 1e-15);
  EXPECT_NEAR(*GeneralizedGoldenRatio(4), 1.1673039782614185, 1e-15);
  EXPECT_NEAR(*GeneralizedGoldenRatio(5), 1.1347241384015194, 1e-15);
  EXPECT_NEAR(*GeneralizedGoldenRatio(8), 1.0850702454914507, 1e-15);
  // phi_1 is the golden ratio itself (x^2 = x + 1).
  EXPECT_NEAR(*GeneralizedGoldenRatio(1), kGoldenRatio, 1e-15);
  EXPECT_EQ(GeneralizedGoldenRatio(0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Directions, SpiralFirstFour) {
  absl::StatusOr<std::vector<double>> u = FibonacciSpiral(4);
  ASSERT_TRUE(u.ok()) << u.status();
  const double want[8] = {1, 0, -0.737369, 0.675490, 0.087426, -0.996171, 0.608439, 0.793601};
  for (int i = 0; i < 8; ++i) EXPECT_NEAR((*u)[i], want[i], 1e-6) << i;
}

TEST(Directions, RobertsKroneckerK4FirstTwo) {
  absl::StatusOr<std::vector<double>> u = RobertsKronecker(4, 2);
  ASSERT_TRUE(u.ok()) << u.status();
  const double want[8] = {-0.207151, -0.389914, -0.554612, -0.705309,
                          -0.248862, -0.559396, 0.692674,  0.381244};
  for (int i = 0; i < 8; ++i) EXPECT_NEAR((*u)[i], want[i], 1e-6) << i;
}

TEST(Directions, SphereFirstPointAndBands) {
  absl::StatusOr<std::vector<double>> u = FibonacciSphere(16);
  ASSERT_TRUE(u.ok()) << u.status();
  // z_t = 1 - (2t+1)/N; t = 0 sits at angle 0.
  EXPECT_NEAR((*u)[2], 1.0 - 1.0 / 16, 1e-15);
  EXPECT_NEAR((*u)[1], 0.0, 1e-15);
  EXPECT_NEAR((*u)[15 * 3 + 2], -(1.0 - 1.0 / 16), 1e-15);
}

TEST(Directions, UnitNormAndDeterministic) {
  for (uint32_t n : {1u, 2u, 16u, 257u}) {
    absl::StatusOr<std::vector<double>> a = FibonacciSpiral(n), b = FibonacciSpiral(n);
    ASSERT_TRUE(a.ok() && b.ok());
    ExpectUnitRows(*a, 2);
    EXPECT_EQ(*a, *b);
    a = FibonacciSphere(n);
    b = FibonacciSphere(n);
    ASSERT_TRUE(a.ok() && b.ok());
    ExpectUnitRows(*a, 3);
    EXPECT_EQ(*a, *b);
    for (uint32_t k : {4u, 5u, 8u, 16u}) {
      a = RobertsKronecker(k, n);
      b = RobertsKronecker(k, n);
      ASSERT_TRUE(a.ok() && b.ok());
      ExpectUnitRows(*a, k);
      EXPECT_EQ(*a, *b);
    }
  }
}

TEST(Directions, RejectsBadArguments) {
  EXPECT_EQ(FibonacciSpiral(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FibonacciSphere(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RobertsKronecker(3, 8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RobertsKronecker(4, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Radii, BennettGershoBeta) {
  EXPECT_NEAR(BennettGershoBeta(64, 4), 20.0 + 1.0 / 3.0, 1e-12);
  EXPECT_NEAR(BennettGershoBeta(64, 8), 22.6, 1e-12);
  EXPECT_NEAR(BennettGershoBeta(128, 4), 41.0 + 2.0 / 3.0, 1e-12);
  EXPECT_NEAR(BennettGershoBeta(12, 3), 3.1, 1e-12);
  // k = 2: beta = d/4 (the closed form's exponent).
  EXPECT_NEAR(BennettGershoBeta(64, 2), 16.0, 1e-12);
}

TEST(Radii, K2ClosedFormGolden) {
  absl::StatusOr<std::vector<double>> r = K2ClosedFormRadii(8, 8);
  ASSERT_TRUE(r.ok()) << r.status();
  const double want[8] = {0.178197, 0.314026, 0.413333, 0.5, 0.581861, 0.664066, 0.752986, 0.866025};
  for (int i = 0; i < 8; ++i) EXPECT_NEAR((*r)[i], want[i], 1e-6) << i;
}

TEST(Radii, K2ClosedFormMatchesBetaQuantile) {
  for (uint32_t d : {8u, 64u, 128u}) {
    absl::StatusOr<std::vector<double>> a = K2ClosedFormRadii(d, 33), b = BetaQuantileRadii(d, 2, 33);
    ASSERT_TRUE(a.ok() && b.ok());
    for (int i = 0; i < 33; ++i) EXPECT_NEAR((*a)[i], (*b)[i], 1e-12) << d << " " << i;
  }
}

TEST(Radii, BetaQuantileMonotoneInsideBall) {
  for (uint32_t k : {3u, 4u, 8u}) {
    absl::StatusOr<std::vector<double>> r = BetaQuantileRadii(128, k, 256);
    ASSERT_TRUE(r.ok()) << r.status();
    for (size_t i = 0; i < r->size(); ++i) {
      EXPECT_GT((*r)[i], 0.0);
      EXPECT_LT((*r)[i], 1.0);
      if (i > 0) {
        EXPECT_GT((*r)[i], (*r)[i - 1]);
      }
    }
  }
  EXPECT_EQ(BetaQuantileRadii(8, 8, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BetaQuantileRadii(8, 2, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(K2ClosedFormRadii(2, 4).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Radii, ScalarCodewordsSymmetricIncreasing) {
  absl::StatusOr<std::vector<double>> c = ScalarQuantileCodewords(64, 8);
  ASSERT_TRUE(c.ok()) << c.status();
  for (int i = 0; i < 8; ++i) {
    EXPECT_NEAR((*c)[i], -(*c)[7 - i], 1e-12);
    EXPECT_GT((*c)[i], -1.0);
    EXPECT_LT((*c)[i], 1.0);
    if (i > 0) {
      EXPECT_GT((*c)[i], (*c)[i - 1]);
    }
  }
  // Companded levels are wider than the coordinate's standard deviation 1/8 but stay well inside.
  EXPECT_GT((*c)[7], 0.125);
  EXPECT_LT((*c)[7], 0.6);
  EXPECT_EQ(ScalarQuantileCodewords(1, 4).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Sampler, SphericalBetaMoments) {
  const uint32_t d = 16, k = 4;
  const size_t m = 8000;
  absl::StatusOr<std::vector<double>> s = SphericalBetaSamples(d, k, m, 12345);
  ASSERT_TRUE(s.ok()) << s.status();
  double r2sum = 0, x0sum = 0;
  for (size_t i = 0; i < m; ++i) {
    double r2 = 0;
    for (uint32_t j = 0; j < k; ++j) r2 += (*s)[i * k + j] * (*s)[i * k + j];
    EXPECT_LE(r2, 1.0 + 1e-12);
    r2sum += r2;
    x0sum += (*s)[i * k] * (*s)[i * k];
  }
  EXPECT_NEAR(r2sum / m, static_cast<double>(k) / d, 0.02);
  EXPECT_NEAR(x0sum / m, 1.0 / d, 0.01);
}

TEST(Sampler, ScalarAndDeterministic) {
  absl::StatusOr<std::vector<double>> a = SphericalBetaSamples(64, 1, 20000, 7);
  absl::StatusOr<std::vector<double>> b = SphericalBetaSamples(64, 1, 20000, 7);
  absl::StatusOr<std::vector<double>> c = SphericalBetaSamples(64, 1, 20000, 8);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_NE(*a, *c);
  double mean = 0, var = 0;
  for (double x : *a) mean += x;
  for (double x : *a) var += x * x;
  EXPECT_NEAR(mean / a->size(), 0.0, 0.005);
  EXPECT_NEAR(var / a->size(), 1.0 / 64, 0.001);
  EXPECT_EQ(SphericalBetaSamples(4, 4, 10, 1).status().code(), absl::StatusCode::kInvalidArgument);
  // 2^21 blocks x k = 256 = 2^29 values exceeds the 2^28-value limit (checked before allocating).
  EXPECT_EQ(SphericalBetaSamples(512, 256, size_t{1} << 21, 1).status().code(),
            absl::StatusCode::kResourceExhausted);
}

// Pins the sampler's exact output: it feeds every codebook digest, so any change must be deliberate.
TEST(Sampler, GoldenFirstDraw) {
  Rng rng(kTrainingSeedXor);
  double x[4];
  SampleSphericalBeta(16, 4, rng, x);
  double r2 = 0;
  for (double v : x) r2 += v * v;
  EXPECT_GT(r2, 0.0);
  EXPECT_LT(r2, 1.0);
  // Recorded from this implementation (docs/format/codebook.md): exact bit patterns.
  EXPECT_EQ(x[0], -0x1.973a502cac15p-3);
  EXPECT_EQ(x[1], -0x1.4f866946bd357p-6);
  EXPECT_EQ(x[2], 0x1.d7e3858047ffap-4);
  EXPECT_EQ(x[3], -0x1.6b0f002e75c8cp-2);
}

}  // namespace
}  // namespace fibquant
