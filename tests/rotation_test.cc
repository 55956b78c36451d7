// Tests for core/rotation: orthogonality, determinism and golden digests (the construction is
// normative), the Haar QR specification (fill order, sign correction), the Hadamard explicit form,
// error codes, the f32 batch kernels (SIMD and scalar) against the f64 reference, and the Haar
// distribution of the first coordinate.
#include "core/rotation.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "core/profile.h"
#include "core/rng.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

Rotation MustCreate(std::string_view algorithm, uint32_t dim, uint64_t seed) {
  absl::StatusOr<Rotation> r = Rotation::Create(algorithm, dim, seed);
  EXPECT_TRUE(r.ok()) << r.status();
  return *std::move(r);
}

// Column-major explicit matrix of the rotation: column i = Apply(e_i).
std::vector<double> ExplicitMatrix(const Rotation& rot) {
  const size_t d = rot.dim();
  std::vector<double> m(d * d), e(d, 0.0), y(d);
  for (size_t i = 0; i < d; ++i) {
    e[i] = 1.0;
    rot.Apply(e.data(), y.data());
    e[i] = 0.0;
    for (size_t r = 0; r < d; ++r) m[r * d + i] = y[r];  // row-major M[r][i]
  }
  return m;
}

double MaxOrthogonalityError(const std::vector<double>& m, size_t d) {
  double worst = 0.0;
  for (size_t a = 0; a < d; ++a) {
    for (size_t b = 0; b < d; ++b) {
      double s = 0.0;
      for (size_t r = 0; r < d; ++r) s += m[r * d + a] * m[r * d + b];
      worst = std::max(worst, std::fabs(s - (a == b ? 1.0 : 0.0)));
    }
  }
  return worst;
}

class ScopedKernel {
 public:
  explicit ScopedKernel(RotationKernel k) { SetRotationKernelForTesting(k); }
  ~ScopedKernel() { SetRotationKernelForTesting(RotationKernel::kAuto); }
};

TEST(RotationHaar, IsOrthogonal) {
  for (uint32_t d : {1u, 2u, 3u, 8u, 64u, 128u}) {
    const Rotation rot = MustCreate(kRotationHaarQr, d, 42);
    ASSERT_EQ(rot.matrix().size(), size_t{d} * d);
    EXPECT_TRUE(rot.signs().empty());
    EXPECT_LT(MaxOrthogonalityError(rot.matrix(), d), 1e-12) << "d=" << d;
    // Q Qᵀ = I too (rows orthonormal).
    std::vector<double> mt(size_t{d} * d);
    for (size_t r = 0; r < d; ++r)
      for (size_t c = 0; c < d; ++c) mt[c * d + r] = rot.matrix()[r * d + c];
    EXPECT_LT(MaxOrthogonalityError(mt, d), 1e-12) << "d=" << d;
  }
}

TEST(RotationHaar, ApplyMatchesMatrixRowMajor) {
  const Rotation rot = MustCreate(kRotationHaarQr, 5, 3);
  const std::vector<double> m = ExplicitMatrix(rot);
  for (size_t i = 0; i < m.size(); ++i) EXPECT_EQ(m[i], rot.matrix()[i]) << i;
}

// The specification: A is d*d normals from Rng(seed) filled column-major, Π = Q with R's diagonal
// made positive. Then Qᵀ A = R must be upper triangular with a positive diagonal, and column 0 of Q
// must be A's column 0 (the first d draws) normalised.
TEST(RotationHaar, MatchesQrSpecification) {
  for (uint32_t d : {1u, 2u, 7u, 32u}) {
    for (uint64_t seed : {0ull, 7ull, 12345ull}) {
      const Rotation rot = MustCreate(kRotationHaarQr, d, seed);
      const std::vector<double>& q = rot.matrix();
      Rng rng(seed);
      std::vector<double> a(size_t{d} * d);  // row-major A[r][c]
      for (size_t c = 0; c < d; ++c)
        for (size_t r = 0; r < d; ++r) a[r * d + c] = rng.Normal();
      for (size_t i = 0; i < d; ++i) {
        for (size_t j = 0; j < d; ++j) {
          double rij = 0.0;  // (Qᵀ A)[i][j]
          for (size_t k = 0; k < d; ++k) rij += q[k * d + i] * a[k * d + j];
          if (i > j) {
            EXPECT_NEAR(rij, 0.0, 1e-11) << "d=" << d << " i=" << i << " j=" << j;
          }
          if (i == j) {
            EXPECT_GT(rij, 0.0) << "d=" << d << " i=" << i;
          }
        }
      }
      double norm2 = 0.0;
      for (size_t r = 0; r < d; ++r) norm2 += a[r * d] * a[r * d];
      const double norm = std::sqrt(norm2);
      for (size_t r = 0; r < d; ++r) EXPECT_NEAR(q[r * d], a[r * d] / norm, 1e-13);
    }
  }
}

TEST(RotationHaar, OneDimensionalIsARandomSign) {
  bool saw_plus = false, saw_minus = false;
  for (uint64_t seed = 0; seed < 64; ++seed) {
    const Rotation rot = MustCreate(kRotationHaarQr, 1, seed);
    ASSERT_EQ(std::fabs(rot.matrix()[0]), 1.0);
    Rng rng(seed);
    EXPECT_EQ(rot.matrix()[0], rng.Normal() < 0 ? -1.0 : 1.0);
    (rot.matrix()[0] > 0 ? saw_plus : saw_minus) = true;
  }
  EXPECT_TRUE(saw_plus && saw_minus);
}

TEST(RotationHadamard, IsOrthogonalAndHasSigns) {
  for (uint32_t d : {1u, 2u, 4u, 64u, 256u}) {
    const Rotation rot = MustCreate(kRotationHadamard, d, 9);
    EXPECT_TRUE(rot.is_hadamard());
    EXPECT_TRUE(rot.matrix().empty());
    ASSERT_EQ(rot.signs().size(), size_t{3} * d);
    for (int8_t s : rot.signs()) EXPECT_TRUE(s == 1 || s == -1);
    EXPECT_LT(MaxOrthogonalityError(ExplicitMatrix(rot), d), 1e-12) << "d=" << d;
  }
}

TEST(RotationHadamard, SignsFollowTopBitOfRng) {
  const Rotation rot = MustCreate(kRotationHadamard, 16, 77);
  Rng rng(77);
  for (size_t i = 0; i < 48; ++i) {
    EXPECT_EQ(rot.signs()[i], (rng.NextU64() >> 63) == 0 ? 1 : -1) << i;
  }
}

// Sylvester H[i][j] = (-1)^popcount(i & j); Π = H D3 H D2 H D1 / d^1.5.
TEST(RotationHadamard, EqualsExplicitMatrixForm) {
  for (uint32_t d : {1u, 2u, 8u, 32u}) {
    const Rotation rot = MustCreate(kRotationHadamard, d, 5 + d);
    const std::vector<int8_t>& s = rot.signs();
    auto h = [](size_t i, size_t j) { return __builtin_popcountll(i & j) % 2 ? -1.0 : 1.0; };
    // Build column by column: col = H D3 H D2 H D1 e_i.
    std::vector<double> want(size_t{d} * d);
    for (size_t i = 0; i < d; ++i) {
      std::vector<double> v(d, 0.0), t(d);
      v[i] = s[i];
      for (int round = 0; round < 3; ++round) {
        for (size_t r = 0; r < d; ++r) {
          t[r] = 0.0;
          for (size_t c = 0; c < d; ++c) t[r] += h(r, c) * v[c];
        }
        if (round < 2) {
          for (size_t r = 0; r < d; ++r) v[r] = t[r] * s[(round + 1) * d + r];
        } else {
          v = t;
        }
      }
      for (size_t r = 0; r < d; ++r) want[r * d + i] = v[r] / (d * std::sqrt(double(d)));
    }
    const std::vector<double> got = ExplicitMatrix(rot);
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12) << "d=" << d << " " << i;
  }
}

// Any other dimension: two windows A = [0, P), B = [d - P, d), P the largest power of two <= d;
// round r applies signs S_{r,A}, the normalised FWHT of A, signs S_{r,B}, the normalised FWHT of B.
TEST(RotationHadamardWindows, IsOrthogonalWithSixSignVectors) {
  for (uint32_t d : {3u, 5u, 6u, 12u, 48u, 80u, 96u, 100u, 104u, 129u}) {
    const Rotation rot = MustCreate(kRotationHadamard, d, 9);
    const uint32_t p = uint32_t{1} << (31 - __builtin_clz(d));
    EXPECT_EQ(rot.hadamard_window(), p) << d;
    ASSERT_EQ(rot.signs().size(), size_t{6} * d);
    for (int8_t s : rot.signs()) EXPECT_TRUE(s == 1 || s == -1);
    EXPECT_LT(MaxOrthogonalityError(ExplicitMatrix(rot), d), 1e-12) << "d=" << d;
  }
  EXPECT_EQ(MustCreate(kRotationHadamard, 64, 9).hadamard_window(), 64u);
  EXPECT_EQ(MustCreate(kRotationHaarQr, 64, 9).hadamard_window(), 0u);
}

// The specification written as matrices: Π = Π_3 Π_2 Π_1 with Π_r = W_B S_{r,B} W_A S_{r,A}, W a
// window's H_P / sqrt(P) embedded in the identity.
TEST(RotationHadamardWindows, EqualsExplicitMatrixForm) {
  for (uint32_t d : {3u, 12u, 24u, 40u}) {
    const Rotation rot = MustCreate(kRotationHadamard, d, 70 + d);
    const std::vector<int8_t>& s = rot.signs();
    const size_t p = rot.hadamard_window();
    auto h = [](size_t i, size_t j) { return __builtin_popcountll(i & j) % 2 ? -1.0 : 1.0; };
    auto window = [&](std::vector<double>& v, size_t off) {
      std::vector<double> t(p, 0.0);
      for (size_t r = 0; r < p; ++r)
        for (size_t c = 0; c < p; ++c) t[r] += h(r, c) * v[off + c];
      for (size_t r = 0; r < p; ++r) v[off + r] = t[r] / std::sqrt(double(p));
    };
    std::vector<double> want(size_t{d} * d);
    for (size_t i = 0; i < d; ++i) {
      std::vector<double> v(d, 0.0);
      v[i] = 1.0;
      for (size_t round = 0; round < 3; ++round) {
        for (size_t r = 0; r < d; ++r) v[r] *= s[2 * round * d + r];
        window(v, 0);
        for (size_t r = 0; r < d; ++r) v[r] *= s[(2 * round + 1) * d + r];
        window(v, d - p);
      }
      for (size_t r = 0; r < d; ++r) want[r * d + i] = v[r];
    }
    const std::vector<double> got = ExplicitMatrix(rot);
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12) << "d=" << d << " " << i;
  }
}

TEST(Rotation, Deterministic) {
  for (std::string_view alg : {kRotationHaarQr, kRotationHadamard}) {
    const Rotation a = MustCreate(alg, 64, 1);
    const Rotation b = MustCreate(alg, 64, 1);
    const Rotation c = MustCreate(alg, 64, 2);
    EXPECT_EQ(a.matrix(), b.matrix());
    EXPECT_EQ(a.signs(), b.signs());
    EXPECT_EQ(a.digest(), b.digest());
    EXPECT_NE(a.digest(), c.digest());
    if (alg == kRotationHaarQr) {
      EXPECT_NE(a.matrix(), c.matrix());
    } else {
      EXPECT_NE(a.signs(), c.signs());
    }
    EXPECT_EQ(a.seed(), 1u);
    EXPECT_EQ(a.dim(), 64u);
    EXPECT_EQ(a.algorithm(), std::string(alg));
    EXPECT_EQ(a.digest().rfind("sha256:", 0), 0u);
    EXPECT_EQ(a.digest().size(), 71u);
  }
  // Same seed and dim, different algorithm: different digests.
  EXPECT_NE(MustCreate(kRotationHaarQr, 64, 1).digest(), MustCreate(kRotationHadamard, 64, 1).digest());
}

TEST(Rotation, ApplyThenInverseIsIdentity) {
  for (std::string_view alg : {kRotationHaarQr, kRotationHadamard}) {
    for (uint32_t d : {1u, 2u, 3u, 8u, 64u, 96u, 100u, 128u}) {
      const Rotation rot = MustCreate(alg, d, 31);
      Rng rng(d);
      std::vector<double> x(d), y(d), back(d);
      for (double& v : x) v = rng.Normal();
      rot.Apply(x.data(), y.data());
      rot.ApplyInverse(y.data(), back.data());
      double nx = 0, ny = 0;
      for (size_t i = 0; i < d; ++i) {
        EXPECT_NEAR(back[i], x[i], 1e-12) << alg << " d=" << d;
        nx += x[i] * x[i];
        ny += y[i] * y[i];
      }
      EXPECT_NEAR(std::sqrt(ny), std::sqrt(nx), 1e-12);
      // In-place (aliased) use of the reference paths.
      std::vector<double> z = x;
      rot.Apply(z.data(), z.data());
      for (size_t i = 0; i < d; ++i) EXPECT_EQ(z[i], y[i]);
      rot.ApplyInverse(z.data(), z.data());
      for (size_t i = 0; i < d; ++i) EXPECT_EQ(z[i], back[i]);
    }
  }
}

// Golden digests: the construction is normative, so these must never change (docs/format/rotation.md).
TEST(Rotation, GoldenDigests) {
  EXPECT_EQ(MustCreate(kRotationHaarQr, 8, 7).digest(),
            "sha256:f661d9599288627388245f37facd9f9144391a2b98587b6a8bd5be741069fcaa");
  EXPECT_EQ(MustCreate(kRotationHaarQr, 64, 1).digest(),
            "sha256:e25500f3a9a89b030e74ede462736b4644e5f5cb1ec2f4ad68c12b0822738477");
  EXPECT_EQ(MustCreate(kRotationHadamard, 64, 1).digest(),
            "sha256:4631c706117eb1bff20e18c8f5f18bcba4885300bc9b37d179a489f2a00e99bb");
  // Two-window Hadamard (docs/format/rotation.md) and Haar at a dimension that is not a power of two.
  EXPECT_EQ(MustCreate(kRotationHadamard, 96, 1).digest(), "sha256:f1bfbae66c1fa3270dc1b51876444db6f92f2c465659011c2ccee947070d0d1d");
  EXPECT_EQ(MustCreate(kRotationHadamard, 100, 1).digest(), "sha256:d81e9ae037b76518708ab7b8aaa25bcc5d7b734a0a3a4d718e5070e7ddb6e874");
  EXPECT_EQ(MustCreate(kRotationHaarQr, 100, 1).digest(), "sha256:b89f7b4d3075328296af360f2d4e8e96ff45c4f281d0ce2469d3a2d79095feea");
  // A larger case: long reduction chains and many 4-column groups (the -O0 build agrees).
  EXPECT_EQ(MustCreate(kRotationHaarQr, 512, 3).digest(),
            "sha256:6f5ab3284740e5a6f28909164135ed481c064079ab1cf13a9214b6ffcd4c6874");
}

TEST(Rotation, Errors) {
  auto code = [](std::string_view alg, uint32_t d) { return Rotation::Create(alg, d, 1).status().code(); };
  EXPECT_EQ(code(kRotationHaarQr, 0), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(kRotationHadamard, 0), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(kRotationHaarQr, 5000), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(code(kRotationHadamard, 5000), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(code(kRotationHadamard, 8192), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(code("qr-gaussian-chacha8-sign-corrected-v1", 8), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code("", 8), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(kRotationHaarQr, kMaxRotationDim + 1), absl::StatusCode::kResourceExhausted);
  const absl::Status s = Rotation::Create(kRotationHaarQr, 5000, 1).status();
  EXPECT_NE(s.message().find("4351"), std::string_view::npos) << s;
  // The largest allowed Hadamards (one and two windows) are cheap to build.
  EXPECT_TRUE(Rotation::Create(kRotationHadamard, kMaxAmbientDim, 1).ok());
  EXPECT_TRUE(Rotation::Create(kRotationHadamard, kMaxRotationDim, 1).ok());
}

// f32 batch output vs the f64 reference on the same (f32) inputs: |err| <= 1e-5 * ||x|| per element.
void CheckBatchAgainstReference(const Rotation& rot, size_t n, bool inverse) {
  const size_t d = rot.dim();
  Rng rng(1000 + d + n);
  std::vector<float> x(n * d);
  for (float& v : x) v = static_cast<float>(rng.Normal() * 3.0);
  // Canaries past the end catch writes beyond n*d in the tail handling.
  std::vector<float> y(n * d + 16, 123.0f);
  if (inverse) {
    rot.ApplyInverseBatch(x.data(), y.data(), n);
  } else {
    rot.ApplyBatch(x.data(), y.data(), n);
  }
  for (size_t i = 0; i < 16; ++i) ASSERT_EQ(y[n * d + i], 123.0f) << "overrun";
  std::vector<double> xd(d), yd(d);
  for (size_t r = 0; r < n; ++r) {
    double norm2 = 0.0;
    for (size_t c = 0; c < d; ++c) {
      xd[c] = x[r * d + c];
      norm2 += xd[c] * xd[c];
    }
    if (inverse) {
      rot.ApplyInverse(xd.data(), yd.data());
    } else {
      rot.Apply(xd.data(), yd.data());
    }
    const double tol = 1e-5 * std::sqrt(norm2);
    for (size_t c = 0; c < d; ++c) {
      ASSERT_NEAR(y[r * d + c], yd[c], tol)
          << rot.algorithm() << " d=" << d << " n=" << n << " row=" << r << " col=" << c
          << (inverse ? " inverse" : " forward");
    }
  }
}

void CheckAllBatchShapes() {
  for (uint32_t d : {1u, 3u, 8u, 17u, 64u, 100u, 128u, 256u}) {
    const Rotation rot = MustCreate(kRotationHaarQr, d, 11);
    for (size_t n : {1u, 5u, 7u, 53u, 130u}) {
      CheckBatchAgainstReference(rot, n, false);
      CheckBatchAgainstReference(rot, n, true);
    }
  }
  for (uint32_t d : {1u, 2u, 3u, 4u, 5u, 8u, 12u, 16u, 24u, 32u, 40u, 48u, 56u, 64u, 80u, 96u, 100u, 104u, 128u,
                     129u, 160u, 192u, 248u, 256u, 1024u, 4351u}) {
    const Rotation rot = MustCreate(kRotationHadamard, d, 11);
    for (size_t n : {1u, 3u, 40u}) {
      CheckBatchAgainstReference(rot, n, false);
      CheckBatchAgainstReference(rot, n, true);
    }
  }
}

TEST(RotationBatch, DefaultKernelMatchesReference) { CheckAllBatchShapes(); }

TEST(RotationBatch, ScalarKernelMatchesReference) {
  ScopedKernel k(RotationKernel::kScalar);
  CheckAllBatchShapes();
}

TEST(RotationBatch, SimdKernelIsExercisedWhenAvailable) {
  if (!RotationSimdAvailable()) GTEST_SKIP() << "CPU lacks AVX2+FMA: only the scalar kernel runs here";
  // On an AVX2+FMA CPU the default kernel differs from the forced scalar kernel for Haar (FMA
  // rounds once), proving the dispatch really switches kernels.
  const Rotation rot = MustCreate(kRotationHaarQr, 128, 3);
  const size_t n = 64, d = 128;
  Rng rng(5);
  std::vector<float> x(n * d), simd(n * d), scalar(n * d);
  for (float& v : x) v = static_cast<float>(rng.Normal());
  rot.ApplyBatch(x.data(), simd.data(), n);
  {
    ScopedKernel k(RotationKernel::kScalar);
    rot.ApplyBatch(x.data(), scalar.data(), n);
  }
  EXPECT_NE(std::memcmp(simd.data(), scalar.data(), n * d * sizeof(float)), 0);
}

// The SIMD FWHT performs exactly the scalar butterflies, so Hadamard batch output is bit-identical.
TEST(RotationBatch, HadamardKernelsAgreeBitForBit) {
  for (uint32_t d : {5u, 8u, 12u, 16u, 24u, 32u, 40u, 64u, 80u, 96u, 100u, 104u, 128u, 129u, 192u, 248u,
                     256u, 512u}) {
    const Rotation rot = MustCreate(kRotationHadamard, d, 8);
    const size_t n = 9;
    Rng rng(d);
    std::vector<float> x(n * d), a(n * d), b(n * d), ia(n * d), ib(n * d);
    for (float& v : x) v = static_cast<float>(rng.Normal());
    rot.ApplyBatch(x.data(), a.data(), n);
    rot.ApplyInverseBatch(x.data(), ia.data(), n);
    {
      ScopedKernel k(RotationKernel::kScalar);
      rot.ApplyBatch(x.data(), b.data(), n);
      rot.ApplyInverseBatch(x.data(), ib.data(), n);
    }
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << d;
    EXPECT_EQ(std::memcmp(ia.data(), ib.data(), ia.size() * sizeof(float)), 0) << d;
  }
}

TEST(RotationBatch, RoundTripAndZeroRows) {
  for (std::string_view alg : {kRotationHaarQr, kRotationHadamard}) {
    const Rotation rot = MustCreate(alg, 128, 4);
    const size_t n = 33, d = 128;
    Rng rng(6);
    std::vector<float> x(n * d), y(n * d), back(n * d);
    for (float& v : x) v = static_cast<float>(rng.Normal());
    rot.ApplyBatch(x.data(), y.data(), n);
    rot.ApplyInverseBatch(y.data(), back.data(), n);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(back[i], x[i], 1e-5) << alg << " " << i;
    rot.ApplyBatch(x.data(), y.data(), 0);  // n == 0 is a no-op
  }
}

// A Rotation is immutable: concurrent batch calls on one shared object give the serial results.
TEST(RotationBatch, ConcurrentUseMatchesSerial) {
  for (std::string_view alg : {kRotationHaarQr, kRotationHadamard}) {
    const Rotation rot = MustCreate(alg, 64, 12);
    constexpr int kThreads = 4;
    const size_t n = 200, d = 64;
    std::vector<std::vector<float>> in(kThreads), serial(kThreads), parallel(kThreads);
    for (int t = 0; t < kThreads; ++t) {
      Rng rng(t);
      in[t].resize(n * d);
      for (float& v : in[t]) v = static_cast<float>(rng.Normal());
      serial[t].resize(n * d);
      parallel[t].resize(n * d);
      rot.ApplyBatch(in[t].data(), serial[t].data(), n);
    }
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int rep = 0; rep < 20; ++rep) rot.ApplyBatch(in[t].data(), parallel[t].data(), n);
      });
    }
    for (std::thread& th : threads) th.join();
    for (int t = 0; t < kThreads; ++t) EXPECT_EQ(serial[t], parallel[t]) << alg << " thread " << t;
  }
}

std::vector<float> LoadF32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<float> v;
  if (!in) return v;
  in.seekg(0, std::ios::end);
  v.resize(static_cast<size_t>(in.tellg()) / sizeof(float));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
  return v;
}

// Mean over unit rows of d * max_c u_c^2: how spiky single vectors are (a random direction gives
// about 2 ln d).
double MeanPeakEnergy(const std::vector<float>& u, size_t d) {
  const size_t n = u.size() / d;
  double sum = 0.0;
  for (size_t r = 0; r < n; ++r) {
    double peak = 0.0;
    for (size_t c = 0; c < d; ++c) peak = std::max(peak, double(u[r * d + c]) * u[r * d + c]);
    sum += peak * d;
  }
  return sum / n;
}

// Real keys/queries (tests/data, USE-Lite layer 1, d = 128): the f32 batch rotation preserves the
// attention logits q.k (both sides rotated) and the rows' norms.
TEST(RotationRealData, PreservesLogitsAndNorms) {
  const size_t d = 128;
  std::vector<float> k = LoadF32(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32");
  std::vector<float> q = LoadF32(std::string(FQ_TEST_DATA_DIR) + "/L1_q.f32");
  ASSERT_EQ(k.size(), 64u * 4 * d);
  ASSERT_EQ(q.size(), k.size());
  const size_t n = k.size() / d;
  for (size_t r = 0; r < n; ++r) {  // unit rows, as the codec rotates them
    double nk = 0.0;
    for (size_t c = 0; c < d; ++c) nk += double(k[r * d + c]) * k[r * d + c];
    for (size_t c = 0; c < d; ++c) k[r * d + c] = static_cast<float>(k[r * d + c] / std::sqrt(nk));
  }
  for (std::string_view alg : {kRotationHaarQr, kRotationHadamard}) {
    const Rotation rot = MustCreate(alg, d, 2026);
    std::vector<float> rk(k.size()), rq(q.size());
    rot.ApplyBatch(k.data(), rk.data(), n);
    rot.ApplyBatch(q.data(), rq.data(), n);
    for (size_t t = 0; t < 64; ++t) {     // token of q
      for (size_t h = 0; h < 4; ++h) {    // same head for q and k
        const size_t qi = t * 4 + h, ki = ((t * 7) % 64) * 4 + h;
        double before = 0.0, after = 0.0, nq = 0.0;
        for (size_t c = 0; c < d; ++c) {
          before += double(q[qi * d + c]) * k[ki * d + c];
          after += double(rq[qi * d + c]) * rk[ki * d + c];
          nq += double(q[qi * d + c]) * q[qi * d + c];
        }
        ASSERT_NEAR(after, before, 1e-5 * std::sqrt(nq)) << alg << " q" << qi << " k" << ki;
      }
    }
    for (size_t r = 0; r < n; ++r) {
      double nr = 0.0;
      for (size_t c = 0; c < d; ++c) nr += double(rk[r * d + c]) * rk[r * d + c];
      ASSERT_NEAR(std::sqrt(nr), 1.0, 1e-5) << alg << " row " << r;
    }
  }
}

// Spiky inputs (one-hot e_c, the worst case for per-block quantisation) come out spread like random
// directions: mean d * max_c y_c^2 drops from d = 128 to about 2 ln d (~10).
// The two-window Hadamard (d = 80, 96, 100, 104) must spread them as well as a single window: an
// outlier channel lying only in window A or only in B is mixed into both by the overlap.
TEST(RotationSpreading, OneHotInputsBecomeFlat) {
  for (size_t d : {size_t{128}, size_t{80}, size_t{96}, size_t{100}, size_t{104}}) {
    std::vector<float> eye(d * d, 0.0f), y(d * d);
    for (size_t c = 0; c < d; ++c) eye[c * d + c] = 1.0f;
    EXPECT_EQ(MeanPeakEnergy(eye, d), double(d));
    for (std::string_view alg : {kRotationHaarQr, kRotationHadamard}) {
      const Rotation rot = MustCreate(alg, static_cast<uint32_t>(d), 99);
      rot.ApplyBatch(eye.data(), y.data(), d);
      const double peak = MeanPeakEnergy(y, d);
      std::printf("one-hot spreading %s d=%zu: mean d*max y^2 = %.2f (2 ln d = %.2f)\n",
                  std::string(alg).substr(0, 16).c_str(), d, peak, 2 * std::log(double(d)));
      EXPECT_LT(peak, 16.0) << alg << " d=" << d;
      EXPECT_GT(peak, 4.0) << alg << " d=" << d;
    }
  }
}

// Haar: each coordinate of Π e_1 has mean 0 and variance 1/d over seeds (uniform point on the
// sphere). Without the sign correction Π[0][0] would always be negative and the mean test fails.
TEST(RotationDistribution, FirstCoordinateVarianceIsOneOverD) {
  struct Case {
    std::string_view alg;
    uint32_t d;
    int seeds;
  };
  for (const Case& cs : {Case{kRotationHaarQr, 8, 3000}, Case{kRotationHaarQr, 64, 600},
                         Case{kRotationHadamard, 64, 3000}}) {
    double sum = 0.0, sum2 = 0.0;
    std::vector<double> e(cs.d, 0.0), y(cs.d);
    e[0] = 1.0;
    for (int s = 0; s < cs.seeds; ++s) {
      const Rotation rot = MustCreate(cs.alg, cs.d, 1000 + s);
      rot.Apply(e.data(), y.data());
      sum += y[0];
      sum2 += y[0] * y[0];
    }
    const double mean = sum / cs.seeds;
    const double var = sum2 / cs.seeds - mean * mean;
    const double want = 1.0 / cs.d;
    // 5 standard errors of the sample variance (~ want * sqrt(2 / seeds)) and of the mean.
    EXPECT_NEAR(var, want, 5 * want * std::sqrt(2.0 / cs.seeds)) << cs.alg << " d=" << cs.d;
    EXPECT_NEAR(mean, 0.0, 5 * std::sqrt(want / cs.seeds)) << cs.alg << " d=" << cs.d;
  }
}

}  // namespace
}  // namespace fibquant
