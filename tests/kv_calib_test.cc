// Calibration artifact (core/kv_calib.h) and the codec's centering / calibration transform:
// statistics by hand, golden digests, JSON round trip and tampering, the version-2 centred frame
// (round trip, random access, corrupt mean), and that version-1 frames stay what they were.
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/kv_calib.h"
#include "core/kv_codec.h"
#include "core/kv_frame.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

using absl::StatusCode;

constexpr uint32_t kLayers = 1, kHeads = 2, kQHeads = 4, kTokens = 32, kDim = 16, kTpp = 16;

KvTensorShape Shape(KvRole role) {
  KvTensorShape s;
  s.role = role;
  s.attention_kind = KvAttentionKind::kGqa;
  s.batch = 1;
  s.layers = kLayers;
  s.kv_heads = kHeads;
  s.query_heads = kQHeads;
  s.tokens = kTokens;
  s.head_dim = kDim;
  s.rope_state = role == KvRole::kKey ? KvRopeState::kPostRope : KvRopeState::kNotApplicable;
  return s;
}

// Deterministic data with a large offset on channel 5 (a key outlier channel) and a spread that
// grows with the channel index.
std::vector<float> Data(uint32_t seed, size_t n, float offset) {
  std::vector<float> v(n);
  uint64_t s = 0x9E3779B97F4A7C15ull * (seed + 1);
  for (size_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const float u = static_cast<float>((s >> 11) * (1.0 / 9007199254740992.0)) - 0.5f;
    const uint32_t c = static_cast<uint32_t>(i % kDim);
    v[i] = u * (1.0f + 0.25f * static_cast<float>(c)) + (c == 5 ? offset : 0.1f);
  }
  return v;
}

TEST(KvCalibration, StatisticsByHand) {
  const KvTensorShape shape = Shape(KvRole::kKey);
  const std::vector<float> k = Data(1, shape.element_count(), 20.0f);
  const std::vector<float> q = Data(2, size_t{kQHeads} * kTokens * kDim, 0.0f);
  auto c = ComputeKvCalibration(shape, k, q, {});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sample_vectors, kTokens);
  EXPECT_EQ(c->sample_queries, 2u * kTokens);  // two query heads per KV head
  for (uint32_t h = 0; h < kHeads; ++h) {
    for (uint32_t ch = 0; ch < kDim; ++ch) {
      double sum = 0, sq = 0, qq = 0;
      for (uint32_t t = 0; t < kTokens; ++t) {
        const double x = k[shape.VectorOffset(0, 0, h, t) + ch];
        sum += x;
        sq += x * x;
        for (uint32_t g = 0; g < 2; ++g) {
          const double y = q[((size_t{h} * 2 + g) * kTokens + t) * kDim + ch];
          qq += y * y;
        }
      }
      const double mu = sum / kTokens, var = sq / kTokens - mu * mu;
      EXPECT_NEAR(c->mean[h * kDim + ch], mu, 1e-5);
      EXPECT_NEAR(c->channel_sd[h * kDim + ch], std::sqrt(var), 1e-5);
      EXPECT_NEAR(c->query_second_moment[h * kDim + ch], qq / (2 * kTokens), 1e-5);
    }
    double rms = 0;
    for (uint32_t ch = 0; ch < kDim; ++ch) rms += double{c->scale[h * kDim + ch]} * c->scale[h * kDim + ch];
    EXPECT_NEAR(rms / kDim, 1.0, 1e-6);
    // query_whiten: t_i^2 proportional to sqrt(w_i) / sd_i.
    const auto t2 = [&](uint32_t ch) {
      return double{c->scale[h * kDim + ch]} * c->scale[h * kDim + ch] * c->channel_sd[h * kDim + ch] /
             std::sqrt(double{c->query_second_moment[h * kDim + ch]});
    };
    EXPECT_NEAR(t2(0) / t2(9), 1.0, 1e-4);
  }
  // Channel 5 of each head is the outlier (RMS about 20 against a median about 1.2).
  EXPECT_EQ(c->outlier_channels, (std::vector<uint32_t>{5, kDim + 5}));
  EXPECT_EQ(c->digest, c->ComputeDigest());
}

TEST(KvCalibration, GoldenDigest) {
  const KvTensorShape shape = Shape(KvRole::kKey);
  auto c = ComputeKvCalibration(shape, Data(1, shape.element_count(), 20.0f),
                                Data(2, size_t{kQHeads} * kTokens * kDim, 0.0f), {});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->digest, "sha256:0e640354639b2ea34ced096b6a4de49f1d6938a266b311ff890afbb118f7f231");
  KvCalibrationOptions o;
  o.scaling = KvCalibScaling::kNone;
  auto v = ComputeKvCalibration(Shape(KvRole::kValue), Data(3, shape.element_count(), 0.0f), {}, o);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->digest, "sha256:34d207f3a215e5c24da1cd0399f26b75783248916074ea2902b57103cbe095b7");
}

TEST(KvCalibration, JsonRoundTripAndTampering) {
  const KvTensorShape shape = Shape(KvRole::kKey);
  auto c = ComputeKvCalibration(shape, Data(1, shape.element_count(), 20.0f), {}, {});
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->query_second_moment.empty());
  auto back = KvCalibration::FromJson(c->ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, *c);
  nlohmann::json j = nlohmann::json::parse(c->ToJson());
  j["mean"][3] = 0.5;  // content changed, digest not
  auto t = KvCalibration::FromJson(j.dump());
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("kv_calibration.digest"), std::string::npos) << t.status();
  j = nlohmann::json::parse(c->ToJson());
  j["scale"][0] = -1.0;
  EXPECT_NE(KvCalibration::FromJson(j.dump()).status().message().find("kv_calibration.scale[0]"), std::string::npos);
  j = nlohmann::json::parse(c->ToJson());
  j["channel_sd"].erase(0);
  EXPECT_NE(KvCalibration::FromJson(j.dump()).status().message().find("kv_calibration.channel_sd"), std::string::npos);
  j = nlohmann::json::parse(c->ToJson());
  j["mean"][0] = 0.1;  // not an f32 value
  EXPECT_NE(KvCalibration::FromJson(j.dump()).status().message().find("f32"), std::string::npos);
  j = nlohmann::json::parse(c->ToJson());
  j["layers"] = 1u << 20;
  j["kv_heads"] = 1u << 20;
  EXPECT_EQ(KvCalibration::FromJson(j.dump()).status().code(), StatusCode::kResourceExhausted);
}

TEST(KvCalibration, InputValidation) {
  const KvTensorShape shape = Shape(KvRole::kKey);
  std::vector<float> k = Data(1, shape.element_count(), 1.0f);
  EXPECT_EQ(ComputeKvCalibration(shape, absl::MakeSpan(k).subspan(1), {}, {}).status().code(),
            StatusCode::kInvalidArgument);
  std::vector<float> q(kDim * 3);  // not a multiple of batch * layers * query_heads * head_dim
  EXPECT_EQ(ComputeKvCalibration(shape, k, q, {}).status().code(), StatusCode::kInvalidArgument);
  k[7] = std::nanf("");
  EXPECT_NE(ComputeKvCalibration(shape, k, {}, {}).status().message().find("values[7]"), std::string::npos);
  const KvTensorShape vs = Shape(KvRole::kValue);
  std::vector<float> qv(size_t{kQHeads} * kDim, 1.0f);
  EXPECT_EQ(ComputeKvCalibration(vs, Data(1, vs.element_count(), 0), qv, {}).status().code(),
            StatusCode::kInvalidArgument);
}

// ---- codec ---------------------------------------------------------------------------------

nlohmann::json Spec(const std::string& centering, const std::string& transform, const std::string& calib,
                    bool renormalize = false) {
  nlohmann::json j;
  j["profile_id"] = "calib-test";
  j["shape"] = {{"role", "key"}, {"attention_kind", "gqa"}, {"batch", 1}, {"layers", kLayers},
                {"kv_heads", kHeads}, {"query_heads", kQHeads}, {"tokens", kTokens}, {"head_dim", kDim},
                {"dtype", "f32"}, {"rope_state", "post_rope"}};
  j["axis_policy"] = "per_token";
  j["tokens_per_page"] = kTpp;
  j["fibquant"] = {{"block_dim", 2}, {"codebook_size", 16}, {"seed", 5},
                   {"training_samples", 2000}, {"lloyd_restarts", 1}, {"lloyd_iterations", 5}};
  if (!centering.empty()) j["centering"] = centering;
  if (!transform.empty()) j["channel_transform"] = transform;
  if (!calib.empty()) j["calibration_digest"] = calib;
  if (renormalize) j["renormalize"] = true;
  return j;
}

std::shared_ptr<const Quantizer> SharedQuantizer(const KvCompressionProfile& p) {
  static std::shared_ptr<const Quantizer> q;
  if (!q) {
    auto cb = Codebook::Build(*p.fib_profile, 1);
    EXPECT_TRUE(cb.ok()) << cb.status();
    q = *Quantizer::Create(*std::move(cb));
  }
  return q;
}

absl::StatusOr<std::shared_ptr<const KvCodec>> MakeCodec(const nlohmann::json& spec,
                                                         std::shared_ptr<const KvCalibration> cal = nullptr) {
  auto p = KvCompressionProfile::FromSpecJson(spec.dump());
  if (!p.ok()) return p.status();
  return KvCodec::Create(*p, SharedQuantizer(*p), std::move(cal));
}

struct RoundTrip {
  double rel_err = 0;  // sum ||x - x^||^2 / sum ||x||^2 over every page
  std::vector<std::string> frames;
};

RoundTrip RunPages(const KvCodec& codec, const std::vector<float>& x) {
  RoundTrip r;
  double e = 0, n = 0;
  const KvTensorShape& s = codec.profile().shape;
  for (uint32_t h = 0; h < kHeads; ++h) {
    for (uint32_t t0 = 0; t0 < kTokens; t0 += kTpp) {
      KvPageInput in;
      in.coords = {0, 0, h, t0, kTpp};
      const float* src = x.data() + s.VectorOffset(0, 0, h, t0);
      in.data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(src), size_t{kTpp} * kDim * 4);
      auto page = codec.CompressPage(in);
      EXPECT_TRUE(page.ok()) << page.status();
      if (!page.ok()) return r;
      auto dec = codec.DecodeFrame(
          absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(page->frame.data()), page->frame.size()),
          DType::kF32);
      EXPECT_TRUE(dec.ok()) << dec.status();
      if (!dec.ok()) return r;
      const float* y = reinterpret_cast<const float*>(dec->data.data());
      for (size_t i = 0; i < size_t{kTpp} * kDim; ++i) {
        e += (double{src[i]} - y[i]) * (double{src[i]} - y[i]);
        n += double{src[i]} * src[i];
      }
      // Random access decodes the same vector as the whole page.
      auto one = codec.DecodeVector(
          absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(page->frame.data()), page->frame.size()), 3,
          DType::kF32);
      EXPECT_TRUE(one.ok()) << one.status();
      if (one.ok()) {
        EXPECT_EQ(0, std::memcmp(one->data(), y + 3 * kDim, kDim * 4));
      }
      r.frames.push_back(page->frame);
    }
  }
  r.rel_err = e / n;
  return r;
}

TEST(KvCentering, PageMeanFrameIsVersion2AndHelpsOffsetData) {
  const std::vector<float> x = Data(7, Shape(KvRole::kKey).element_count(), 20.0f);
  auto plain = MakeCodec(Spec("", "", ""));
  auto cent = MakeCodec(Spec("page", "", ""));
  ASSERT_TRUE(plain.ok() && cent.ok()) << cent.status();
  const RoundTrip a = RunPages(**plain, x), b = RunPages(**cent, x);
  ASSERT_FALSE(a.frames.empty());
  ASSERT_FALSE(b.frames.empty());
  // Uncentred profiles keep writing version-1 frames; centred ones version 2 with flag bit 1 and
  // a head_dim-float mean section.
  auto h1 = InspectFrame(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(a.frames[0].data()), a.frames[0].size()));
  auto h2 = InspectFrame(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.frames[0].data()), b.frames[0].size()));
  ASSERT_TRUE(h1.ok() && h2.ok());
  EXPECT_EQ(h1->version, 1);
  EXPECT_EQ(h2->version, 2);
  EXPECT_EQ(h2->flags & kKvFrameFlagCentered, kKvFrameFlagCentered);
  EXPECT_EQ(b.frames[0].size(), a.frames[0].size() + kDim * 4);
  // The offset channel dominates the norm: centring removes it, so the error drops sharply.
  EXPECT_LT(b.rel_err, 0.5 * a.rel_err) << a.rel_err << " vs " << b.rel_err;
  // The profile digest changes with centering; "none" keeps the pre-centering digest.
  EXPECT_NE((*plain)->profile_digest(), (*cent)->profile_digest());
  auto none = MakeCodec(Spec("none", "none", ""));
  ASSERT_TRUE(none.ok());
  EXPECT_EQ((*plain)->profile_digest(), (*none)->profile_digest());
  // A centred frame is rejected by the uncentred profile's codec (digest) and vice versa; a frame
  // whose centered bit disagrees with the profile is DataLoss.
  std::string f = b.frames[0];
  auto dec = (*plain)->DecodeFrame(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(f.data()), f.size()), DType::kF32);
  EXPECT_EQ(dec.status().code(), StatusCode::kInvalidArgument);
}

void ResealFrame(std::string* f) {
  const uint64_t c = KvFrameChecksum(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(f->data()), f->size() - kKvFrameChecksumBytes));
  for (int i = 0; i < 8; ++i) (*f)[f->size() - 8 + i] = static_cast<char>((c >> (8 * i)) & 0xFF);
}

TEST(KvCentering, CorruptCenteredFrames) {
  const std::vector<float> x = Data(7, Shape(KvRole::kKey).element_count(), 20.0f);
  auto cent = MakeCodec(Spec("page", "", ""));
  ASSERT_TRUE(cent.ok());
  const RoundTrip b = RunPages(**cent, x);
  ASSERT_FALSE(b.frames.empty());
  auto decode = [&](const std::string& f) {
    return (*cent)->DecodeFrame(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(f.data()), f.size()),
                                DType::kF32).status();
  };
  {  // mean value infinite
    std::string f = b.frames[0];
    const size_t off = f.size() - kKvFrameChecksumBytes - 4;
    f[off] = 0; f[off + 1] = 0; f[off + 2] = static_cast<char>(0x80); f[off + 3] = 0x7f;
    ResealFrame(&f);
    EXPECT_EQ(decode(f).code(), StatusCode::kDataLoss);
    EXPECT_NE(decode(f).message().find("mean section"), std::string::npos) << decode(f);
  }
  {  // centered bit cleared (and the mean section dropped so the frame is structurally valid)
    std::string f = b.frames[0];
    f.erase(f.size() - kKvFrameChecksumBytes - kDim * 4, kDim * 4);
    f[6] = static_cast<char>(f[6] & ~kKvFrameFlagCentered);
    f[4] = 1;  // no version-2 flag left: a well-formed frame is version 1 (ParseKvFrame's rule)
    f[5] = 0;
    ResealFrame(&f);
    EXPECT_EQ(decode(f).code(), StatusCode::kDataLoss);
    EXPECT_NE(decode(f).message().find("centered bit"), std::string::npos) << decode(f);
  }
}

TEST(KvCalibrationCodec, StaticTransformBindsByDigest) {
  const KvTensorShape shape = Shape(KvRole::kKey);
  const std::vector<float> train = Data(11, shape.element_count(), 20.0f);
  const std::vector<float> test = Data(12, shape.element_count(), 20.0f);
  auto cal = ComputeKvCalibration(shape, train, Data(13, size_t{kQHeads} * kTokens * kDim, 0.0f), {});
  ASSERT_TRUE(cal.ok());
  auto shared = std::make_shared<const KvCalibration>(*cal);
  // The profile names the calibration; the codec needs that very artifact.
  EXPECT_EQ(KvCompressionProfile::FromSpecJson(Spec("", "calibration", "").dump()).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeCodec(Spec("", "calibration", cal->digest)).status().code(), StatusCode::kInvalidArgument);
  KvCalibration other = *cal;
  other.mean[0] += 1.0f;
  other.digest = other.ComputeDigest();
  auto wrong = MakeCodec(Spec("", "calibration", cal->digest), std::make_shared<const KvCalibration>(other));
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("calibration_digest"), std::string::npos) << wrong.status();
  auto vcal = ComputeKvCalibration(Shape(KvRole::kValue), train, {}, {});
  ASSERT_TRUE(vcal.ok());
  EXPECT_EQ(MakeCodec(Spec("", "calibration", vcal->digest), std::make_shared<const KvCalibration>(*vcal)).status().code(),
            StatusCode::kInvalidArgument);  // a value calibration for a key shape
  auto plain = MakeCodec(Spec("", "", ""));
  auto calc = MakeCodec(Spec("", "calibration", cal->digest), shared);
  ASSERT_TRUE(plain.ok() && calc.ok()) << calc.status();
  const RoundTrip a = RunPages(**plain, test), b = RunPages(**calc, test);
  EXPECT_LT(b.rel_err, 0.5 * a.rel_err) << a.rel_err << " vs " << b.rel_err;
  // Static calibration costs nothing per page: version-1 frames of the same size.
  ASSERT_FALSE(b.frames.empty());
  EXPECT_EQ(b.frames[0].size(), a.frames[0].size());
  EXPECT_EQ(b.frames[0][4], 1);
  // Page centering composes with the static transform.
  auto both = MakeCodec(Spec("page", "calibration", cal->digest), shared);
  ASSERT_TRUE(both.ok()) << both.status();
  const RoundTrip c = RunPages(**both, test);
  EXPECT_LT(c.rel_err, a.rel_err);
}

TEST(KvRenormalize, DecodedVectorsCarryTheStoredNorm) {
  const KvTensorShape shape = Shape(KvRole::kKey);
  const std::vector<float> x = Data(21, shape.element_count(), 3.0f);
  auto plain = MakeCodec(Spec("", "", ""));
  auto renorm = MakeCodec(Spec("", "", "", true));
  ASSERT_TRUE(plain.ok() && renorm.ok()) << renorm.status();
  EXPECT_NE((*plain)->profile_digest(), (*renorm)->profile_digest());
  const RoundTrip a = RunPages(**plain, x), b = RunPages(**renorm, x);  // also DecodeVector == DecodeFrame
  ASSERT_FALSE(b.frames.empty());
  // Same codes (the encoder is unchanged), different decode: every decoded vector has exactly the
  // fp16 norm stored in its code.
  ASSERT_EQ(a.frames[0].size(), b.frames[0].size());
  EXPECT_EQ(a.frames[0].substr(96, a.frames[0].size() - 104), b.frames[0].substr(96, b.frames[0].size() - 104));
  const std::string& f = b.frames[0];
  auto dec = (*renorm)->DecodeFrame(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(f.data()), f.size()),
                                    DType::kF32);
  ASSERT_TRUE(dec.ok());
  auto view = ParseKvFrame(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(f.data()), f.size()));
  ASSERT_TRUE(view.ok());
  const float* y = reinterpret_cast<const float*>(dec->data.data());
  const uint32_t cb = view->header.code_bytes;
  for (uint32_t i = 0; i < kTpp; ++i) {
    const uint16_t h = static_cast<uint16_t>(view->codes[i * cb] | (view->codes[i * cb + 1] << 8));
    double ss = 0;
    for (uint32_t c = 0; c < kDim; ++c) ss += double{y[i * kDim + c]} * y[i * kDim + c];
    EXPECT_NEAR(std::sqrt(ss), HalfToFloat(h), 1e-5 * HalfToFloat(h)) << i;
  }
  nlohmann::json s = Spec("", "", "", true);
  s["renormalize"] = "yes";
  EXPECT_NE(KvCompressionProfile::FromSpecJson(s.dump()).status().message().find("renormalize"), std::string::npos);
}

TEST(KvCalibrationCodec, ProfileJsonCarriesTheNewFields) {
  auto p = KvCompressionProfile::FromSpecJson(Spec("page", "", "").dump());
  ASSERT_TRUE(p.ok());
  auto c = KvCodec::Create(*p, SharedQuantizer(*p));
  ASSERT_TRUE(c.ok());
  const std::string full = (*c)->profile().ToJson();
  EXPECT_NE(full.find("\"centering\": \"page\""), std::string::npos);
  auto back = KvCompressionProfile::FromJson(full);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, (*c)->profile());
  auto bad = nlohmann::json::parse(full);
  bad["centering"] = "channel";
  EXPECT_NE(KvCompressionProfile::FromJson(bad.dump()).status().message().find("kv_profile.centering"),
            std::string::npos);
  // Per-channel pages cannot be centred.
  nlohmann::json s = Spec("page", "", "");
  s["axis_policy"] = "per_channel";
  s["fibquant"]["block_dim"] = 2;
  EXPECT_EQ(KvCompressionProfile::FromSpecJson(s.dump()).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fibquant
