// Randomized corruption of real page frames (issue 7): every axis policy (per_token, per_channel,
// role-aware keys and values, raw) x every dtype (f32, f16, bf16), every page of a small tensor
// (full and partial pages, a protected first token). Each frame is corrupted many times (bounded,
// fixed seed) by bit flips, byte overwrites, truncation, extension, segment deletion/duplication and
// splices with other frames of the same profile. The rule checked on every result of DecodeFrame and
// DecodeVector: success only when the bytes are exactly one of the real frames (and then the data
// is exactly that frame's), otherwise DataLoss or InvalidArgument. Never wrong data as success.
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/half.h"
#include "core/kv_codec.h"
#include "core/kv_frame.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

using absl::StatusCode;

constexpr uint32_t kLayers = 2, kHeads = 2, kTokens = 12, kDim = 16, kTpp = 8;
constexpr int kMutationsPerFrame = 150;

std::string Spec(const std::string& role, const std::string& dtype, const std::string& axis, int block_dim) {
  std::string s = "{\"profile_id\":\"corrupt." + role + "." + dtype + "." + axis +
                  "\",\"shape\":{\"role\":\"" + role +
                  "\",\"attention_kind\":\"mha\",\"batch\":1,\"layers\":2,\"kv_heads\":2,\"query_heads\":2,"
                  "\"tokens\":12,\"head_dim\":16,\"dtype\":\"" + dtype + "\",\"rope_state\":\"" +
                  (role == "key" ? "post_rope" : "not_applicable") + "\"},\"axis_policy\":\"" + axis +
                  "\",\"tokens_per_page\":8,\"protected\":{\"first_tokens_raw\":1}";
  if (axis != "raw") {
    s += ",\"fibquant\":{\"block_dim\":" + std::to_string(block_dim) +
         ",\"codebook_size\":6,\"seed\":5,\"training_samples\":400,\"lloyd_restarts\":1,\"lloyd_iterations\":3}";
  }
  return s + "}";
}

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

struct Known {
  std::vector<uint8_t> page;                  // DecodeFrame of the real frame
  std::vector<std::vector<uint8_t>> vectors;  // DecodeVector of each vector
};

struct Counts {
  int mutations = 0, unchanged = 0, decoded_known = 0, rejected = 0;
};

bool AllowedError(const absl::Status& s) {
  return s.code() == StatusCode::kDataLoss || s.code() == StatusCode::kInvalidArgument;
}

class CorruptionTest : public ::testing::TestWithParam<std::tuple<std::string, std::string, std::string>> {};

TEST_P(CorruptionTest, NeverWrongDataAsSuccess) {
  const auto& [role, dtype, axis] = GetParam();
  auto profile = KvCompressionProfile::FromSpecJson(Spec(role, dtype, axis, axis == "per_token" ? 4 : 2));
  ASSERT_TRUE(profile.ok()) << profile.status();
  auto codec = KvCodec::Build(*profile, 1);
  ASSERT_TRUE(codec.ok()) << codec.status();
  const KvCodec& c = **codec;
  const DType dt = c.profile().shape.dtype;

  // Every page of a deterministic tensor.
  std::vector<std::string> frames;
  std::map<std::string, Known> known;
  std::mt19937_64 rng(0xC0FFEEu ^ std::hash<std::string>{}(role + dtype + axis));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (uint32_t h = 0; h < kHeads; ++h) {
      for (uint32_t t0 = 0; t0 < kTokens; t0 += kTpp) {
        const uint32_t n = std::min(kTpp, kTokens - t0);
        std::vector<float> x(size_t{n} * kDim);
        for (size_t i = 0; i < x.size(); ++i) x[i] = normal(rng) * ((i % kDim) == 3 ? 8.0f : 1.0f);
        std::vector<uint8_t> bytes(x.size() * DTypeSize(dt));
        FromFloat(dt, x.data(), x.size(), bytes.data());
        KvPageInput in;
        in.coords = {0, l, h, t0, n};
        in.dtype = dt;
        in.data = bytes;
        auto cp = c.CompressPage(in);
        ASSERT_TRUE(cp.ok()) << cp.status();
        auto dec = c.DecodeFrame(Bytes(cp->frame), dt);
        ASSERT_TRUE(dec.ok()) << dec.status();
        Known k;
        k.page = dec->data;
        for (uint32_t i = 0; i < cp->counts.vector_count; ++i) {
          auto v = c.DecodeVector(Bytes(cp->frame), i, dt);
          ASSERT_TRUE(v.ok()) << v.status();
          k.vectors.push_back(*v);
        }
        if (axis == "raw") {
          EXPECT_EQ(k.page, bytes);  // the raw policy stores the page verbatim
        }
        known.emplace(cp->frame, std::move(k));
        frames.push_back(cp->frame);
      }
    }
  }
  ASSERT_EQ(frames.size(), size_t{kLayers} * kHeads * 2);

  Counts counts;
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  for (size_t fi = 0; fi < frames.size(); ++fi) {
    const std::string& f = frames[fi];
    for (int m = 0; m < kMutationsPerFrame; ++m) {
      std::string g = f;
      const int kind = static_cast<int>(rng() % 8);
      switch (kind) {
        case 0:  // flip 1..4 random bits
          for (size_t b = 0, nb = 1 + pick(4); b < nb; ++b) g[pick(g.size())] ^= static_cast<char>(1u << pick(8));
          break;
        case 1:  // overwrite 1..8 random bytes with random values (may leave them unchanged)
          for (size_t b = 0, nb = 1 + pick(8); b < nb; ++b) g[pick(g.size())] = static_cast<char>(rng());
          break;
        case 2:  // truncate
          g.resize(pick(g.size()));
          break;
        case 3:  // extend by 1..16 random bytes
          for (size_t b = 0, nb = 1 + pick(16); b < nb; ++b) g.push_back(static_cast<char>(rng()));
          break;
        case 4: {  // delete a segment
          const size_t at = pick(g.size()), len = 1 + pick(std::min<size_t>(64, g.size() - at));
          g.erase(at, len);
          break;
        }
        case 5: {  // duplicate a segment in place
          const size_t at = pick(g.size()), len = 1 + pick(std::min<size_t>(64, g.size() - at));
          g.insert(at, g.substr(at, len));
          break;
        }
        case 6: {  // splice: a prefix of this frame + a suffix of another frame of the same profile
          const std::string& o = frames[pick(frames.size())];
          g = f.substr(0, pick(f.size() + 1)) + o.substr(pick(o.size() + 1));
          break;
        }
        default: {  // splice a block of another frame over the same offsets
          const std::string& o = frames[pick(frames.size())];
          const size_t at = pick(std::min(g.size(), o.size())), len = 1 + pick(std::min(g.size(), o.size()) - at);
          std::memcpy(g.data() + at, o.data() + at, len);
          break;
        }
      }
      ++counts.mutations;
      auto it = known.find(g);
      if (g == f) ++counts.unchanged;
      auto page = c.DecodeFrame(Bytes(g), dt);
      const uint32_t vi = static_cast<uint32_t>(pick(4));  // every frame here has >= 4 vectors
      auto vec = c.DecodeVector(Bytes(g), vi, dt);
      if (it != known.end()) {
        // The bytes are exactly a real frame: it must decode to exactly that frame's data.
        ++counts.decoded_known;
        ASSERT_TRUE(page.ok()) << "kind " << kind << ": " << page.status();
        EXPECT_EQ(page->data, it->second.page) << "kind " << kind;
        ASSERT_TRUE(vec.ok()) << vec.status();
        EXPECT_EQ(*vec, it->second.vectors[vi]);
        continue;
      }
      ++counts.rejected;
      ASSERT_FALSE(page.ok()) << "corrupted frame (mutation kind " << kind << ", frame " << fi
                              << ") decoded as success";
      EXPECT_TRUE(AllowedError(page.status())) << "kind " << kind << ": " << page.status();
      ASSERT_FALSE(vec.ok()) << "corrupted frame (mutation kind " << kind << ") DecodeVector succeeded";
      EXPECT_TRUE(AllowedError(vec.status())) << "kind " << kind << ": " << vec.status();
    }
  }
  EXPECT_EQ(counts.mutations, static_cast<int>(frames.size()) * kMutationsPerFrame);
  EXPECT_GT(counts.rejected, counts.mutations / 2);  // the mutations really corrupt
  RecordProperty("mutations", counts.mutations);
  RecordProperty("rejected", counts.rejected);
  RecordProperty("decoded_known", counts.decoded_known);
}

std::string Name(const ::testing::TestParamInfo<CorruptionTest::ParamType>& info) {
  return std::get<0>(info.param) + "_" + std::get<1>(info.param) + "_" + std::get<2>(info.param);
}

INSTANTIATE_TEST_SUITE_P(
    AllPoliciesAllDTypes, CorruptionTest,
    ::testing::Combine(::testing::Values("key", "value"), ::testing::Values("f32", "f16", "bf16"),
                       ::testing::Values("per_token", "per_channel", "role_aware_kivi_style", "raw")),
    Name);

}  // namespace
}  // namespace fibquant
