// Nearest-codeword kernels on raw arrays (no codebook training needed): the f32 search is exact for
// its specified score (scalar, AVX2, with and without pruning all agree with a plain model), it
// differs from the f64 reference only on near-ties, ties go to the lowest index, pruning saves
// work; and the f16/bf16 conversion kernels match the scalar ones.
#include "core/codec_kernels.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/half.h"
#include "core/rng.h"
#include "gtest/gtest.h"

namespace fibquant::codec_internal {
namespace {

std::vector<float> GaussianBlocks(Rng& rng, size_t count, uint32_t k, double scale) {
  std::vector<float> v(count * k);
  for (auto& x : v) x = static_cast<float>(rng.Normal() * scale);
  return v;
}

// The specified f32 score and (score, index) argmin, written as plainly as possible.
uint32_t ModelNearestF32(const std::vector<float>& cw, uint32_t n, uint32_t k, const float* y) {
  uint32_t best = 0;
  float best_s = std::numeric_limits<float>::infinity();
  for (uint32_t i = 0; i < n; ++i) {
    double n2d = 0;
    for (uint32_t j = 0; j < k; ++j) n2d += static_cast<double>(cw[i * k + j]) * cw[i * k + j];
    float s = static_cast<float>(n2d);
    for (uint32_t j = 0; j < k; ++j) {
      const float m = -2.0f * y[j];
      const float p = m * cw[i * k + j];
      s = s + p;
    }
    if (s < best_s) {
      best_s = s;
      best = i;
    }
  }
  return best;
}

struct Case {
  uint32_t k;
  uint32_t n;
};

class NearestTest : public ::testing::TestWithParam<Case> {};

TEST_P(NearestTest, FastIsExactInF32AndNearTieOnlyVersusReference) {
  const auto [k, n] = GetParam();
  Rng rng(1000 + 17 * k + n);
  const double scale = 1.0 / std::sqrt(64.0);  // blocks of a unit vector in R^64
  const std::vector<float> cw = GaussianBlocks(rng, n, k, scale);
  const size_t count = 3000;
  const std::vector<float> y = GaussianBlocks(rng, count, k, scale);

  std::vector<uint32_t> model(count);
  for (size_t b = 0; b < count; ++b) model[b] = ModelNearestF32(cw, n, k, y.data() + b * k);

  for (bool prune : {false, true}) {
    const SearchTable t = SearchTable::Build(cw.data(), n, k, prune);
    for (Isa isa : {Isa::kScalar, Isa::kAvx2}) {
      std::vector<uint32_t> got(count);
      t.Nearest(y.data(), count, got.data(), isa);
      for (size_t b = 0; b < count; ++b) {
        ASSERT_EQ(got[b], model[b]) << "block " << b << " prune=" << prune
                                    << " isa=" << static_cast<int>(isa);
      }
    }
  }
  // Without the int16 screening (k = 4) and without the AVX-512 kernels: the clustered search and
  // the AVX2 brute force on a CPU that would otherwise skip them.
  for (int variant : {0, 1}) {
    SearchTable t = SearchTable::Build(cw.data(), n, k, false);
    t.DisableScreeningForTesting();
    DisableAvx512ForTesting(variant == 1);
    std::vector<uint32_t> got(count);
    t.Nearest(y.data(), count, got.data(), Isa::kAvx2);
    DisableAvx512ForTesting(false);
    for (size_t b = 0; b < count; ++b) ASSERT_EQ(got[b], model[b]) << "block " << b << " variant " << variant;
  }

  size_t mismatches = 0;
  for (size_t b = 0; b < count; ++b) {
    std::vector<double> yd(y.begin() + b * k, y.begin() + (b + 1) * k);
    const uint32_t ref = NearestReference(cw.data(), n, k, yd.data());
    if (ref != model[b]) {
      ++mismatches;
      const double dr = DistanceF64(cw.data(), k, ref, yd.data());
      const double df = DistanceF64(cw.data(), k, model[b], yd.data());
      EXPECT_LE(dr, df);  // the reference is the exact minimum
      EXPECT_LT(df - dr, 1e-4 * dr) << "block " << b << " is not a near-tie";
    }
  }
  EXPECT_LE(static_cast<double>(mismatches) / count, 0.005);
}

INSTANTIATE_TEST_SUITE_P(Shapes, NearestTest,
                         ::testing::Values(Case{1, 16}, Case{2, 16}, Case{2, 256}, Case{3, 100},
                                           Case{4, 256}, Case{4, 1000}, Case{8, 256},
                                           Case{8, 4096}, Case{12, 64}, Case{16, 37},
                                           // grid (k = 2) and clustered search (k = 3, 4)
                                           Case{2, 64}, Case{2, 1024}, Case{2, 4096}, Case{3, 1500},
                                           Case{4, 4096}),
                         [](const auto& info) {
                           return absl::StrCat("k", info.param.k, "_n", info.param.n);
                         });

// Midpoints between each codeword and its nearest neighbour are exact ties in real arithmetic, so
// rounding decides them: here the f32 search and the f64 reference do disagree, and every
// disagreement must be a near-tie (this is what the Quantizer-level bound relies on).
TEST(Nearest, DisagreementsOnConstructedTiesAreNearTies) {
  for (uint32_t k : {4u, 2u}) {  // k = 2: the grid search
  SCOPED_TRACE(absl::StrCat("k=", k));
  const uint32_t n = 256;
  Rng rng(99 + k);
  const std::vector<float> cw = GaussianBlocks(rng, n, k, 0.125);
  std::vector<float> y;
  for (uint32_t a = 0; a < n; ++a) {
    uint32_t b = a == 0 ? 1 : 0;
    double bd = std::numeric_limits<double>::infinity();
    for (uint32_t c = 0; c < n; ++c) {
      if (c == a) continue;
      double d = 0;
      for (uint32_t j = 0; j < k; ++j) d += (cw[a * k + j] - cw[c * k + j]) * (cw[a * k + j] - cw[c * k + j]);
      if (d < bd) {
        bd = d;
        b = c;
      }
    }
    for (uint32_t j = 0; j < k; ++j) y.push_back(0.5f * (cw[a * k + j] + cw[b * k + j]));
  }
  const SearchTable t = SearchTable::Build(cw.data(), n, k, false);
  std::vector<uint32_t> fast(n);
  t.Nearest(y.data(), n, fast.data(), ActiveIsa());
  size_t mismatches = 0;
  for (uint32_t q = 0; q < n; ++q) {
    std::vector<double> yd(y.begin() + q * k, y.begin() + (q + 1) * k);
    const uint32_t ref = NearestReference(cw.data(), n, k, yd.data());
    if (ref == fast[q]) continue;
    ++mismatches;
    const double dr = DistanceF64(cw.data(), k, ref, yd.data());
    const double df = DistanceF64(cw.data(), k, fast[q], yd.data());
    EXPECT_LE(dr, df);
    EXPECT_LT(df - dr, 1e-4 * dr) << "query " << q;
  }
  std::printf("constructed ties (k=%u): %zu of %u differ\n", k, mismatches, n);
  EXPECT_GT(mismatches, 0u);
  for (uint32_t q = 0; q < n; ++q) {  // and every kernel returns the specified f32 minimum
    ASSERT_EQ(fast[q], ModelNearestF32(cw, n, k, y.data() + q * k)) << "query " << q;
  }
  }
}

TEST(Nearest, TiesGoToTheLowestIndex) {
  // Codewords 1, 3 and 5 are the same point; 0, 2, 4 are farther from y.
  const uint32_t k = 4, n = 24;
  Rng rng(7);
  std::vector<float> cw = GaussianBlocks(rng, n, k, 0.1);
  for (uint32_t i = 0; i < n; ++i)
    for (uint32_t j = 0; j < k; ++j) cw[i * k + j] += 5.0f;  // all far away
  const float p[4] = {0.25f, -0.5f, 0.125f, 0.0625f};
  for (uint32_t i : {5u, 3u, 1u}) std::memcpy(&cw[i * k], p, sizeof p);
  const double yd[4] = {0.25, -0.5, 0.125, 0.0625};
  EXPECT_EQ(NearestReference(cw.data(), n, k, yd), 1u);
  for (bool prune : {false, true}) {
    const SearchTable t = SearchTable::Build(cw.data(), n, k, prune);
    for (Isa isa : {Isa::kScalar, Isa::kAvx2}) {
      uint32_t got = 99;
      t.Nearest(p, 1, &got, isa);
      EXPECT_EQ(got, 1u) << "prune=" << prune << " isa=" << static_cast<int>(isa);
    }
  }
}

TEST(Nearest, PruningVisitsFewerGroups) {
  // A radial-angular codebook: 64 shells of 64 directions in R^4.
  const uint32_t k = 4, shells = 64, dirs = 64, n = shells * dirs;
  Rng rng(11);
  std::vector<float> cw(n * k);
  for (uint32_t s = 0; s < shells; ++s) {
    for (uint32_t d = 0; d < dirs; ++d) {
      double v[4], nn = 0;
      for (double& x : v) {
        x = rng.Normal();
        nn += x * x;
      }
      for (uint32_t j = 0; j < k; ++j)
        cw[(s * dirs + d) * k + j] = static_cast<float>(v[j] / std::sqrt(nn) * (s + 0.5) / shells);
    }
  }
  const size_t count = 2000;
  const std::vector<float> y = GaussianBlocks(rng, count, k, 0.25);
  SearchTable brute = SearchTable::Build(cw.data(), n, k, false);
  SearchTable clustered = brute;
  clustered.DisableScreeningForTesting();  // the screening goes first where it runs
  brute.DisableClustersForTesting();
  brute.DisableScreeningForTesting();
  const SearchTable pruned = SearchTable::Build(cw.data(), n, k, true);
  std::vector<uint32_t> a(count), b(count);
  SearchTable::ResetGroupsVisitedOnThisThread();
  brute.Nearest(y.data(), count, a.data(), ActiveIsa());
  const uint64_t brute_groups = SearchTable::GroupsVisitedOnThisThread();
  SearchTable::ResetGroupsVisitedOnThisThread();
  pruned.Nearest(y.data(), count, b.data(), ActiveIsa());
  const uint64_t pruned_groups = SearchTable::GroupsVisitedOnThisThread();
  EXPECT_EQ(a, b);
  EXPECT_EQ(brute_groups, count * brute.group_count());
  EXPECT_LT(pruned_groups * 3, brute_groups) << "pruning visited " << pruned_groups << " of "
                                             << brute_groups << " groups";
  // The clustered search (chosen for this k and N) finds the same indices with fewer groups.
  ASSERT_TRUE(clustered.clustered());
  std::vector<uint32_t> c(count);
  SearchTable::ResetGroupsVisitedOnThisThread();
  clustered.Nearest(y.data(), count, c.data(), ActiveIsa());
  const uint64_t clustered_groups = SearchTable::GroupsVisitedOnThisThread();
  EXPECT_EQ(a, c);
  if (ActiveIsa() == Isa::kAvx2) {
    EXPECT_LT(clustered_groups * 2, brute_groups) << "clustered search visited " << clustered_groups
                                                  << " of " << brute_groups << " groups";
  }
  // The cost model (against the blocks-across-lanes brute force, which is about twice as fast per
  // codeword as the per-block kernel) turns pruning on for thin shells in R^2, where the norm
  // bound leaves a few groups, and off for a small codebook.
  const uint32_t shells2 = 512, dirs2 = 8, n2 = shells2 * dirs2;
  std::vector<float> cw2(n2 * 2);
  for (uint32_t s = 0; s < shells2; ++s) {
    for (uint32_t d = 0; d < dirs2; ++d) {
      const double phi = rng.NextDouble() * 6.283185307179586;
      const double r = (s + 0.5) / shells2;
      cw2[(s * dirs2 + d) * 2] = static_cast<float>(r * std::cos(phi));
      cw2[(s * dirs2 + d) * 2 + 1] = static_cast<float>(r * std::sin(phi));
    }
  }
  EXPECT_TRUE(SearchTable::PruningPays(cw2.data(), n2, 2));
  EXPECT_FALSE(SearchTable::PruningPays(cw.data(), 64, k));
}

// The int16 screening (k = 4, AVX-512 VNNI CPUs) is exact by its error bound: every block, however
// adversarial, gets the specified f32 minimum. Blocks: exact ties (duplicate codewords, queries on
// them), near-ties (midpoints of nearest pairs), values on the quantisation half-steps of every
// power-of-two scale the kernel can pick, and norms from 1e-7 to 1e4, alone and mixed in one call
// (the largest block sets the scale of the others), and non-finite blocks. n = 4096 takes the shell
// test (blocks sorted by norm). On a CPU without AVX-512 VNNI the same assertions check the AVX2
// kernels.
TEST(Nearest, ScreeningMatchesTheF32ModelOnAdversarialBlocks) {
  const uint32_t k = 4;
  uint64_t fallbacks = 0, blocks_run = 0;
  for (uint32_t n : {2u, 256u, 4096u}) {
    Rng rng(4242 + n);
    std::vector<float> cw = GaussianBlocks(rng, n, k, 0.125);
    // Duplicates (exact ties in every arithmetic) and codewords on half-steps of the int16 grid.
    if (n >= 256) {
      for (uint32_t i : {7u, 9u, 200u}) std::memcpy(&cw[i * k], &cw[3 * k], k * sizeof(float));
      for (uint32_t i = 100; i < 140; ++i) {
        for (uint32_t j = 0; j < k; ++j) {
          const int q = static_cast<int>(rng.NextDouble() * 64) - 32;
          cw[i * k + j] = std::ldexp(static_cast<float>(2 * q + 1), -8 - static_cast<int>(i % 12));
        }
      }
    }
    const SearchTable t = SearchTable::Build(cw.data(), n, k, false);
    std::vector<std::vector<float>> calls;
    for (double scale : {1e-7, 1e-3, 0.05, 0.2, 1.0, 100.0, 1e4}) {
      calls.push_back(GaussianBlocks(rng, 512, k, scale));
    }
    std::vector<float> mixed = GaussianBlocks(rng, 512, k, 0.05);
    for (size_t b = 0; b < 512; b += 7) mixed[b * k] *= 1000.0f;  // a few large blocks set sy
    for (size_t b = 3; b < 512; b += 11) {
      for (uint32_t j = 0; j < k; ++j) mixed[b * k + j] *= 1e-6f;
    }
    calls.push_back(mixed);
    // Non-finite and overflowing blocks send the whole call to the f32 kernel (same answers).
    std::vector<float> bad = GaussianBlocks(rng, 64, k, 0.2);
    bad[5 * k + 1] = std::numeric_limits<float>::quiet_NaN();
    bad[9 * k + 2] = std::numeric_limits<float>::infinity();
    bad[13 * k] = 1e38f;  // -2y overflows in f32
    calls.push_back(bad);
    std::vector<float> ties;
    for (uint32_t a = 0; a < n; ++a) {
      ties.insert(ties.end(), cw.begin() + a * k, cw.begin() + (a + 1) * k);  // on a codeword
      uint32_t nb = a == 0 ? 1 : 0;
      double bd = std::numeric_limits<double>::infinity();
      for (uint32_t c = 0; c < n; ++c) {
        double d = 0;
        for (uint32_t j = 0; j < k; ++j) d += std::pow(cw[a * k + j] - cw[c * k + j], 2);
        if (c != a && d < bd) {
          bd = d;
          nb = c;
        }
      }
      for (uint32_t j = 0; j < k; ++j) ties.push_back(0.5f * (cw[a * k + j] + cw[nb * k + j]));
      if (ties.size() > 2048 * k) break;
    }
    calls.push_back(ties);
    for (int e = 6; e <= 24; e += 3) {  // odd multiples of 2^-e: half-steps at some scale
      std::vector<float> h(256 * k);
      for (auto& v : h) v = std::ldexp(static_cast<float>(2 * (static_cast<int>(rng.NextDouble() * 200) - 100) + 1), -e);
      calls.push_back(h);
    }
    for (size_t c = 0; c < calls.size(); ++c) {
      const std::vector<float>& y = calls[c];
      const size_t count = y.size() / k;
      std::vector<uint32_t> got(count);
      SearchTable::ResetGroupsVisitedOnThisThread();
      t.Nearest(y.data(), count, got.data(), Isa::kAvx2);
      fallbacks += SearchTable::ScreenFallbacksOnThisThread();
      blocks_run += count;
      for (size_t b = 0; b < count; ++b) {
        ASSERT_EQ(got[b], ModelNearestF32(cw, n, k, y.data() + b * k))
            << "n=" << n << " call " << c << " block " << b;
      }
    }
  }
  std::printf("screening: %llu of %llu blocks went to the exact fallback (avx512 %d)\n",
              static_cast<unsigned long long>(fallbacks), static_cast<unsigned long long>(blocks_run),
              Avx512Active() ? 1 : 0);
  if (Avx512Active()) {
    EXPECT_GT(fallbacks, 0u);            // the ties must reach the exact stage
    EXPECT_LT(fallbacks, blocks_run);    // and most blocks must not
  }
}

TEST(Nearest, ScreenedTiesGoToTheLowestIndex) {
  const uint32_t k = 4, n = 64;
  Rng rng(8);
  std::vector<float> cw = GaussianBlocks(rng, n, k, 0.1);
  const float p[4] = {0.25f, -0.5f, 0.125f, 0.0625f};
  for (uint32_t i : {50u, 30u, 10u}) std::memcpy(&cw[i * k], p, sizeof p);
  std::vector<float> y;
  for (int r = 0; r < 64; ++r) y.insert(y.end(), p, p + 4);
  const SearchTable t = SearchTable::Build(cw.data(), n, k, false);
  std::vector<uint32_t> got(64);
  for (bool avx512 : {true, false}) {
    DisableAvx512ForTesting(!avx512);
    t.Nearest(y.data(), 64, got.data(), Isa::kAvx2);
    for (uint32_t g : got) EXPECT_EQ(g, 10u) << "avx512=" << avx512;
  }
  DisableAvx512ForTesting(false);
}

TEST(Nearest, ForcedScalarIsReported) {
  ForceScalarForTesting(true);
  EXPECT_EQ(ActiveIsa(), Isa::kScalar);
  ForceScalarForTesting(false);
}

TEST(Conversions, F16LoadMatchesScalarForEveryValue) {
  std::vector<uint8_t> in(2 * 65536);
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t v = static_cast<uint16_t>(h);
    std::memcpy(&in[2 * h], &v, 2);
  }
  for (Isa isa : {Isa::kScalar, Isa::kAvx2}) {
    std::vector<float> out(65536);
    LoadF16(in.data(), 65536, out.data(), isa);
    for (uint32_t h = 0; h < 65536; ++h) {
      const float want = HalfToFloat(static_cast<uint16_t>(h));
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(out[h])) << h;
      } else {
        uint32_t a, b;
        std::memcpy(&a, &want, 4);
        std::memcpy(&b, &out[h], 4);
        EXPECT_EQ(a, b) << "half 0x" << std::hex << h;
      }
    }
  }
}

TEST(Conversions, F16StoreMatchesScalarAndSaturates) {
  Rng rng(3);
  std::vector<float> in;
  for (int i = 0; i < 20000; ++i) {
    const double e = rng.NextDouble() * 60 - 30;  // magnitudes 2^-30 .. 2^30
    in.push_back(static_cast<float>((rng.NextDouble() < 0.5 ? -1 : 1) * std::exp2(e)));
  }
  for (float v : {0.0f, -0.0f, 65504.0f, 65519.0f, 65520.0f, 1e6f, -1e6f, 3e38f, 5.96e-8f, 2.9e-8f,
                  std::numeric_limits<float>::max(), -std::numeric_limits<float>::max()})
    in.push_back(v);
  std::vector<uint8_t> a(2 * in.size()), b(2 * in.size());
  StoreF16Saturating(in.data(), in.size(), a.data(), Isa::kScalar);
  StoreF16Saturating(in.data(), in.size(), b.data(), Isa::kAvx2);
  EXPECT_EQ(a, b);
  for (size_t i = 0; i < in.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, &a[2 * i], 2);
    const float back = HalfToFloat(h);
    EXPECT_TRUE(std::isfinite(back)) << in[i];
    if (std::fabs(in[i]) >= 65504.0f) {
      EXPECT_EQ(std::fabs(back), 65504.0f) << in[i];
    } else {
      EXPECT_EQ(h, FloatToHalf(in[i])) << in[i];
    }
  }
}

TEST(Conversions, Bf16StoreSaturates) {
  const float in[4] = {std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(), 1.0f,
                       -2.5f};
  uint8_t out[8];
  StoreBf16Saturating(in, 4, out);
  uint16_t h[4];
  std::memcpy(h, out, 8);
  EXPECT_EQ(h[0], 0x7F7F);
  EXPECT_EQ(h[1], 0xFF7F);
  EXPECT_EQ(h[2], FloatToBf16(1.0f));
  EXPECT_EQ(h[3], FloatToBf16(-2.5f));
}

}  // namespace
}  // namespace fibquant::codec_internal

namespace fibquant::codec_internal {
namespace {

// The codec's norm rule sums each vector's squares left to right in f64; the AVX2 kernel runs four
// vectors' chains side by side and must give the same bits, for every d (transpose tail included),
// every count (scalar tail included), real-scale, tiny and huge values, and propagate non-finite.
TEST(SumSquares, Avx2IsBitIdenticalToTheLeftToRightLoop) {
  Rng rng(77);
  for (uint32_t d : {1u, 3u, 4u, 7u, 64u, 100u, 128u, 300u}) {
    for (size_t count : {size_t{1}, size_t{3}, size_t{4}, size_t{9}, size_t{33}}) {
      std::vector<float> x(count * d);
      for (size_t i = 0; i < x.size(); ++i) {
        const double scale = (i % 7 == 0) ? 1e30 : (i % 5 == 0 ? 1e-30 : 1.0);
        x[i] = static_cast<float>(rng.Normal() * scale);
      }
      std::vector<double> want(count), got(count);
      for (size_t v = 0; v < count; ++v) {
        double s = 0;
        for (uint32_t i = 0; i < d; ++i) s += static_cast<double>(x[v * d + i]) * x[v * d + i];
        want[v] = s;
      }
      for (Isa isa : {Isa::kScalar, Isa::kAvx2}) {
        SumSquaresF64(x.data(), count, d, got.data(), isa);
        for (size_t v = 0; v < count; ++v) {
          ASSERT_EQ(std::memcmp(&got[v], &want[v], sizeof(double)), 0)
              << "d=" << d << " count=" << count << " v=" << v << " isa=" << static_cast<int>(isa);
        }
      }
      x[count * d - 1] = std::numeric_limits<float>::infinity();
      SumSquaresF64(x.data(), count, d, got.data(), ActiveIsa());
      EXPECT_FALSE(std::isfinite(got[count - 1]));
    }
  }
}

}  // namespace
}  // namespace fibquant::codec_internal
