// KV shape, page geometry and compression profile: every validation rule with its status code,
// canonical digests, JSON round trips and the spec form.
#include <string>
#include <vector>

#include "core/kv_profile.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include <nlohmann/json.hpp>

namespace fibquant {
namespace {

using absl::StatusCode;
using ::testing::HasSubstr;

std::string FakeDigest(char c) {
  std::string s = "sha256:";
  s.append(64, c);
  return s;
}

KvTensorShape KeyShape() {
  KvTensorShape s;
  s.role = KvRole::kKey;
  s.attention_kind = KvAttentionKind::kGqa;
  s.batch = 1;
  s.layers = 2;
  s.kv_heads = 2;
  s.query_heads = 4;
  s.tokens = 12;
  s.head_dim = 16;
  s.dtype = DType::kF32;
  s.rope_state = KvRopeState::kPostRope;
  return s;
}

// Pinned in docs/format/kv.md.
constexpr const char* kShapeGolden = "sha256:57295b15160b20ac5938da7f406d8a5365abe0bf04c42b755451de77c9234c53";
constexpr const char* kRawProfileGolden = "sha256:9ba3a60813846e13844a43d44c94244f7f8679fc79b9188a387cb2756e792a1b";

constexpr const char* kSpec = R"({
  "profile_id": "test.key.per_token",
  "shape": {"role": "key", "attention_kind": "gqa", "batch": 1, "layers": 2, "kv_heads": 2,
            "query_heads": 4, "tokens": 12, "head_dim": 16, "dtype": "f32", "rope_state": "post_rope"},
  "axis_policy": "per_token",
  "tokens_per_page": 8,
  "fibquant": {"block_dim": 4, "codebook_size": 16, "seed": 7, "training_samples": 300,
               "lloyd_restarts": 1, "lloyd_iterations": 3},
  "protected": {"first_tokens_raw": 1, "raw_layers": [1]},
  "quality_budget": {"max_attention_tv": 0.5}
})";

KvCompressionProfile SpecProfile() {
  auto p = KvCompressionProfile::FromSpecJson(kSpec);
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

// A resolved profile (digests filled in as a codec would) for digest/JSON tests.
KvCompressionProfile Resolved() {
  KvCompressionProfile p = SpecProfile();
  p.codebook_digest = FakeDigest('a');
  p.rotation_digest = FakeDigest('b');
  return p;
}

TEST(KvShape, ValidShapeAndCounts) {
  const KvTensorShape s = KeyShape();
  ASSERT_TRUE(s.Validate().ok());
  EXPECT_EQ(s.vector_count(), 1u * 2 * 2 * 12);
  EXPECT_EQ(s.element_count(), 1u * 2 * 2 * 12 * 16);
  EXPECT_EQ(s.VectorOffset(0, 1, 1, 3), (((0u * 2 + 1) * 2 + 1) * 12 + 3) * 16);
}

TEST(KvShape, ZeroCountsRejected) {
  for (uint32_t KvTensorShape::*f : {&KvTensorShape::batch, &KvTensorShape::layers, &KvTensorShape::kv_heads,
                                     &KvTensorShape::query_heads, &KvTensorShape::tokens, &KvTensorShape::head_dim}) {
    KvTensorShape s = KeyShape();
    s.*f = 0;
    EXPECT_EQ(s.Validate().code(), StatusCode::kInvalidArgument);
  }
}

TEST(KvShape, HeadDimLimit) {
  KvTensorShape s = KeyShape();
  s.head_dim = kMaxKvHeadDim + 1;
  EXPECT_EQ(s.Validate().code(), StatusCode::kResourceExhausted);
}

TEST(KvShape, AttentionKindRules) {
  KvTensorShape s = KeyShape();
  s.attention_kind = KvAttentionKind::kMha;  // query_heads 4 != kv_heads 2
  EXPECT_EQ(s.Validate().code(), StatusCode::kInvalidArgument);
  s.query_heads = 2;
  EXPECT_TRUE(s.Validate().ok());
  s.attention_kind = KvAttentionKind::kMqa;  // kv_heads must be 1
  EXPECT_EQ(s.Validate().code(), StatusCode::kInvalidArgument);
  s.kv_heads = 1;
  EXPECT_TRUE(s.Validate().ok());
  s = KeyShape();
  s.query_heads = 5;  // gqa: 5 % 2 != 0
  EXPECT_EQ(s.Validate().code(), StatusCode::kInvalidArgument);
}

TEST(KvShape, RopeStateMustMatchRole) {
  KvTensorShape s = KeyShape();
  s.rope_state = KvRopeState::kNotApplicable;
  EXPECT_EQ(s.Validate().code(), StatusCode::kInvalidArgument);
  s.role = KvRole::kValue;
  EXPECT_TRUE(s.Validate().ok());
  s.rope_state = KvRopeState::kPreRope;
  EXPECT_EQ(s.Validate().code(), StatusCode::kInvalidArgument);
}

TEST(KvShape, ElementCountLimit) {
  KvTensorShape s = KeyShape();
  s.batch = 0xFFFFFFFFu;
  s.layers = 0xFFFFFFFFu;
  s.tokens = 0xFFFFFFFFu;
  EXPECT_EQ(s.Validate().code(), StatusCode::kResourceExhausted);  // overflows u64
  s = KeyShape();
  s.tokens = 1u << 30;
  s.layers = 1u << 10;
  EXPECT_EQ(s.Validate().code(), StatusCode::kResourceExhausted);  // > kMaxKvElements
}

TEST(KvShape, DigestGoldenAndJsonRoundTrip) {
  const KvTensorShape s = KeyShape();
  auto bytes = s.CanonicalBytes();
  ASSERT_TRUE(bytes.ok());
  // Built by hand from docs/format/kv.md: domain, 0x00, Str role, Str kind, six u32, Str dtype, Str rope.
  std::string want("fq_kv_shape_v1\0", 15);
  auto str = [&](const std::string& v) {
    want.push_back(static_cast<char>(v.size()));
    want.append(3, '\0');
    want += v;
  };
  auto u32 = [&](uint32_t v) {
    for (int i = 0; i < 4; ++i) want.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  };
  str("key");
  str("gqa");
  for (uint32_t v : {1u, 2u, 2u, 4u, 12u, 16u}) u32(v);
  str("f32");
  str("post_rope");
  EXPECT_EQ(*bytes, want);
  auto d1 = s.Digest();
  ASSERT_TRUE(d1.ok());
  EXPECT_EQ(*d1, kShapeGolden);
  auto back = KvTensorShape::FromJson(s.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, s);
  EXPECT_EQ(*back->Digest(), *d1);
  KvTensorShape t = s;
  t.tokens = 13;
  EXPECT_NE(*t.Digest(), *d1);
}

TEST(KvShape, JsonRejectsUnknownAndMissingFields) {
  nlohmann::json j = nlohmann::json::parse(KeyShape().ToJson());
  j["extra"] = 1;
  EXPECT_EQ(KvTensorShape::FromJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
  j.erase("extra");
  j.erase("tokens");
  EXPECT_EQ(KvTensorShape::FromJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(KvTensorShape::FromJson("not json").status().code(), StatusCode::kInvalidArgument);
}

TEST(KvGeometry, Rules) {
  const KvTensorShape s = KeyShape();
  KvPageGeometry g{8, 16, 10, 64, 64};
  EXPECT_TRUE(g.ValidateFor(s).ok());
  KvPageGeometry b = g;
  b.tokens_per_page = 0;
  EXPECT_EQ(b.ValidateFor(s).code(), StatusCode::kInvalidArgument);
  b = g;
  b.tokens_per_page = 13;  // > tokens
  EXPECT_EQ(b.ValidateFor(s).code(), StatusCode::kInvalidArgument);
  b = g;
  b.head_dim = 8;
  EXPECT_EQ(b.ValidateFor(s).code(), StatusCode::kInvalidArgument);
  b = g;
  b.raw_vector_bytes = 32;  // must be 16*4
  EXPECT_EQ(b.ValidateFor(s).code(), StatusCode::kInvalidArgument);
  b = g;
  b.reserved_vector_bytes = 0;
  EXPECT_EQ(b.ValidateFor(s).code(), StatusCode::kInvalidArgument);
  b = g;
  b.reserved_vector_bytes = 9;  // < encoded_vector_bytes
  EXPECT_EQ(b.ValidateFor(s).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(g.page_count(12), 2u);
  KvTensorShape big = s;
  big.tokens = 10000;
  b = g;
  b.tokens_per_page = kMaxKvTokensPerPage + 1;
  EXPECT_EQ(b.ValidateFor(big).code(), StatusCode::kResourceExhausted);
}

TEST(KvProfile, SpecFillsDerivedFields) {
  const KvCompressionProfile p = SpecProfile();
  ASSERT_TRUE(p.fib_profile.has_value());
  EXPECT_EQ(p.fib_profile->ambient_dim, 16u);
  EXPECT_EQ(p.page_geometry.encoded_vector_bytes, p.fib_profile->code_bytes());
  EXPECT_EQ(p.page_geometry.raw_vector_bytes, 64u);
  EXPECT_EQ(p.page_geometry.reserved_vector_bytes, 64u);  // keep_raw: room for a raw vector
  EXPECT_EQ(p.role_policy, KvRole::kKey);
  EXPECT_FALSE(p.resolved());
  EXPECT_EQ(p.protected_policy.raw_layers, std::vector<uint32_t>{1});
  EXPECT_EQ(p.Digest().status().code(), StatusCode::kFailedPrecondition);  // unresolved
}

TEST(KvProfile, SpecChannelAxisUsesTokensPerPage) {
  nlohmann::json j = nlohmann::json::parse(kSpec);
  j["axis_policy"] = "role_aware_kivi_style";  // keys -> per channel
  j["fibquant"]["block_dim"] = 2;
  auto p = KvCompressionProfile::FromSpecJson(j.dump());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->vector_axis(), KvVectorAxis::kChannel);
  EXPECT_EQ(p->fib_profile->ambient_dim, 8u);
  EXPECT_EQ(p->page_geometry.reserved_vector_bytes, 32u);  // a raw channel: 8 tokens * 4 bytes
}

TEST(KvProfile, ResolvedDigestAndJsonRoundTrip) {
  const KvCompressionProfile p = Resolved();
  ASSERT_TRUE(p.Validate().ok()) << p.Validate();
  auto d = p.Digest();
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->substr(0, 7), "sha256:");
  EXPECT_EQ(*p.Digest(), *d);  // deterministic
  auto back = KvCompressionProfile::FromJson(p.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, p);
  EXPECT_EQ(*back->Digest(), *d);
  KvCompressionProfile q = p;
  q.protected_policy.first_tokens_raw = 2;
  EXPECT_NE(*q.Digest(), *d);
}

// One named test per profile validation rule.
template <class F>
void ExpectCode(F mutate, StatusCode want) {
  KvCompressionProfile p = Resolved();
  mutate(p);
  EXPECT_EQ(p.Validate().code(), want) << p.Validate();
}

TEST(KvProfileValidate, Schema) { ExpectCode([](KvCompressionProfile& p) { p.schema_version.back() = 'X'; }, StatusCode::kInvalidArgument); }
TEST(KvProfileValidate, ProfileId) {
  ExpectCode([](KvCompressionProfile& p) { p.profile_id.clear(); }, StatusCode::kInvalidArgument);
  ExpectCode([](KvCompressionProfile& p) { p.profile_id.push_back(' '); }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, ShapeDigestRecomputed) {
  ExpectCode([](KvCompressionProfile& p) { p.shape_digest = FakeDigest('0'); }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, RoleMatchesShape) { ExpectCode([](KvCompressionProfile& p) { p.role_policy = KvRole::kValue; }, StatusCode::kInvalidArgument); }
TEST(KvProfileValidate, FibProfileRequired) { ExpectCode([](KvCompressionProfile& p) { p.fib_profile.reset(); }, StatusCode::kInvalidArgument); }
TEST(KvProfileValidate, FibProfileDigestRecomputed) {
  ExpectCode([](KvCompressionProfile& p) { p.fib_profile_digest = FakeDigest('1'); }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, AmbientDimMatchesAxis) {
  // Switching to a channel axis makes ambient_dim 16 wrong (tokens_per_page 8).
  ExpectCode([](KvCompressionProfile& p) { p.axis_policy = KvAxisPolicy::kPerChannel; }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, BlockDimDividesHeadDim) {
  ExpectCode([](KvCompressionProfile& p) { p.fib_profile->block_dim = 3; }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, DigestSyntax) {
  ExpectCode([](KvCompressionProfile& p) { p.codebook_digest.resize(20); }, StatusCode::kInvalidArgument);
  ExpectCode([](KvCompressionProfile& p) { p.rotation_digest.clear(); }, StatusCode::kInvalidArgument);  // half resolved
}
TEST(KvProfileValidate, EncodedBytesEqualCodeBytes) {
  ExpectCode([](KvCompressionProfile& p) { p.page_geometry.encoded_vector_bytes += 1; }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, GeometryChecked) { ExpectCode([](KvCompressionProfile& p) { p.page_geometry.head_dim = 8; }, StatusCode::kInvalidArgument); }
TEST(KvProfileValidate, ProtectedInsideShape) {
  ExpectCode([](KvCompressionProfile& p) { p.protected_policy.first_tokens_raw = 13; }, StatusCode::kInvalidArgument);
  ExpectCode([](KvCompressionProfile& p) { p.protected_policy.last_tokens_raw = 13; }, StatusCode::kInvalidArgument);
  ExpectCode([](KvCompressionProfile& p) { p.protected_policy.raw_layers = {2}; }, StatusCode::kInvalidArgument);
  ExpectCode([](KvCompressionProfile& p) { p.protected_policy.raw_heads = {2}; }, StatusCode::kInvalidArgument);
  ExpectCode([](KvCompressionProfile& p) { p.protected_policy.raw_heads = {1, 0}; }, StatusCode::kInvalidArgument);  // not canonical
}
TEST(KvProfileValidate, KeepRawNeedsRawFallback) {
  ExpectCode([](KvCompressionProfile& p) { p.fallback_policy.raw_fallback_available = false; }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, KeepRawNeedsReservationForRawVector) {
  ExpectCode([](KvCompressionProfile& p) { p.page_geometry.reserved_vector_bytes = 63; }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, FailClosedWithoutRawFallbackIsValid) {
  KvCompressionProfile p = Resolved();
  p.fallback_policy = {KvFallbackMode::kFailClosed, false};
  p.quality_budget.fallback_on_violation = KvFallbackMode::kFailClosed;
  p.protected_policy = KvProtectedPolicy{};  // nothing stored raw by policy either
  p.page_geometry.reserved_vector_bytes = p.page_geometry.encoded_vector_bytes;
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
}
// Protected vectors are stored raw whatever the fallback mode: raw_fallback_available = false
// with any protection is a contradiction, and protection needs room for a raw vector.
TEST(KvProfileValidate, ProtectionNeedsRawVectorsAndTheirReservedBytes) {
  KvCompressionProfile base = Resolved();
  base.fallback_policy = {KvFallbackMode::kFailClosed, false};
  base.quality_budget.fallback_on_violation = KvFallbackMode::kFailClosed;
  base.protected_policy = KvProtectedPolicy{};
  base.protected_policy.first_tokens_raw = 4;
  absl::Status s = base.Validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("raw_fallback_available = false"));
  KvCompressionProfile heads = base;
  heads.protected_policy = KvProtectedPolicy{};
  heads.protected_policy.raw_heads = {0};
  EXPECT_EQ(heads.Validate().code(), StatusCode::kInvalidArgument);
  KvCompressionProfile tight = base;
  tight.fallback_policy.raw_fallback_available = true;
  tight.page_geometry.reserved_vector_bytes = tight.page_geometry.encoded_vector_bytes;
  s = tight.Validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("reserved_vector_bytes must be >= the raw vector size"));
  tight.page_geometry.reserved_vector_bytes = tight.page_geometry.raw_vector_bytes;
  EXPECT_TRUE(tight.Validate().ok()) << tight.Validate();
}
// quality_budget.top_k: range-checked, digested only when set (profiles without it keep their
// digest), and round-trips through the JSON.
TEST(KvProfileValidate, BudgetTopKIsDigestedOnlyWhenSet) {
  KvCompressionProfile p = Resolved();
  const auto before = p.Digest();
  ASSERT_TRUE(before.ok()) << before.status();
  p.quality_budget.top_k = 8;
  const auto with_k = p.Digest();
  ASSERT_TRUE(with_k.ok()) << with_k.status();
  EXPECT_NE(*with_k, *before);
  p.quality_budget.top_k = 4;
  EXPECT_NE(*p.Digest(), *with_k);
  auto back = KvCompressionProfile::FromJson(p.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->quality_budget.top_k, std::optional<uint32_t>(4));
  EXPECT_EQ(*back->Digest(), *p.Digest());
  p.quality_budget.top_k = 0;
  EXPECT_EQ(p.Validate().code(), StatusCode::kInvalidArgument);
  p.quality_budget.top_k = 4097;
  EXPECT_EQ(p.Validate().code(), StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, BudgetFiniteNonNegative) {
  ExpectCode([](KvCompressionProfile& p) { p.quality_budget.max_attention_tv = -0.1; }, StatusCode::kInvalidArgument);
  ExpectCode([](KvCompressionProfile& p) { p.quality_budget.max_logit_mse = std::numeric_limits<double>::infinity(); }, StatusCode::kInvalidArgument);
  ExpectCode([](KvCompressionProfile& p) { p.quality_budget.max_topk_disagreement = std::nan(""); }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, BudgetMeasurableForRole) {
  ExpectCode([](KvCompressionProfile& p) { p.quality_budget.max_value_aggregation_mse = 1.0; }, StatusCode::kInvalidArgument);
}
TEST(KvProfileValidate, CalibrationDigestSyntax) {
  ExpectCode([](KvCompressionProfile& p) { p.calibration_digest.back() = 'X'; }, StatusCode::kInvalidArgument);
  ExpectCode([](KvCompressionProfile& p) { p.calibration_digest = FakeDigest('c'); }, absl::StatusCode::kOk);
}
TEST(KvProfileValidate, RawAxisHasNoFibProfile) {
  nlohmann::json j = nlohmann::json::parse(kSpec);
  j.erase("fibquant");
  j["axis_policy"] = "raw";
  auto p = KvCompressionProfile::FromSpecJson(j.dump());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->resolved());
  ASSERT_TRUE(p->Digest().ok());
  EXPECT_EQ(*p->Digest(), kRawProfileGolden);
  KvCompressionProfile q = *p;
  q.fib_profile = Resolved().fib_profile;
  EXPECT_EQ(q.Validate().code(), StatusCode::kInvalidArgument);
  j["fibquant"] = nlohmann::json::parse(kSpec)["fibquant"];
  EXPECT_EQ(KvCompressionProfile::FromSpecJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
}

TEST(KvProfileJson, FullFormRejectsTamperedDigestAndUnknownFields) {
  nlohmann::json j = nlohmann::json::parse(Resolved().ToJson());
  j["fib_profile_digest"] = FakeDigest('2');
  EXPECT_EQ(KvCompressionProfile::FromJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
  j = nlohmann::json::parse(Resolved().ToJson());
  j["surprise"] = true;
  EXPECT_EQ(KvCompressionProfile::FromJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
  j = nlohmann::json::parse(Resolved().ToJson());
  j.erase("quality_budget");
  EXPECT_EQ(KvCompressionProfile::FromJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
}

TEST(KvProfileJson, SpecRejectsTyposAndBadValues) {
  nlohmann::json j = nlohmann::json::parse(kSpec);
  j["tokens_per_pag"] = 8;
  EXPECT_EQ(KvCompressionProfile::FromSpecJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
  j = nlohmann::json::parse(kSpec);
  j["axis_policy"] = "diagonal";
  EXPECT_EQ(KvCompressionProfile::FromSpecJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
  j = nlohmann::json::parse(kSpec);
  j["tokens_per_page"] = -1;
  EXPECT_EQ(KvCompressionProfile::FromSpecJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
  j = nlohmann::json::parse(kSpec);
  j.erase("fibquant");
  EXPECT_EQ(KvCompressionProfile::FromSpecJson(j.dump()).status().code(), StatusCode::kInvalidArgument);
}

// Issue 14 item 10: nlohmann keeps the last of two equal keys; a spec with a duplicate must be
// refused naming the key, at the top level, inside "fibquant" and inside "shape", and in the full
// (resolved) form, whichever value comes last.
TEST(KvProfileJson, DuplicateKeysAreInvalidArgumentNamingTheKey) {
  struct Case {
    std::string text;
    std::string key;
  };
  const std::string spec = kSpec;
  auto dup_after = [&](const std::string& marker, const std::string& inserted) {
    std::string t = spec;
    const size_t at = t.find(marker);
    EXPECT_NE(at, std::string::npos) << marker;
    t.insert(at + marker.size(), inserted);
    return t;
  };
  const std::vector<Case> cases = {
      {dup_after("\"tokens_per_page\": 8,", " \"tokens_per_page\": 4,"), "tokens_per_page"},
      {dup_after("\"codebook_size\": 16,", " \"codebook_size\": 4,"), "codebook_size"},
      {dup_after("\"head_dim\": 16,", " \"head_dim\": 8,"), "head_dim"},
      {dup_after("\"max_attention_tv\": 0.5", ", \"max_attention_tv\": 0.5"), "max_attention_tv"},
  };
  for (const Case& c : cases) {
    const absl::Status s = KvCompressionProfile::FromSpecJson(c.text).status();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.key << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("duplicate field \"" + c.key + "\"")) << s;
  }
  std::string full = Resolved().ToJson();
  ASSERT_EQ(full.front(), '{');
  full.insert(1, "\"profile_id\": \"other\", ");
  const absl::Status s = KvCompressionProfile::FromJson(full).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("duplicate field \"profile_id\"")) << s;
  // Equal keys in different objects are not duplicates.
  EXPECT_TRUE(KvCompressionProfile::FromSpecJson(kSpec).ok());
}

TEST(KvProtected, Membership) {
  const KvTensorShape s = KeyShape();
  KvProtectedPolicy p{2, 1, {1}, {}};
  EXPECT_TRUE(p.IsProtected(s, 0, 0, 0));
  EXPECT_TRUE(p.IsProtected(s, 0, 0, 1));
  EXPECT_FALSE(p.IsProtected(s, 0, 0, 2));
  EXPECT_FALSE(p.IsProtected(s, 0, 0, 10));
  EXPECT_TRUE(p.IsProtected(s, 0, 0, 11));
  EXPECT_TRUE(p.IsProtected(s, 1, 0, 5));
}

}  // namespace
}  // namespace fibquant
