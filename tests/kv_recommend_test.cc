// RecommendKvProfile on decoder-like synthetic keys (bench/decoder_synth.h): calibration on the first
// tokens only, ranking, the best candidate marked, a budget no candidate meets (an answer, not an
// error), min_ratio, cancellation and request validation.
#include <atomic>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/decoder_synth.h"
#include "core/kv_codec.h"
#include "core/kv_recommend.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

using absl::StatusCode;

struct Sample {
  KvTensorShape shape;
  std::vector<float> k, q;  // canonical [1, 1, heads, tokens, d] / [1, 1, qheads, tokens, d]
};

// One KV head (and its 4 query heads) of the decoder-like generator, 512 tokens, d = 64.
Sample MakeSample() {
  bench::DecoderSynthOptions o;
  o.head_dim = 64;
  o.kv_heads = 1;
  o.sequences = 4;
  o.seq_tokens = 128;
  const bench::DecoderSynth s = bench::MakeDecoderSynth(o);
  Sample out;
  out.shape.role = KvRole::kKey;
  out.shape.attention_kind = KvAttentionKind::kGqa;
  out.shape.batch = out.shape.layers = out.shape.kv_heads = 1;
  out.shape.query_heads = s.q_heads();
  out.shape.tokens = static_cast<uint32_t>(s.tokens());
  out.shape.head_dim = o.head_dim;
  out.shape.rope_state = KvRopeState::kPostRope;
  out.k = s.k;  // one KV head: [tokens, 1, d] is already canonical
  const size_t T = s.tokens(), QH = s.q_heads(), d = o.head_dim;
  out.q.resize(s.q.size());
  for (size_t t = 0; t < T; ++t) {
    for (size_t h = 0; h < QH; ++h) {
      for (size_t i = 0; i < d; ++i) out.q[(h * T + t) * d + i] = s.q[(t * QH + h) * d + i];
    }
  }
  return out;
}

KvRecommendRequest Request(const Sample& s) {
  KvRecommendRequest r;
  r.sample_shape = s.shape;
  r.values = s.k;
  r.queries = s.q;
  r.training_samples = 4096;
  r.lloyd_restarts = 1;
  r.lloyd_iterations = 8;
  r.candidates = {{2, 16, KvCentering::kNone, false},
                  {2, 16, KvCentering::kNone, true},
                  {2, 16, KvCentering::kPage, false},
                  {8, 256, KvCentering::kNone, true},
                  {2, 64, KvCentering::kNone, true}};
  return r;
}

const KvRecommendedProfile* Find(const KvRecommendation& rec, const std::string& id) {
  for (const auto& p : rec.ranked) {
    if (p.profile_id == id) return &p;
  }
  return nullptr;
}

TEST(KvRecommend, RanksCalibratedCandidatesAndMarksTheBest) {
  const Sample s = MakeSample();
  KvRecommendRequest r = Request(s);
  r.budget.max_attention_tv = 0.2;
  auto rec = RecommendKvProfile(r);
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_EQ(rec->calibration_tokens, 256u);
  EXPECT_EQ(rec->evaluation_tokens, 256u);
  EXPECT_EQ(rec->calibration.sample_vectors, 256u);
  ASSERT_EQ(rec->ranked.size(), 5u);
  const auto* plain = Find(*rec, "recommended.k2n16");
  const auto* cal = Find(*rec, "recommended.k2n16.cal");
  ASSERT_TRUE(plain && cal);
  // Same bytes; the calibrated transform removes the outlier offsets: lower attention error.
  EXPECT_EQ(plain->measurement.compression_ratio, cal->measurement.compression_ratio);
  EXPECT_LT(*cal->measurement.mean.attention_tv, *plain->measurement.mean.attention_tv);
  // Qualifying candidates come first, by ratio.
  bool seen_fail = false;
  for (size_t i = 0; i < rec->ranked.size(); ++i) {
    if (!rec->ranked[i].qualifies) seen_fail = true;
    EXPECT_FALSE(seen_fail && rec->ranked[i].qualifies) << i;
    if (i > 0 && rec->ranked[i].qualifies) {
      EXPECT_LE(rec->ranked[i].measurement.compression_ratio, rec->ranked[i - 1].measurement.compression_ratio);
    }
  }
  ASSERT_TRUE(rec->best.has_value()) << rec->summary;
  const KvRecommendedProfile& best = rec->ranked[*rec->best];
  EXPECT_TRUE(best.qualifies);
  EXPECT_LE(*best.measurement.max.attention_tv, 0.2);
  EXPECT_NE(rec->summary.find(best.profile_id), std::string::npos);
  // The spec is ready to register: it validates, names the calibration and builds with it.
  auto p = KvCompressionProfile::FromSpecJson(best.spec_json);
  ASSERT_TRUE(p.ok()) << p.status();
  if (best.candidate.calibrated) {
    EXPECT_EQ(p->calibration_digest, rec->calibration.digest);
    auto codec = KvCodec::Build(*p, 1, nullptr, std::make_shared<const KvCalibration>(rec->calibration));
    EXPECT_TRUE(codec.ok()) << codec.status();
  }
}

TEST(KvRecommend, RatioIsAgainstTheTargetDtype) {
  const Sample s = MakeSample();
  KvRecommendRequest r = Request(s);
  r.candidates = {{2, 16, KvCentering::kNone, true}};
  auto f32 = RecommendKvProfile(r);
  KvTensorShape t = s.shape;
  t.dtype = DType::kF16;
  t.tokens = 4096;
  r.target_shape = t;
  auto f16 = RecommendKvProfile(r);
  ASSERT_TRUE(f32.ok() && f16.ok()) << f16.status();
  // Same codes; the f16 input is half the bytes.
  EXPECT_NEAR(f16->ranked[0].measurement.compression_ratio, f32->ranked[0].measurement.compression_ratio / 2, 1e-9);
  EXPECT_NE(f16->ranked[0].spec_json.find("\"tokens\": 4096"), std::string::npos) << f16->ranked[0].spec_json;
  EXPECT_NE(f16->ranked[0].spec_json.find("\"dtype\": \"f16\""), std::string::npos);
}

TEST(KvRecommend, ValueSamplesUseQueriesAndKeysForTheMetrics) {
  Sample s = MakeSample();
  bench::DecoderSynthOptions o;
  o.head_dim = 64;
  o.kv_heads = 1;
  o.sequences = 4;
  o.seq_tokens = 128;
  const bench::DecoderSynth d = bench::MakeDecoderSynth(o);
  KvTensorShape vs = s.shape;
  vs.role = KvRole::kValue;
  vs.rope_state = KvRopeState::kNotApplicable;
  KvRecommendRequest r = Request(s);
  r.sample_shape = vs;
  r.values = d.v;
  r.keys = s.k;
  r.budget.max_value_aggregation_mse = 1.0;
  auto rec = RecommendKvProfile(r);
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_TRUE(rec->calibration.query_second_moment.empty());  // values: channels weighted equally
  ASSERT_FALSE(rec->ranked.empty());
  EXPECT_TRUE(rec->ranked[0].measurement.max.value_aggregation_mse.has_value());
  EXPECT_EQ(rec->ranked[0].measurement.mean.query_source, KvQuerySource::kCaller);
}

TEST(KvRecommend, ImpossibleBudgetIsAnAnswerNotAnError) {
  const Sample s = MakeSample();
  KvRecommendRequest r = Request(s);
  r.budget.max_attention_tv = 1e-9;
  auto rec = RecommendKvProfile(r);
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_FALSE(rec->best.has_value());
  EXPECT_NE(rec->summary.find("no candidate meets the budget"), std::string::npos) << rec->summary;
  for (const auto& c : rec->ranked) {
    EXPECT_FALSE(c.qualifies);
    EXPECT_NE(c.reason.find("attention_tv"), std::string::npos) << c.reason;
  }
  // A ratio floor no candidate reaches.
  r.budget = {};
  r.min_ratio = 1000;
  rec = RecommendKvProfile(r);
  ASSERT_TRUE(rec.ok());
  EXPECT_FALSE(rec->best.has_value());
  EXPECT_NE(rec->ranked[0].reason.find("min_ratio"), std::string::npos);
}

TEST(KvRecommend, CancelAndValidation) {
  const Sample s = MakeSample();
  KvRecommendRequest r = Request(s);
  r.cancelled = [] { return true; };
  EXPECT_EQ(RecommendKvProfile(r).status().code(), StatusCode::kCancelled);
  r.cancelled = nullptr;
  r.check_profile = [](const KvCompressionProfile& p) {
    return p.fib_profile->codebook_size > 16 ? absl::ResourceExhaustedError("too costly") : absl::OkStatus();
  };
  auto limited = RecommendKvProfile(r);
  EXPECT_EQ(limited.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(limited.status().message().find("recommended.k8n256.cal: too costly"), std::string::npos) << limited.status();
  r.check_profile = nullptr;
  r.deadline = std::chrono::steady_clock::now() - std::chrono::seconds(1);
  EXPECT_EQ(RecommendKvProfile(r).status().code(), StatusCode::kDeadlineExceeded);
  r.deadline.reset();
  r.calibration_fraction = 1.0;
  EXPECT_EQ(RecommendKvProfile(r).status().code(), StatusCode::kInvalidArgument);
  r.calibration_fraction = 0.5;
  r.values = absl::MakeConstSpan(s.k).subspan(1);
  EXPECT_EQ(RecommendKvProfile(r).status().code(), StatusCode::kInvalidArgument);
  r.values = s.k;
  r.budget.max_value_aggregation_mse = 1;  // not measurable on keys
  EXPECT_EQ(RecommendKvProfile(r).status().code(), StatusCode::kInvalidArgument);
  r.budget = {};
  r.candidates.assign(kMaxRecommendCandidates + 1, {2, 16, KvCentering::kNone, false});
  EXPECT_EQ(RecommendKvProfile(r).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fibquant
