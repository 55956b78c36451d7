// Quality metrics against hand-computed values on tiny inputs.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "core/digest.h"
#include "core/kv_metrics.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

const double kE = std::exp(1.0);
const double kP0 = kE / (kE + 1.0);  // softmax([1, 0])[0]
const double kP1 = 1.0 / (kE + 1.0);

TEST(KvMetrics, KeyPageHandComputed) {
  const std::vector<float> k = {1, 0}, kh = {1, 1}, q = {1};
  auto m = EvaluateKeyQuality(k.data(), kh.data(), 2, 1, q.data(), 1, 1);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->query_source, KvQuerySource::kCaller);
  EXPECT_EQ(m->queries, 1u);
  EXPECT_DOUBLE_EQ(m->reconstruction_mse, 0.5);
  EXPECT_NEAR(m->cosine_similarity, 1.0 / std::sqrt(2.0), 1e-15);
  EXPECT_NEAR(*m->key_logit_mse, 0.5, 1e-15);
  EXPECT_NEAR(*m->attention_tv, kP0 - 0.5, 1e-15);
  EXPECT_NEAR(*m->attention_kl, kP0 * std::log(kP0 / 0.5) + kP1 * std::log(kP1 / 0.5), 1e-14);
  // Top-1 of l^ = [1, 1] is the tie broken by the lower index: token 0, same as l.
  EXPECT_EQ(*m->topk_disagreement, 0.0);
  EXPECT_FALSE(m->value_aggregation_mse.has_value());
}

TEST(KvMetrics, KeyTopKDisagreementCounted) {
  const std::vector<float> k = {1, 0}, kh = {0, 1}, q = {1};
  auto m = EvaluateKeyQuality(k.data(), kh.data(), 2, 1, q.data(), 1, 1);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(*m->topk_disagreement, 1.0);
  auto m2 = EvaluateKeyQuality(k.data(), kh.data(), 2, 1, q.data(), 1, 2);  // k' = T: everything agrees
  ASSERT_TRUE(m2.ok());
  EXPECT_EQ(*m2->topk_disagreement, 0.0);
  EXPECT_NEAR(*m->attention_tv, kP0 - kP1, 1e-15);
}

TEST(KvMetrics, KeyProxyUsesOwnKeys) {
  // Queries = the original keys [1] and [0]. q=[0] gives equal logits on both sides.
  const std::vector<float> k = {1, 0}, kh = {1, 1};
  auto m = EvaluateKeyQuality(k.data(), kh.data(), 2, 1, nullptr, 0, 1);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->query_source, KvQuerySource::kProxySelfKeys);
  EXPECT_EQ(m->queries, 2u);
  EXPECT_NEAR(*m->key_logit_mse, (0.5 + 0.0) / 2, 1e-15);
  EXPECT_NEAR(*m->attention_tv, (kP0 - 0.5) / 2, 1e-15);
}

TEST(KvMetrics, ValueCallerAttention) {
  const std::vector<float> v = {1, 0}, vh = {1, 1}, q = {1}, keys = {1, 0};
  auto m = EvaluateValueQuality(v.data(), vh.data(), 2, 1, q.data(), 1, keys.data());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->query_source, KvQuerySource::kCaller);
  EXPECT_NEAR(*m->value_aggregation_mse, kP1 * kP1, 1e-15);  // o = p0, o^ = 1
  EXPECT_FALSE(m->attention_tv.has_value());
}

TEST(KvMetrics, ValueProxySelfAttention) {
  const std::vector<float> v = {1, 0}, vh = {1, 1};
  auto m = EvaluateValueQuality(v.data(), vh.data(), 2, 1, nullptr, 0, nullptr);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->query_source, KvQuerySource::kProxySelfValues);
  // q = 1: p = (p0, p1), error p1; q = 0: p = (1/2, 1/2), error 1/2.
  EXPECT_NEAR(*m->value_aggregation_mse, (kP1 * kP1 + 0.25) / 2, 1e-15);
}

TEST(KvMetrics, PerfectReconstructionIsZero) {
  std::vector<float> k(4 * 8);
  for (size_t i = 0; i < k.size(); ++i) k[i] = std::sin(0.3f * static_cast<float>(i));
  auto m = EvaluateKeyQuality(k.data(), k.data(), 4, 8, nullptr, 0, 2);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->reconstruction_mse, 0.0);
  EXPECT_EQ(*m->attention_tv, 0.0);
  EXPECT_EQ(*m->key_logit_mse, 0.0);
  EXPECT_EQ(*m->topk_disagreement, 0.0);
  EXPECT_NEAR(m->cosine_similarity, 1.0, 1e-15);
}

TEST(KvMetrics, RejectsBadInput) {
  const std::vector<float> k = {1, NAN}, kh = {1, 1};
  EXPECT_EQ(EvaluateKeyQuality(k.data(), kh.data(), 2, 1, nullptr, 0, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EvaluateKeyQuality(kh.data(), kh.data(), 0, 1, nullptr, 0, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(KvMetrics, AccumulatorWeightsByTokens) {
  KvQualityMetrics a, b;
  a.tokens = 1;
  a.reconstruction_mse = 1.0;
  a.cosine_similarity = 0.5;
  a.attention_tv = 0.1;
  a.query_source = KvQuerySource::kProxySelfKeys;
  b.tokens = 3;
  b.reconstruction_mse = 5.0;
  b.cosine_similarity = 0.9;
  b.attention_tv = 0.3;
  b.query_source = KvQuerySource::kProxySelfKeys;
  KvQualityAccumulator acc;
  acc.Add(a);
  acc.Add(b);
  const KvQualityMetrics mean = acc.Mean(), mx = acc.Max();
  EXPECT_DOUBLE_EQ(mean.reconstruction_mse, 4.0);
  EXPECT_DOUBLE_EQ(*mean.attention_tv, 0.25);
  EXPECT_EQ(mean.tokens, 4u);
  EXPECT_EQ(mean.query_source, KvQuerySource::kProxySelfKeys);
  EXPECT_DOUBLE_EQ(mx.reconstruction_mse, 5.0);
  EXPECT_DOUBLE_EQ(mx.cosine_similarity, 0.5);  // worst cosine
  EXPECT_DOUBLE_EQ(*mx.attention_tv, 0.3);
  EXPECT_FALSE(mean.value_aggregation_mse.has_value());
}

// Bit-exactness pin: metrics are digested by receipts, so a refactor of the arithmetic must not move a
// single bit. Real keys (tests/data/L1_k.f32 as 256 vectors of 128) against a fixed perturbation,
// proxy and caller queries, every metric printed as a hex float and hashed.
TEST(KvMetrics, GoldenBitsOnRealKeys) {
  std::ifstream fk(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32", std::ios::binary);
  std::ifstream fq(std::string(FQ_TEST_DATA_DIR) + "/L1_q.f32", std::ios::binary);
  if (!fk || !fq) GTEST_SKIP() << "fixture missing";
  std::vector<float> k(64 * 4 * 128), q(k.size());
  fk.read(reinterpret_cast<char*>(k.data()), static_cast<std::streamsize>(k.size() * 4));
  fq.read(reinterpret_cast<char*>(q.data()), static_cast<std::streamsize>(q.size() * 4));
  ASSERT_TRUE(fk && fq);
  std::vector<float> kh = k;
  for (size_t i = 0; i < kh.size(); ++i) kh[i] += 0.01f * static_cast<float>((i * 7919) % 13) - 0.06f;
  std::string text;
  for (int rep = 0; rep < 2; ++rep) {
    auto m = EvaluateKeyQuality(k.data(), kh.data(), 256, 128, rep ? q.data() : nullptr, rep ? 64 : 0, 8);
    auto v = EvaluateValueQuality(k.data(), kh.data(), 256, 128, rep ? q.data() : nullptr, rep ? 64 : 0,
                                  rep ? q.data() : nullptr);
    ASSERT_TRUE(m.ok() && v.ok());
    char buf[512];
    std::snprintf(buf, sizeof buf, "%a %a %a %a %a %a %a\n", m->reconstruction_mse, m->cosine_similarity,
                  *m->key_logit_mse, *m->attention_tv, *m->attention_kl, *m->topk_disagreement,
                  *v->value_aggregation_mse);
    text += buf;
  }
  EXPECT_EQ(Sha256Digest(text), "sha256:c3ad6f1b91f443b28681dfe0f8678766bbb9b6ac06690cf4e8119ef889ae0f20") << text;
}

}  // namespace
}  // namespace fibquant
