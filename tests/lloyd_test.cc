// Tests for the Lloyd-Max core on raw arrays: the pruned parallel nearest search equals the
// brute-force scan (indices, distances, ties), empty-cell repair, fail_closed, thread-count
// invariance and the non-worsening guarantee.
#include <cmath>
#include <cstring>
#include <vector>

#include "core/lloyd.h"
#include "core/radii.h"
#include "core/rng.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

std::vector<double> RandomBall(size_t n, uint32_t k, uint64_t seed, double scale) {
  absl::StatusOr<std::vector<double>> s = SphericalBetaSamples(k + 6, k, n, seed);
  EXPECT_TRUE(s.ok());
  for (double& v : *s) v *= scale;
  return *s;
}

void ExpectMatchesBruteForce(const std::vector<double>& samples, const std::vector<double>& cw,
                             uint32_t k, int threads) {
  const size_t m = samples.size() / k;
  const uint32_t n = static_cast<uint32_t>(cw.size() / k);
  std::vector<uint32_t> idx(m);
  std::vector<double> dist(m);
  AssignNearest(samples.data(), m, cw.data(), n, k, threads, idx.data(), dist.data());
  for (size_t i = 0; i < m; ++i) {
    const Nearest want = NearestCodewordBruteForce(&samples[i * k], cw.data(), n, k);
    ASSERT_EQ(idx[i], want.index) << "sample " << i << " k=" << k;
    ASSERT_EQ(std::memcmp(&dist[i], &want.distance, sizeof(double)), 0) << "sample " << i;
  }
}

TEST(NearestSearch, MatchesBruteForce) {
  for (uint32_t k : {1u, 2u, 3u, 4u, 5u, 8u}) {
    for (uint32_t n : {2u, 17u, 256u}) {
      const std::vector<double> cw = RandomBall(n, k, 100 + k * 7 + n, 1.0);
      const std::vector<double> samples = RandomBall(3000, k, 900 + k + n, 1.1);
      ExpectMatchesBruteForce(samples, cw, k, 2);
    }
  }
}

TEST(NearestSearch, TiesPickLowestIndex) {
  // Duplicated codewords and samples exactly on them and exactly between two of them.
  const uint32_t k = 2;
  std::vector<double> cw = {0.5, 0, -0.5, 0, 0.5, 0, 0, 0.5, -0.5, 0, 0, 0.5};
  std::vector<double> samples = {0.5, 0, -0.5, 0, 0, 0, 0, 0.5, 0.25, 0.25, 0, -0.5};
  ExpectMatchesBruteForce(samples, cw, k, 1);
  std::vector<uint32_t> idx(6);
  std::vector<double> dist(6);
  AssignNearest(samples.data(), 6, cw.data(), 6, k, 1, idx.data(), dist.data());
  EXPECT_EQ(idx[0], 0u);
  EXPECT_EQ(idx[1], 1u);
  EXPECT_EQ(idx[2], 0u);  // equidistant from all of them: lowest index
  EXPECT_EQ(idx[3], 3u);
}

LloydParams Params(uint32_t k, uint32_t restarts, uint32_t iters, int threads) {
  LloydParams p;
  p.block_dim = k;
  p.restarts = restarts;
  p.iterations = iters;
  p.threads = threads;
  return p;
}

TEST(Lloyd, EmptyCellRepairReferenceCase) {
  const std::vector<double> c0 = {0, 0, 10, 0, 20, 0};
  const std::vector<double> samples = {0, 0, 1, 0, 2, 0, 10, 0, 10.1, 0};
  absl::StatusOr<LloydResult> r = RunLloyd(c0, samples, Params(2, 1, 1, 1), nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->report.repair_events.size(), 1u);
  const RepairEvent& e = r->report.repair_events[0];
  EXPECT_EQ(e.restart, 0u);
  EXPECT_EQ(e.iteration, 0u);
  EXPECT_EQ(e.empty_cell, 2u);
  EXPECT_EQ(e.donor_cell, 0u);
  EXPECT_EQ(e.donor_count_before, 3u);
  EXPECT_GT(e.donor_distortion, 1.0);
  EXPECT_DOUBLE_EQ(e.donor_distortion, 5.0);  // 0 + 1 + 4 against the old codeword (0,0)
  EXPECT_DOUBLE_EQ(e.residual_norm, 1.0);     // far point (2,0) minus the new centroid (1,0)
  // Donor and empty cell straddle the centroid (1,0) along the residual.
  const std::vector<double>& c = r->codewords;
  EXPECT_DOUBLE_EQ(c[0], 1.0 - 1e-6);
  EXPECT_DOUBLE_EQ(c[4], 1.0 + 1e-6);
  EXPECT_DOUBLE_EQ(c[2], 10.05);
  EXPECT_LE(r->report.best_mse, r->report.init_mse);
}

TEST(Lloyd, FailClosedRejectsEmptyCell) {
  const std::vector<double> c0 = {0, 0, 10, 0, 20, 0};
  const std::vector<double> samples = {0, 0, 1, 0, 2, 0, 10, 0, 10.1, 0};
  LloydParams p = Params(2, 1, 1, 1);
  p.empty_cell_policy = EmptyCellPolicy::kFailClosed;
  absl::StatusOr<LloydResult> r = RunLloyd(c0, samples, p, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
}

TEST(Lloyd, RejectsBadSizes) {
  EXPECT_EQ(RunLloyd({0, 0, 1}, {0, 0}, Params(2, 1, 1, 1), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RunLloyd({0, 0, 1, 1}, {0, 0}, Params(2, 1, 1, 1), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);  // fewer samples than codewords
  EXPECT_EQ(RunLloyd({0, 0, 1, 1}, {0, 0, 1, 1}, Params(2, 2, 1, 1), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);  // restarts > 1 without a start function
}

absl::StatusOr<LloydResult> TrainRandom(uint32_t k, uint32_t n, size_t m, int threads) {
  const std::vector<double> c0 = RandomBall(n, k, 5, 0.3);
  const std::vector<double> samples = *SphericalBetaSamples(4 * k + 8, k, m, 77);
  auto restart = [&](uint32_t r) -> absl::StatusOr<std::vector<double>> {
    std::vector<double> c = c0;
    for (size_t i = 0; i < c.size(); ++i) c[i] = (i + r) % 2 ? -c[i] : c[i];
    return c;
  };
  return RunLloyd(c0, samples, Params(k, 3, 6, threads), restart);
}

TEST(Lloyd, ThreadCountInvariantAndNeverWorse) {
  for (uint32_t k : {2u, 4u}) {
    absl::StatusOr<LloydResult> a = TrainRandom(k, 64, 9000, 1);
    absl::StatusOr<LloydResult> b = TrainRandom(k, 64, 9000, 2);
    absl::StatusOr<LloydResult> c = TrainRandom(k, 64, 9000, 3);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok());
    ASSERT_EQ(a->codewords.size(), b->codewords.size());
    EXPECT_EQ(std::memcmp(a->codewords.data(), b->codewords.data(), a->codewords.size() * 8), 0);
    EXPECT_EQ(std::memcmp(a->codewords.data(), c->codewords.data(), a->codewords.size() * 8), 0);
    EXPECT_EQ(a->report, b->report);
    EXPECT_EQ(a->report, c->report);
    EXPECT_LT(a->report.best_mse, a->report.init_mse);
    // The reported MSE is the brute-force MSE of the kept codebook.
    const std::vector<double> samples = *SphericalBetaSamples(4 * k + 8, k, 9000, 77);
    double total = 0;
    for (size_t i = 0; i < 9000; ++i) {
      total += NearestCodewordBruteForce(&samples[i * k], a->codewords.data(), 64, k).distance;
    }
    EXPECT_EQ(total / 9000, a->report.best_mse);
  }
}

// The sequential brute-force reference of the documented algorithm (no repair needed here).
std::vector<double> ReferenceLloyd(std::vector<double> c, const std::vector<double>& samples,
                                   uint32_t k, uint32_t iters) {
  const uint32_t n = static_cast<uint32_t>(c.size() / k);
  const size_t m = samples.size() / k;
  for (uint32_t it = 0; it < iters; ++it) {
    std::vector<double> sum(c.size(), 0.0);
    std::vector<uint64_t> count(n, 0);
    for (size_t i = 0; i < m; ++i) {
      const uint32_t a = NearestCodewordBruteForce(&samples[i * k], c.data(), n, k).index;
      ++count[a];
      for (uint32_t t = 0; t < k; ++t) sum[a * k + t] += samples[i * k + t];
    }
    for (uint32_t j = 0; j < n; ++j) {
      EXPECT_GT(count[j], 0u);
      for (uint32_t t = 0; t < k; ++t) c[j * k + t] = sum[j * k + t] / static_cast<double>(count[j]);
    }
  }
  return c;
}

TEST(Lloyd, BitIdenticalToSequentialBruteForce) {
  for (uint32_t k : {1u, 3u, 8u}) {
    const uint32_t n = k == 1 ? 8 : 32;
    const std::vector<double> samples = *SphericalBetaSamples(4 * k + 8, k, 6000, 11 + k);
    const std::vector<double> c0(samples.begin(), samples.begin() + n * k);  // data-initialised
    absl::StatusOr<LloydResult> r = RunLloyd(c0, samples, Params(k, 1, 12, 2), nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_TRUE(r->report.repair_events.empty());
    const std::vector<double> want = ReferenceLloyd(c0, samples, k, 12);
    EXPECT_EQ(std::memcmp(r->codewords.data(), want.data(), want.size() * 8), 0) << "k=" << k;
  }
}

TEST(Lloyd, BaselineKernelMatchesAvx2) {
  const std::vector<double> samples = *SphericalBetaSamples(40, 8, 5000, 3);
  const std::vector<double> c0(samples.begin(), samples.begin() + 64 * 8);
  absl::StatusOr<LloydResult> a = RunLloyd(c0, samples, Params(8, 1, 8, 2), nullptr);
  const bool before = SetLloydAvx2ForTesting(false);
  absl::StatusOr<LloydResult> b = RunLloyd(c0, samples, Params(8, 1, 8, 2), nullptr);
  std::vector<uint32_t> idx(5000);
  std::vector<double> dist(5000);
  AssignNearest(samples.data(), 5000, c0.data(), 64, 8, 1, idx.data(), dist.data());
  SetLloydAvx2ForTesting(before);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(std::memcmp(a->codewords.data(), b->codewords.data(), a->codewords.size() * 8), 0);
  EXPECT_EQ(a->report, b->report);
  for (size_t i = 0; i < 5000; ++i) {
    const Nearest want = NearestCodewordBruteForce(&samples[i * 8], c0.data(), 64, 8);
    ASSERT_EQ(idx[i], want.index);
    ASSERT_EQ(dist[i], want.distance);
  }
}

TEST(Lloyd, PlainSearchMatchesBoundedSearch) {
  for (uint32_t k : {1u, 2u, 8u}) {
    const std::vector<double> samples = *SphericalBetaSamples(40, k, 6000, 21 + k);
    const std::vector<double> c0(samples.begin(), samples.begin() + 100 * k);
    absl::StatusOr<LloydResult> a = RunLloyd(c0, samples, Params(k, 1, 10, 2), nullptr);
    const bool before = SetLloydPlainSearchForTesting(true);
    absl::StatusOr<LloydResult> b = RunLloyd(c0, samples, Params(k, 1, 10, 2), nullptr);
    SetLloydPlainSearchForTesting(before);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(std::memcmp(a->codewords.data(), b->codewords.data(), a->codewords.size() * 8), 0)
        << "k=" << k;
    EXPECT_EQ(a->report, b->report);
  }
}

}  // namespace
}  // namespace fibquant

namespace fibquant {
namespace {

// Issue 14 item 8: a build must stop when its token is cancelled (shutdown at the drain deadline,
// a caller that went away), not run its remaining iterations. The cancellation here is raised by
// the restart-1 start function, so the point where it lands is deterministic: the next check is
// the first iteration of restart 1, and the thousands of iterations after it never run.
TEST(Lloyd, CancelTokenStopsTheLoopAtTheNextIteration) {
  const std::vector<double> c0 = RandomBall(16, 2, 5, 0.3);
  const std::vector<double> samples = *SphericalBetaSamples(8, 2, 4000, 77);
  CancelToken token;
  int restarts_started = 0;
  auto restart = [&](uint32_t r) -> absl::StatusOr<std::vector<double>> {
    ++restarts_started;
    if (r == 1) token.Cancel();
    return c0;
  };
  LloydParams p = Params(2, 1000, 3, 1);
  p.cancel = &token;
  absl::StatusOr<LloydResult> r = RunLloyd(c0, samples, p, restart);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_NE(r.status().message().find("restart 1, iteration 0"), std::string::npos) << r.status();
  EXPECT_EQ(restarts_started, 1);
  // An uncancelled token changes nothing.
  CancelToken idle;
  LloydParams q = Params(2, 2, 3, 1);
  absl::StatusOr<LloydResult> a = RunLloyd(c0, samples, q, restart);
  q.cancel = &idle;
  absl::StatusOr<LloydResult> b = RunLloyd(c0, samples, q, restart);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->codewords, b->codewords);
}

TEST(Lloyd, CancelledTokenStopsCodebookBuildBeforeTraining) {
  Profile p = *Profile::PaperDefault(64, 2, 256, 7, kRotationHadamard);
  CancelToken token;
  token.Cancel();
  absl::StatusOr<Codebook> cb = Codebook::Build(p, 1, &token);
  EXPECT_EQ(cb.status().code(), absl::StatusCode::kCancelled) << cb.status();
}

}  // namespace
}  // namespace fibquant
