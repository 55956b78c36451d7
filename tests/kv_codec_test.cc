// KvCodec: page round trips for every axis policy and dtype, protected regions, random access,
// profile-aware frame corruption, encode fallback, quality budgets at their thresholds, receipts.
#include <cmath>
#include <cstring>
#include <map>
#include <thread>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/digest.h"
#include "core/kv_codec.h"
#include "core/kv_frame.h"
#include "core/kv_receipt.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

using absl::StatusCode;

constexpr uint32_t kLayers = 2, kHeads = 2, kTokens = 12, kDim = 16, kTpp = 8;

nlohmann::json Spec(const std::string& role, const std::string& dtype, const std::string& axis, uint32_t block_dim) {
  nlohmann::json j;
  j["profile_id"] = "test." + role + "." + dtype + "." + axis;
  j["shape"] = {{"role", role}, {"attention_kind", "mha"}, {"batch", 1}, {"layers", kLayers},
                {"kv_heads", kHeads}, {"query_heads", kHeads}, {"tokens", kTokens}, {"head_dim", kDim},
                {"dtype", dtype}, {"rope_state", role == "key" ? "post_rope" : "not_applicable"}};
  j["axis_policy"] = axis;
  j["tokens_per_page"] = kTpp;
  if (axis != "raw") {
    // N = 6: 3-bit indices, 4 blocks -> 12 bits, so each code has 4 padding bits and indices 6, 7
    // are out of range (both corruptions are testable).
    j["fibquant"] = {{"block_dim", block_dim}, {"codebook_size", 6}, {"seed", 11},
                     {"training_samples", 400}, {"lloyd_restarts", 1}, {"lloyd_iterations", 4}};
  }
  return j;
}

std::shared_ptr<const KvCodec> Make(const nlohmann::json& spec) {
  static std::map<std::string, std::shared_ptr<const Quantizer>> cache;
  auto p = KvCompressionProfile::FromSpecJson(spec.dump());
  EXPECT_TRUE(p.ok()) << p.status();
  if (!p.ok()) return nullptr;
  std::shared_ptr<const Quantizer> q;
  if (p->fib_profile) {
    const std::string key = *p->fib_profile->Digest();
    auto it = cache.find(key);
    if (it == cache.end()) {
      auto cb = Codebook::Build(*p->fib_profile, 1);
      EXPECT_TRUE(cb.ok()) << cb.status();
      auto qq = Quantizer::Create(*std::move(cb));
      EXPECT_TRUE(qq.ok()) << qq.status();
      it = cache.emplace(key, *qq).first;
    }
    q = it->second;
  }
  auto c = KvCodec::Create(*p, q);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : nullptr;
}

// Deterministic test tensor in canonical layout, with a large channel 3 (a key-style outlier).
std::vector<float> Tensor(uint32_t seed) {
  std::vector<float> v(size_t{kLayers} * kHeads * kTokens * kDim);
  uint64_t s = 0x9E3779B97F4A7C15ull * (seed + 1);
  for (size_t i = 0; i < v.size(); ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const float u = static_cast<float>((s >> 11) * (1.0 / 9007199254740992.0)) - 0.5f;
    v[i] = u * ((i % kDim) == 3 ? 8.0f : 1.0f) + 0.05f * static_cast<float>(i % 5);
  }
  return v;
}

std::vector<uint8_t> ToDType(DType d, const float* x, size_t n) {
  std::vector<uint8_t> out(n * DTypeSize(d));
  FromFloat(d, x, n, out.data());
  return out;
}

std::vector<float> ToF32(DType d, const std::vector<uint8_t>& b) {
  std::vector<float> out(b.size() / DTypeSize(d));
  ToFloat(d, b.data(), out.size(), out.data());
  return out;
}

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

void Reseal(std::string* f) {
  const uint64_t c = KvFrameChecksum(Bytes(*f).subspan(0, f->size() - 8));
  for (int i = 0; i < 8; ++i) (*f)[f->size() - 8 + i] = static_cast<char>((c >> (8 * i)) & 0xFF);
}

void PutU32(std::string* f, size_t off, uint32_t v) {
  for (int i = 0; i < 4; ++i) (*f)[off + i] = static_cast<char>((v >> (8 * i)) & 0xFF);
}

struct PageData {
  KvPageCoords coords;
  std::vector<uint8_t> bytes;
};

std::vector<PageData> Pages(const KvCodec& codec, const std::vector<float>& t) {
  const KvTensorShape& s = codec.profile().shape;
  std::vector<PageData> pages;
  for (uint32_t l = 0; l < s.layers; ++l) {
    for (uint32_t h = 0; h < s.kv_heads; ++h) {
      for (uint32_t t0 = 0; t0 < s.tokens; t0 += kTpp) {
        PageData p;
        p.coords = {0, l, h, t0, std::min(kTpp, s.tokens - t0)};
        p.bytes = ToDType(s.dtype, t.data() + s.VectorOffset(0, l, h, t0), size_t{p.coords.token_count} * kDim);
        pages.push_back(std::move(p));
      }
    }
  }
  return pages;
}

absl::StatusOr<CompressedPage> Compress(const KvCodec& codec, const PageData& p, KvCompressOptions opt = {}) {
  KvPageInput in;
  in.coords = p.coords;
  in.dtype = codec.profile().shape.dtype;
  in.data = p.bytes;
  return codec.CompressPage(in, opt);
}

double Cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d += double{a[i]} * b[i];
    na += double{a[i]} * a[i];
    nb += double{b[i]} * b[i];
  }
  return d / std::sqrt(na * nb);
}

// Round trip of every page: raw vectors exact, coded vectors equal to the quantizer's own
// encode/decode of that vector, every vector equal to DecodeVector.
void CheckRoundTrip(const KvCodec& codec, uint32_t seed) {
  const std::vector<float> t = Tensor(seed);
  const DType dt = codec.profile().shape.dtype;
  const bool channel = codec.vector_axis() == KvVectorAxis::kChannel;
  for (const PageData& p : Pages(codec, t)) {
    auto cp = Compress(codec, p);
    ASSERT_TRUE(cp.ok()) << cp.status();
    auto dec = codec.DecodeFrame(Bytes(cp->frame), dt);
    ASSERT_TRUE(dec.ok()) << dec.status();
    EXPECT_EQ(dec->coords, p.coords);
    EXPECT_EQ(dec->counts, cp->counts);
    const std::vector<float> x = ToF32(dt, p.bytes), y = ToF32(dt, dec->data);
    ASSERT_EQ(x.size(), y.size());
    auto view = *ParseKvFrame(Bytes(cp->frame));
    const uint32_t T = p.coords.token_count, n = cp->counts.vector_count, len = channel ? T : kDim;
    EXPECT_EQ(n, channel ? kDim : T);
    for (uint32_t i = 0; i < n; ++i) {
      std::vector<float> xi(len), yi(len);
      for (uint32_t j = 0; j < len; ++j) {
        const size_t pos = channel ? size_t{j} * kDim + i : size_t{i} * kDim + j;
        xi[j] = x[pos];
        yi[j] = y[pos];
      }
      if (view.IsRaw(i)) {
        EXPECT_EQ(xi, yi) << "raw vector " << i;
      } else {
        std::vector<uint8_t> code(codec.quantizer()->code_bytes());
        ASSERT_TRUE(codec.quantizer()->Encode(DType::kF32,
                                              absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(xi.data()),
                                                                        len * 4),
                                              1, absl::Span<uint8_t>(code), CodecPath::kFast).ok());
        std::vector<float> want(len);
        ASSERT_TRUE(codec.quantizer()->DecodeF32(code, 1, want.data(), CodecPath::kFast).ok());
        std::vector<uint8_t> want_dt = ToDType(dt, want.data(), len);
        EXPECT_EQ(ToF32(dt, want_dt), yi) << "coded vector " << i;
      }
      auto one = codec.DecodeVector(Bytes(cp->frame), i, dt);
      ASSERT_TRUE(one.ok()) << one.status();
      EXPECT_EQ(ToF32(dt, *one), yi) << "random access " << i;
    }
    if (cp->counts.coded == n) {
      EXPECT_GT(Cosine(x, y), 0.5);  // 0.65 bits/coordinate: a sanity bound only
    }
  }
}

TEST(KvCodecRoundTrip, PerTokenF32) { CheckRoundTrip(*Make(Spec("key", "f32", "per_token", 4)), 1); }
TEST(KvCodecRoundTrip, PerTokenF16) { CheckRoundTrip(*Make(Spec("key", "f16", "per_token", 4)), 2); }
TEST(KvCodecRoundTrip, PerTokenBF16) { CheckRoundTrip(*Make(Spec("value", "bf16", "per_token", 4)), 3); }
TEST(KvCodecRoundTrip, PerChannelF32) { CheckRoundTrip(*Make(Spec("key", "f32", "per_channel", 2)), 4); }
TEST(KvCodecRoundTrip, PerChannelF16) { CheckRoundTrip(*Make(Spec("value", "f16", "per_channel", 2)), 5); }
// Any head_dim: block_dim 3 divides neither head_dim 16 nor tokens_per_page 8 (vectors padded to 18
// and 9 before the rotation); under Hadamard both are also not powers of two (two-window form).
TEST(KvCodecRoundTrip, BlockDimNotDividingTheVectorLength) {
  for (const char* rotation : {"haar_qr", "hadamard"}) {
    for (const char* axis : {"per_token", "per_channel"}) {
      nlohmann::json spec = Spec("key", "f16", axis, 3);
      spec["profile_id"] = std::string("test.anydim.") + axis + "." + rotation;
      spec["fibquant"]["rotation_algorithm"] = rotation;
      auto c = Make(spec);
      ASSERT_NE(c, nullptr) << axis << " " << rotation;
      const Profile& fp = *c->profile().fib_profile;
      EXPECT_EQ(fp.rotation_dim(), std::string(axis) == "per_token" ? 18u : 9u);
      CheckRoundTrip(*c, 7);
    }
  }
}

TEST(KvCodecRoundTrip, RoleAwareKeysPerChannel) {
  auto c = Make(Spec("key", "bf16", "role_aware_kivi_style", 2));
  EXPECT_EQ(c->vector_axis(), KvVectorAxis::kChannel);
  CheckRoundTrip(*c, 6);
}
TEST(KvCodecRoundTrip, RoleAwareValuesPerToken) {
  auto c = Make(Spec("value", "f32", "role_aware_kivi_style", 4));
  EXPECT_EQ(c->vector_axis(), KvVectorAxis::kToken);
  CheckRoundTrip(*c, 7);
}
TEST(KvCodecRoundTrip, RawAxis) {
  auto c = Make(Spec("key", "f16", "raw", 0));
  CheckRoundTrip(*c, 8);
  auto cp = Compress(*c, Pages(*c, Tensor(8))[0]);
  ASSERT_TRUE(cp.ok());
  EXPECT_EQ(cp->counts.raw_policy, cp->counts.vector_count);
  EXPECT_EQ(cp->raw_reasons, std::vector<std::string>{"raw_axis_policy"});
}
TEST(KvCodecRoundTrip, DecodeToOtherDType) {
  auto c = Make(Spec("key", "f32", "per_token", 4));
  auto cp = Compress(*c, Pages(*c, Tensor(9))[0]);
  ASSERT_TRUE(cp.ok());
  auto a = c->DecodeFrame(Bytes(cp->frame), DType::kF32);
  auto b = c->DecodeFrame(Bytes(cp->frame), DType::kBF16);
  ASSERT_TRUE(a.ok() && b.ok());
  const std::vector<float> fa = ToF32(DType::kF32, a->data);
  std::vector<uint8_t> want = ToDType(DType::kBF16, fa.data(), fa.size());
  EXPECT_EQ(b->data, want);
}

TEST(KvCodecPages, PerChannelPartialPageStoredRaw) {
  auto c = Make(Spec("key", "f32", "per_channel", 2));
  auto pages = Pages(*c, Tensor(10));
  auto full = Compress(*c, pages[0]);
  auto partial = Compress(*c, pages[1]);  // tokens [8, 12): 4 < tokens_per_page
  ASSERT_TRUE(full.ok() && partial.ok());
  EXPECT_EQ(full->counts.coded, kDim);
  EXPECT_EQ(partial->counts.raw_policy, kDim);
  EXPECT_EQ(partial->counts.coded, 0u);
  EXPECT_EQ(partial->raw_reasons, std::vector<std::string>{"partial_page"});
}

TEST(KvCodecPages, ProtectedTokensLayersHeads) {
  nlohmann::json s = Spec("key", "f32", "per_token", 4);
  s["protected"] = {{"first_tokens_raw", 2}, {"last_tokens_raw", 1}, {"raw_heads", {1}}};
  auto c = Make(s);
  auto pages = Pages(*c, Tensor(11));  // order: (l0,h0,p0) (l0,h0,p1) (l0,h1,p0) ...
  auto p0 = Compress(*c, pages[0]);
  auto p1 = Compress(*c, pages[1]);
  auto h1 = Compress(*c, pages[2]);
  ASSERT_TRUE(p0.ok() && p1.ok() && h1.ok());
  EXPECT_EQ(p0->counts.raw_protected, 2u);  // tokens 0, 1
  EXPECT_EQ(p1->counts.raw_protected, 1u);  // token 11
  EXPECT_EQ(h1->counts.raw_protected, kTpp);  // head 1
  auto v = *ParseKvFrame(Bytes(p0->frame));
  EXPECT_TRUE(v.IsRaw(0) && v.IsRaw(1) && !v.IsRaw(2));
  // Per-channel: any protected token in the page makes the whole page raw.
  nlohmann::json sc = Spec("key", "f32", "per_channel", 2);
  sc["protected"] = {{"first_tokens_raw", 1}};
  auto cc = Make(sc);
  auto q0 = Compress(*cc, Pages(*cc, Tensor(11))[0]);
  ASSERT_TRUE(q0.ok());
  EXPECT_EQ(q0->counts.raw_protected, kDim);
}

// CompressPage skips the reconstruction when neither metrics nor a budget need it and hands the
// page's own bytes to the quantizer when nothing transforms them; DecodeFrameInto decodes into the
// caller's string. Neither may change a byte: frames equal with and without metrics, decodes equal
// to DecodeFrame, on every path (f32/f16/bf16, channel axis, protected and fallback vectors,
// centering, renormalisation).
TEST(KvCodecPages, FastPathsAreByteIdentical) {
  std::vector<nlohmann::json> specs = {Spec("key", "f32", "per_token", 4), Spec("key", "f16", "per_token", 4),
                                       Spec("value", "bf16", "per_token", 4), Spec("key", "f32", "per_channel", 2),
                                       Spec("key", "f16", "raw", 4)};
  specs.push_back(Spec("key", "f16", "per_token", 4));
  specs.back()["protected"] = {{"first_tokens_raw", 2}, {"raw_heads", {1}}};
  specs.push_back(Spec("key", "f32", "per_token", 4));
  specs.back()["centering"] = "page";
  specs.push_back(Spec("key", "f16", "per_token", 4));
  specs.back()["renormalize"] = true;
  for (const auto& spec : specs) {
    SCOPED_TRACE(spec.dump());
    auto c = Make(spec);
    ASSERT_NE(c, nullptr);
    std::vector<PageData> pages = Pages(*c, Tensor(21));
    PageData zero = pages[0];  // token 2 a zero vector: an encode fallback
    std::memset(zero.bytes.data() + 2 * kDim * DTypeSize(c->profile().shape.dtype), 0,
                kDim * DTypeSize(c->profile().shape.dtype));
    pages.push_back(zero);
    for (const PageData& p : pages) {
      KvCompressOptions quiet;
      quiet.compute_metrics = false;
      auto a = Compress(*c, p, quiet);
      auto b = Compress(*c, p);
      ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
      EXPECT_FALSE(a->metrics.has_value());
      EXPECT_TRUE(b->metrics.has_value());
      EXPECT_EQ(a->frame, b->frame);
      EXPECT_EQ(a->frame_digest, b->frame_digest);
      EXPECT_EQ(a->counts, b->counts);
      for (DType out : {DType::kF32, DType::kF16, DType::kBF16}) {
        auto want = c->DecodeFrame(Bytes(a->frame), out);
        ASSERT_TRUE(want.ok()) << want.status();
        std::string got = "stale bytes the decode must replace";
        auto info = c->DecodeFrameInto(Bytes(a->frame), out, &got);
        ASSERT_TRUE(info.ok()) << info.status();
        EXPECT_EQ(got, std::string(want->data.begin(), want->data.end())) << DTypeName(out);
        EXPECT_TRUE(info->data.empty());
        EXPECT_EQ(info->coords, want->coords);
        EXPECT_EQ(info->counts, want->counts);
        EXPECT_EQ(info->dtype, out);
      }
    }
  }
  // A corrupt frame is refused by DecodeFrameInto as by DecodeFrame.
  auto c = Make(Spec("key", "f32", "per_token", 4));
  auto cp = Compress(*c, Pages(*c, Tensor(22))[0]);
  ASSERT_TRUE(cp.ok());
  std::string bad = cp->frame;
  bad[kKvFrameHeaderBytes + 3] ^= 0x10;  // bitmap byte; the checksum no longer matches
  std::string out;
  EXPECT_EQ(c->DecodeFrameInto(Bytes(bad), DType::kF32, &out).status().code(), StatusCode::kDataLoss);
}

TEST(KvCodecPages, InputValidation) {
  auto c = Make(Spec("key", "f32", "per_token", 4));
  PageData p = Pages(*c, Tensor(12))[0];
  KvPageInput in;
  in.coords = p.coords;
  in.dtype = DType::kF32;
  in.data = p.bytes;
  in.dtype = DType::kF16;
  EXPECT_EQ(c->CompressPage(in).status().code(), StatusCode::kInvalidArgument);
  in.dtype = DType::kF32;
  in.data = absl::Span<const uint8_t>(p.bytes).subspan(1);
  EXPECT_EQ(c->CompressPage(in).status().code(), StatusCode::kInvalidArgument);
  in.data = p.bytes;
  in.coords.layer = kLayers;
  EXPECT_EQ(c->CompressPage(in).status().code(), StatusCode::kOutOfRange);
  in.coords = p.coords;
  in.coords.token_start = 1;
  EXPECT_EQ(c->CompressPage(in).status().code(), StatusCode::kInvalidArgument);
  in.coords = p.coords;
  in.coords.token_count = 7;
  EXPECT_EQ(c->CompressPage(in).status().code(), StatusCode::kInvalidArgument);
  in.coords = p.coords;
  std::vector<float> q(kDim + 1);
  in.queries = q;
  EXPECT_EQ(c->CompressPage(in).status().code(), StatusCode::kInvalidArgument);
  in.queries = {};
  std::vector<uint8_t> bad = p.bytes;
  const float nan = NAN;
  std::memcpy(bad.data() + 8, &nan, 4);
  in.data = bad;
  EXPECT_EQ(c->CompressPage(in).status().code(), StatusCode::kInvalidArgument);
  // The same refusal, naming the element, when no metric is computed (the check then reads the
  // page's bytes without converting them), for f32 and for an f16 infinity.
  KvCompressOptions quiet;
  quiet.compute_metrics = false;
  auto st = c->CompressPage(in, quiet).status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("page input element [0, 2]"), std::string::npos) << st;
  auto c16 = Make(Spec("key", "f16", "per_token", 4));
  PageData p16 = Pages(*c16, Tensor(12))[0];
  p16.bytes[2 * (kDim + 5) + 1] = 0x7C;  // token 1, channel 5: exponent all ones, mantissa 0 = inf
  p16.bytes[2 * (kDim + 5)] = 0;
  for (bool metrics : {false, true}) {
    KvCompressOptions o;
    o.compute_metrics = metrics;
    auto s16 = Compress(*c16, p16, o).status();
    EXPECT_EQ(s16.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s16.message().find("page input element [1, 5]"), std::string::npos) << s16;
  }
}

TEST(KvCodecPages, EncodeFallbackKeepRawAndFailClosed) {
  auto c = Make(Spec("key", "f32", "per_token", 4));
  PageData p = Pages(*c, Tensor(13))[0];
  std::memset(p.bytes.data() + 3 * kDim * 4, 0, kDim * 4);  // token 3 is a zero vector
  auto cp = Compress(*c, p);
  ASSERT_TRUE(cp.ok()) << cp.status();
  EXPECT_EQ(cp->counts.raw_encode_fallback, 1u);
  ASSERT_EQ(cp->raw_reasons.size(), 1u);
  EXPECT_EQ(cp->raw_reasons[0].rfind("encode_fallback:", 0), 0u);
  auto dec = c->DecodeFrame(Bytes(cp->frame), DType::kF32);
  ASSERT_TRUE(dec.ok());
  EXPECT_EQ(ToF32(DType::kF32, dec->data)[3 * kDim + 5], 0.0f);
  nlohmann::json s = Spec("key", "f32", "per_token", 4);
  s["fallback"] = {{"mode", "fail_closed"}};
  auto fc = Make(s);
  EXPECT_EQ(Compress(*fc, p).status().code(), StatusCode::kInvalidArgument);
}

// Issue 14 item 12: a token with norm ~4e-8 used to be coded with its fp16 norm rounded to the
// smallest subnormal (57 % relative error, no fallback). Now it is an encode fallback stored raw,
// decoded exactly; fail_closed refuses the page with OutOfRange naming the vector.
TEST(KvCodecPages, TinyNormVectorIsStoredRawNotCodedWrong) {
  auto c = Make(Spec("key", "f32", "per_token", 4));
  PageData p = Pages(*c, Tensor(17))[0];
  std::vector<float> tiny(kDim, 1e-8f);  // norm 4e-8
  std::memcpy(p.bytes.data() + 5 * kDim * 4, tiny.data(), kDim * 4);
  auto cp = Compress(*c, p);
  ASSERT_TRUE(cp.ok()) << cp.status();
  EXPECT_EQ(cp->counts.raw_encode_fallback, 1u);
  auto dec = c->DecodeFrame(Bytes(cp->frame), DType::kF32);
  ASSERT_TRUE(dec.ok()) << dec.status();
  const std::vector<float> got = ToF32(DType::kF32, dec->data);
  for (uint32_t i = 0; i < kDim; ++i) EXPECT_EQ(got[5 * kDim + i], 1e-8f) << i;
  nlohmann::json s = Spec("key", "f32", "per_token", 4);
  s["fallback"] = {{"mode", "fail_closed"}};
  auto fc = Make(s);
  EXPECT_EQ(Compress(*fc, p).status().code(), StatusCode::kOutOfRange);
}

TEST(KvCodecPages, ReferencePathRoundTrip) {
  auto c = Make(Spec("key", "f32", "per_token", 4));
  KvCompressOptions opt;
  opt.path = CodecPath::kReference;
  for (const PageData& p : Pages(*c, Tensor(21))) {
    auto cp = Compress(*c, p, opt);
    ASSERT_TRUE(cp.ok()) << cp.status();
    auto ref = c->DecodeFrame(Bytes(cp->frame), DType::kF32, CodecPath::kReference);
    auto fast = c->DecodeFrame(Bytes(cp->frame), DType::kF32, CodecPath::kFast);
    ASSERT_TRUE(ref.ok() && fast.ok());
    const std::vector<float> a = ToF32(DType::kF32, ref->data), b = ToF32(DType::kF32, fast->data);
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5f * (1 + std::fabs(a[i])));
  }
}

TEST(KvCodecPages, ConcurrentUseIsDeterministic) {
  nlohmann::json s = Spec("value", "f16", "per_token", 4);
  s["quality_budget"] = {{"max_value_aggregation_mse", 1e-4}};
  auto c = Make(s);
  const auto pages = Pages(*c, Tensor(22));
  std::vector<std::string> want;
  for (const PageData& p : pages) want.push_back(Compress(*c, p)->frame);
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 5; ++rep) {
        for (size_t i = 0; i < pages.size(); ++i) {
          auto cp = Compress(*c, pages[i]);
          if (!cp.ok() || cp->frame != want[i]) ++mismatches[t];
          if (!c->DecodeFrame(Bytes(want[i]), DType::kF32).ok()) ++mismatches[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int m : mismatches) EXPECT_EQ(m, 0);
}

TEST(KvCodecPages, RandomCorruptionAlwaysRejected) {
  // Every single-byte change or truncation of a valid frame is rejected (never decoded, never a crash).
  nlohmann::json s = Spec("key", "bf16", "per_channel", 2);
  auto c = Make(s);
  auto cp = Compress(*c, Pages(*c, Tensor(23))[0]);
  ASSERT_TRUE(cp.ok());
  const std::string& f = cp->frame;
  uint64_t x = 12345;
  for (int trial = 0; trial < 400; ++trial) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    std::string g = f;
    const size_t pos = (x >> 33) % g.size();
    g[pos] = static_cast<char>(g[pos] ^ static_cast<char>(1 + ((x >> 20) % 255)));
    EXPECT_FALSE(c->DecodeFrame(Bytes(g), DType::kF32).ok()) << "byte " << pos;
    if (trial % 4 == 0) Reseal(&g);  // past the checksum, the field checks must still hold or decode sanely
    auto st = c->DecodeFrame(Bytes(g), DType::kF32).status();
    if (!st.ok()) {
      EXPECT_TRUE(st.code() == StatusCode::kDataLoss || st.code() == StatusCode::kInvalidArgument ||
                  st.code() == StatusCode::kResourceExhausted) << st;
    }
    EXPECT_FALSE(c->DecodeFrame(Bytes(f).subspan(0, (x >> 40) % f.size()), DType::kF32).ok());
  }
}

// --- Profile-aware frame corruption -------------------------------------------------------------

struct CorruptFixture {
  std::shared_ptr<const KvCodec> codec;
  std::string frame;
  size_t first_code = 0;  // offset of the first code in the frame
};

CorruptFixture MakeCorrupt() {
  nlohmann::json s = Spec("key", "f32", "per_token", 4);
  s["protected"] = {{"first_tokens_raw", 1}};
  CorruptFixture f;
  f.codec = Make(s);
  auto cp = Compress(*f.codec, Pages(*f.codec, Tensor(14))[0]);
  EXPECT_TRUE(cp.ok());
  f.frame = cp->frame;
  f.first_code = kKvFrameHeaderBytes + 1;  // 8 vectors: a 1-byte bitmap
  return f;
}

absl::Status DecodeStatus(const CorruptFixture& f, const std::string& frame) {
  return f.codec->DecodeFrame(Bytes(frame), DType::kF32).status();
}

TEST(KvCodecCorrupt, CleanFrameDecodes) {
  CorruptFixture f = MakeCorrupt();
  EXPECT_TRUE(DecodeStatus(f, f.frame).ok());
  EXPECT_EQ(f.codec->quantizer()->code_bytes(), 4u);
}

TEST(KvCodecCorrupt, ProfileDigestOfAnotherProfile) {
  CorruptFixture f = MakeCorrupt();
  auto other = Make(Spec("key", "f32", "per_token", 4));  // no protection: another digest
  auto st = other->DecodeFrame(Bytes(f.frame), DType::kF32).status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("profile digest"), std::string::npos);
  std::string g = f.frame;
  g[12] ^= 1;
  Reseal(&g);
  EXPECT_EQ(DecodeStatus(f, g).code(), StatusCode::kInvalidArgument);
}

TEST(KvCodecCorrupt, CoordinatesOutsideShape) {
  CorruptFixture f = MakeCorrupt();
  for (size_t off : {size_t{44}, size_t{48}, size_t{52}}) {  // batch, layer, kv_head
    std::string g = f.frame;
    PutU32(&g, off, 9);
    Reseal(&g);
    auto st = DecodeStatus(f, g);
    EXPECT_EQ(st.code(), StatusCode::kDataLoss) << off;
    EXPECT_NE(st.message().find("coordinates"), std::string::npos);
  }
  std::string g = f.frame;
  PutU32(&g, 56, 4);  // token_start off the page grid
  Reseal(&g);
  EXPECT_EQ(DecodeStatus(f, g).code(), StatusCode::kDataLoss);
}

TEST(KvCodecCorrupt, AxisPolicyByte) {
  CorruptFixture f = MakeCorrupt();
  std::string g = f.frame;
  g[9] = static_cast<char>(KvAxisPolicy::kRoleAwareKiviStyle);
  Reseal(&g);
  EXPECT_EQ(DecodeStatus(f, g).code(), StatusCode::kDataLoss);
}

TEST(KvCodecCorrupt, RawDtypeByte) {
  CorruptFixture f = MakeCorrupt();
  std::string g = f.frame;
  g[8] = static_cast<char>(DType::kF16);  // also changes the raw section size
  Reseal(&g);
  EXPECT_EQ(DecodeStatus(f, g).code(), StatusCode::kDataLoss);
}

TEST(KvCodecCorrupt, ProtectedCountAndRawMap) {
  CorruptFixture f = MakeCorrupt();
  std::string g = f.frame;
  PutU32(&g, 80, 0);  // raw_protected 1 -> 0
  PutU32(&g, 88, 1);  // raw_encode_fallback 0 -> 1 (totals still agree)
  Reseal(&g);
  auto st = DecodeStatus(f, g);
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("raw_protected"), std::string::npos);
  // Move the raw mark from protected token 0 to token 1: the protected vector is no longer raw.
  std::string h = f.frame;
  h[kKvFrameHeaderBytes] = 0x02;
  Reseal(&h);
  st = DecodeStatus(f, h);
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("raw map"), std::string::npos);
}

TEST(KvCodecCorrupt, CodeIndexOutOfRange) {
  CorruptFixture f = MakeCorrupt();
  std::string g = f.frame;
  g[f.first_code + 2] = static_cast<char>(g[f.first_code + 2] | 0x07);  // first index = 7 >= N = 6
  Reseal(&g);
  auto st = DecodeStatus(f, g);
  EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st;
  EXPECT_EQ(f.codec->DecodeVector(Bytes(g), 1, DType::kF32).status().code(), StatusCode::kDataLoss);
}

TEST(KvCodecCorrupt, CodePaddingBits) {
  CorruptFixture f = MakeCorrupt();
  std::string g = f.frame;
  g[f.first_code + 3] = static_cast<char>(g[f.first_code + 3] | 0x80);  // bit 15 of 12 used bits
  Reseal(&g);
  EXPECT_EQ(DecodeStatus(f, g).code(), StatusCode::kDataLoss);
}

TEST(KvCodecCorrupt, CodeNormNotFinite) {
  CorruptFixture f = MakeCorrupt();
  std::string g = f.frame;
  g[f.first_code] = 0x00;
  g[f.first_code + 1] = 0x7C;  // fp16 +inf
  Reseal(&g);
  EXPECT_EQ(DecodeStatus(f, g).code(), StatusCode::kDataLoss);
}

TEST(KvCodecCorrupt, VectorIndexOutOfRange) {
  CorruptFixture f = MakeCorrupt();
  EXPECT_EQ(f.codec->DecodeVector(Bytes(f.frame), kTpp, DType::kF32).status().code(), StatusCode::kOutOfRange);
}

TEST(KvCodecCorrupt, ChecksumAndTruncation) {
  CorruptFixture f = MakeCorrupt();
  std::string g = f.frame;
  g[f.first_code + 5] ^= 0x01;
  EXPECT_EQ(DecodeStatus(f, g).code(), StatusCode::kDataLoss);
  EXPECT_EQ(DecodeStatus(f, f.frame.substr(0, f.frame.size() - 3)).code(), StatusCode::kDataLoss);
}

// --- Quality budgets -----------------------------------------------------------------------------

nlohmann::json BudgetSpec(double limit, const std::string& mode) {
  nlohmann::json s = Spec("key", "f32", "per_token", 4);
  s["quality_budget"] = {{"max_attention_tv", limit}, {"fallback_on_violation", mode}};
  if (mode == "fail_closed") s["fallback"] = {{"mode", "fail_closed"}};
  return s;
}

double MeasuredTv(const PageData& p) {
  auto c = Make(Spec("key", "f32", "per_token", 4));
  KvCompressOptions opt;
  auto cp = Compress(*c, p, opt);
  EXPECT_TRUE(cp.ok());
  return *cp->metrics->attention_tv;
}

TEST(KvCodecBudget, KeepRawExactlyAtThreshold) {
  auto base = Make(Spec("key", "f32", "per_token", 4));
  const PageData p = Pages(*base, Tensor(15))[0];
  const double tv = MeasuredTv(p);
  ASSERT_GT(tv, 0);
  auto at = Compress(*Make(BudgetSpec(tv, "keep_raw")), p);
  ASSERT_TRUE(at.ok()) << at.status();
  EXPECT_EQ(at->counts.raw_quality_fallback, 0u);
  ASSERT_EQ(at->budget_checks.size(), 1u);
  EXPECT_TRUE(at->budget_checks[0].passed);
  EXPECT_EQ(at->budget_checks[0].value, tv);
  EXPECT_FALSE(at->metrics_before_fallback.has_value());

  const double below = std::nextafter(tv, 0.0);
  auto codec = Make(BudgetSpec(below, "keep_raw"));
  auto over = Compress(*codec, p);
  ASSERT_TRUE(over.ok()) << over.status();
  EXPECT_GT(over->counts.raw_quality_fallback, 0u);
  EXPECT_TRUE(over->budget_checks[0].passed);
  EXPECT_LE(over->budget_checks[0].value, below);
  EXPECT_EQ(over->budget_checks[0].value_before, tv);
  ASSERT_TRUE(over->metrics_before_fallback.has_value());
  EXPECT_EQ(*over->metrics_before_fallback->attention_tv, tv);
  EXPECT_NE(std::find(over->raw_reasons.begin(), over->raw_reasons.end(), "quality_budget:attention_tv"),
            over->raw_reasons.end());
  // The stored frame reproduces the final metrics and decodes.
  auto dec = codec->DecodeFrame(Bytes(over->frame), DType::kF32);
  ASSERT_TRUE(dec.ok()) << dec.status();
  EXPECT_EQ(dec->counts.raw_quality_fallback, over->counts.raw_quality_fallback);

  // A zero budget forces every vector raw and is then met exactly.
  auto zero = Compress(*Make(BudgetSpec(0.0, "keep_raw")), p);
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(zero->counts.coded, 0u);
  EXPECT_EQ(zero->budget_checks[0].value, 0.0);
}

TEST(KvCodecBudget, FailClosedExactlyAtThreshold) {
  auto base = Make(Spec("key", "f32", "per_token", 4));
  const PageData p = Pages(*base, Tensor(16))[0];
  const double tv = MeasuredTv(p);
  EXPECT_TRUE(Compress(*Make(BudgetSpec(tv, "fail_closed")), p).ok());
  auto st = Compress(*Make(BudgetSpec(std::nextafter(tv, 0.0), "fail_closed")), p).status();
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("attention_tv"), std::string::npos);
  EXPECT_NE(st.message().find("layer 0"), std::string::npos);
  // Measuring without enforcement never fails.
  KvCompressOptions opt;
  opt.enforce_budget = false;
  auto m = Compress(*Make(BudgetSpec(0.0, "fail_closed")), p, opt);
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(m->budget_checks[0].passed);
}

TEST(KvCodecBudget, ValueAggregationBudget) {
  nlohmann::json s = Spec("value", "f32", "per_token", 4);
  s["quality_budget"] = {{"max_value_aggregation_mse", 0.0}};
  auto c = Make(s);
  auto cp = Compress(*c, Pages(*c, Tensor(17))[0]);
  ASSERT_TRUE(cp.ok()) << cp.status();
  EXPECT_EQ(cp->metrics->query_source, KvQuerySource::kProxySelfValues);
  EXPECT_EQ(cp->counts.coded, 0u);
}

// --- Receipts -----------------------------------------------------------------------------------

absl::StatusOr<KvReceipt> Stream(const std::shared_ptr<const KvCodec>& c, uint32_t seed, bool reverse,
                                 std::optional<int64_t> t = std::nullopt) {
  KvReceiptBuilder b(c);
  auto pages = Pages(*c, Tensor(seed));
  if (reverse) std::reverse(pages.begin(), pages.end());
  for (const PageData& p : pages) {
    auto cp = Compress(*c, p);
    if (!cp.ok()) return cp.status();
    auto st = b.Add(*cp);
    if (!st.ok()) return st;
  }
  return b.Finish(t);
}

TEST(KvReceipt, DeterministicAndOrderSensitive) {
  nlohmann::json s = Spec("key", "f32", "per_token", 4);
  s["protected"] = {{"first_tokens_raw", 1}};
  s["quality_budget"] = {{"max_attention_tv", 0.05}};
  auto c = Make(s);
  auto a = Stream(c, 18, false, 1000);
  auto b = Stream(c, 18, false, 2000);
  auto r = Stream(c, 18, true);
  auto other = Stream(c, 19, false);
  ASSERT_TRUE(a.ok() && b.ok() && r.ok() && other.ok()) << a.status();
  EXPECT_EQ(a->digest, b->digest);  // the recorded time is outside the digest
  EXPECT_EQ(a->CanonicalBytes(), b->CanonicalBytes());
  EXPECT_NE(a->digest, r->digest);
  EXPECT_NE(a->source_digest, r->source_digest);
  EXPECT_NE(a->digest, other->digest);
  EXPECT_EQ(a->pages, uint64_t{kLayers} * kHeads * 2);
  EXPECT_EQ(a->vectors, uint64_t{kLayers} * kHeads * kTokens);
  EXPECT_EQ(a->raw_protected, uint64_t{kLayers} * kHeads);
  EXPECT_EQ(a->vectors, a->vectors_compressed + a->raw_protected + a->raw_policy + a->raw_encode_fallback +
                            a->raw_quality_fallback);
  EXPECT_EQ(a->bytes_in, uint64_t{kLayers} * kHeads * kTokens * kDim * 4);
  EXPECT_DOUBLE_EQ(a->compression_ratio, double(a->bytes_in) / double(a->bytes_out));
  EXPECT_EQ(a->layer_head.size(), size_t{kLayers} * kHeads);
  ASSERT_EQ(a->budget.size(), 1u);
  EXPECT_TRUE(a->budget[0].passed);
  EXPECT_EQ(a->budget[0].pages_measured, a->pages);
  EXPECT_LE(a->budget[0].worst_value, 0.05);
  ASSERT_TRUE(a->quality_mean.has_value());
  EXPECT_EQ(a->quality_mean->query_source, KvQuerySource::kProxySelfKeys);
  auto j = nlohmann::json::parse(a->ToJson());
  EXPECT_EQ(j["digest"], a->digest);
  EXPECT_EQ(j["quality_mean"]["query_source"], "proxy_self_keys");
  EXPECT_EQ(j["recorded_unix_seconds"], 1000);
  EXPECT_EQ(j["profile_digest"], c->profile_digest());
}

TEST(KvReceipt, RejectsPageOfAnotherProfile) {
  auto a = Make(Spec("key", "f32", "per_token", 4));
  auto b = Make(Spec("key", "f16", "per_token", 4));
  auto cp = Compress(*a, Pages(*a, Tensor(20))[0]);
  ASSERT_TRUE(cp.ok());
  KvReceiptBuilder rb(b);
  EXPECT_EQ(rb.Add(*cp).code(), StatusCode::kInvalidArgument);
}

TEST(KvDigests, PageSourceDigestByHand) {
  // Domain, 0x00, five u32 coordinates, Str(dtype name), u64 length, data (docs/format/kv.md section 8).
  std::string want("fq_kv_source_page_v1\0", 21);
  for (uint32_t v : {1u, 2u, 3u, 4u, 2u}) {
    for (int i = 0; i < 4; ++i) want.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  }
  want += std::string("\x03\0\0\0f16", 7);
  want += std::string("\x04\0\0\0\0\0\0\0", 8);
  want += std::string("\x01\x02\x03\x04", 4);
  const std::vector<uint8_t> data = {1, 2, 3, 4};
  const auto raw = KvPageSourceDigest({1, 2, 3, 4, 2}, DType::kF16, data);
  EXPECT_EQ(RenderDigest(raw), Sha256Digest(want));
}

TEST(KvCodecCreate, QuantizerMustMatchProfile) {
  auto tok = Make(Spec("key", "f32", "per_token", 4));
  auto p = KvCompressionProfile::FromSpecJson(Spec("key", "f32", "per_channel", 2).dump());
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(KvCodec::Create(*p, tok->quantizer()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(KvCodec::Create(*p, nullptr).status().code(), StatusCode::kInvalidArgument);
  KvCompressionProfile resolved = tok->profile();
  EXPECT_TRUE(resolved.resolved());
  EXPECT_TRUE(resolved.ValidateDeep().ok()) << resolved.ValidateDeep();
  resolved.codebook_digest = resolved.rotation_digest;  // wrong but well-formed
  EXPECT_EQ(KvCodec::Create(resolved, tok->quantizer()).status().code(), StatusCode::kInvalidArgument);
  auto raw = KvCompressionProfile::FromSpecJson(Spec("key", "f32", "raw", 0).dump());
  EXPECT_EQ(KvCodec::Create(*raw, tok->quantizer()).status().code(), StatusCode::kInvalidArgument);
  // A resolved profile survives its JSON round trip with the same digest.
  auto back = KvCompressionProfile::FromJson(tok->profile().ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back->Digest(), tok->profile_digest());
}

}  // namespace
}  // namespace fibquant
