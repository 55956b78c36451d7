// Tests for core/profile: PaperDefault, every validation rule with its exact status code, rates and
// code sizes, the canonical encoding and golden digests, the strict JSON form and the lenient spec
// JSON constructor.
#include "core/profile.h"

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "core/digest.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

using ::testing::HasSubstr;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

Profile Make(uint32_t d, uint32_t k, uint32_t n, uint64_t seed,
             std::string_view rotation = kRotationHaarQr) {
  absl::StatusOr<Profile> p = Profile::PaperDefault(d, k, n, seed, rotation);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? *p : Profile{};
}

std::string DigestOf(const Profile& p) {
  absl::StatusOr<std::string> d = p.Digest();
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *d : std::string();
}

// ------------------------------------------------------------------------------------------------
// PaperDefault

TEST(PaperDefault, WorkedExample) {
  const Profile p = Make(8, 2, 8, 7);
  EXPECT_EQ(p.schema_version, "fq_profile_v1");
  EXPECT_EQ(p.ambient_dim, 8u);
  EXPECT_EQ(p.block_dim, 2u);
  EXPECT_EQ(p.codebook_size, 8u);
  EXPECT_EQ(p.paper_rate_bits_per_coord, 1.5);
  EXPECT_EQ(p.wire_index_bits, 3);
  EXPECT_EQ(p.wire_bits_per_coord, 1.5);
  EXPECT_EQ(p.norm_format, NormFormat::kFp16);
  EXPECT_EQ(p.rotation_seed, 7u);
  EXPECT_EQ(p.rotation_algorithm, kRotationHaarQr);
  EXPECT_EQ(p.codebook_seed, 11400714819323198492ull);
  EXPECT_EQ(p.codebook_version, kCodebookVersion);
  EXPECT_EQ(p.source_mode, SourceMode::kCanonicalSphericalBeta);
  EXPECT_EQ(p.radius_method, RadiusMethod::kK2ClosedForm);
  EXPECT_EQ(p.direction_method, DirectionMethod::kFibonacciSpiral);
  EXPECT_EQ(p.lloyd_restarts, 4u);
  EXPECT_EQ(p.lloyd_iterations, 25u);
  EXPECT_EQ(p.training_samples, 256u);
  EXPECT_EQ(p.empty_cell_policy, EmptyCellPolicy::kSplitHighestDistortion);
  EXPECT_EQ(p.block_count(), 4u);
  EXPECT_EQ(p.code_bytes(), 2u + 2u);  // 4 blocks x 3 bits = 12 bits -> 2 bytes
  EXPECT_TRUE(p.Validate().ok());
}

TEST(PaperDefault, NonPowerOfTwoCodebookRates) {
  const Profile p3 = Make(8, 1, 3, 1);
  EXPECT_EQ(p3.wire_index_bits, 2);
  EXPECT_EQ(p3.wire_bits_per_coord, 2.0);
  EXPECT_NEAR(p3.paper_rate_bits_per_coord, 1.584962500721156, 1e-15);

  const Profile p33 = Make(64, 2, 33, 1);
  EXPECT_EQ(p33.wire_index_bits, 6);
  EXPECT_EQ(p33.wire_bits_per_coord, 3.0);
  EXPECT_NEAR(p33.paper_rate_bits_per_coord, std::log2(33.0) / 2.0, 1e-15);
  EXPECT_EQ(p33.code_bytes(), 2u + 24u);  // 32 blocks x 6 bits = 192 bits
}

TEST(PaperDefault, PaperRateIsExactForPowersOfTwoAndCloseToLibmOtherwise) {
  for (uint32_t j = 1; j <= 20; ++j) {
    const Profile p = Make(2, 1, 1u << j, 3);
    EXPECT_EQ(p.paper_rate_bits_per_coord, static_cast<double>(j)) << j;
    EXPECT_EQ(p.wire_index_bits, j);
  }
  for (uint32_t n = 2; n <= 5000; ++n) {
    const Profile p = Make(2, 1, n, 3);
    EXPECT_NEAR(p.paper_rate_bits_per_coord, std::log2(static_cast<double>(n)), 1e-14) << n;
  }
}

TEST(PaperDefault, MethodsDerivedFromBlockDim) {
  struct Case {
    uint32_t d, k;
    RadiusMethod radius;
    DirectionMethod direction;
  };
  const Case cases[] = {
      {8, 1, RadiusMethod::kBetaQuantile, DirectionMethod::kScalarQuantile},
      {8, 2, RadiusMethod::kK2ClosedForm, DirectionMethod::kFibonacciSpiral},
      {9, 3, RadiusMethod::kBetaQuantile, DirectionMethod::kFibonacciSphere},
      {8, 4, RadiusMethod::kBetaQuantile, DirectionMethod::kRobertsKronecker},
      {128, 8, RadiusMethod::kBetaQuantile, DirectionMethod::kRobertsKronecker},
      {512, 256, RadiusMethod::kBetaQuantile, DirectionMethod::kRobertsKronecker},
  };
  for (const Case& c : cases) {
    const Profile p = Make(c.d, c.k, 16, 5);
    EXPECT_EQ(p.radius_method, c.radius) << c.k;
    EXPECT_EQ(p.direction_method, c.direction) << c.k;
  }
}

TEST(PaperDefault, TrainingSamplesRule) {
  EXPECT_EQ(Make(8, 2, 2, 0).training_samples, 256u);      // max(60, 256)
  EXPECT_EQ(Make(8, 2, 9, 0).training_samples, 270u);      // 30 * 9
  EXPECT_EQ(Make(128, 4, 256, 0).training_samples, 7680u);  // 30 * 256
  // 30 * 2^20 = 31,457,280 is clamped to the 10,000,000 limit.
  EXPECT_EQ(Make(64, 2, 1u << 20, 0).training_samples, 10'000'000u);
  EXPECT_EQ(Make(64, 2, 333'333, 0).training_samples, 9'999'990u);
  EXPECT_EQ(Make(64, 2, 333'334, 0).training_samples, 10'000'000u);
}

TEST(PaperDefault, CodebookSeedWraps) {
  EXPECT_EQ(Make(8, 2, 8, 0).codebook_seed, 0x9E3779B97F4A7C15ull);
  EXPECT_EQ(Make(8, 2, 8, std::numeric_limits<uint64_t>::max()).codebook_seed,
            0x9E3779B97F4A7C14ull);
  EXPECT_EQ(Make(8, 2, 8, 0x61C8864680B583EBull).codebook_seed, 0u);
}

TEST(PaperDefault, RejectsBadPartsWithTheValidationCodes) {
  EXPECT_EQ(Profile::PaperDefault(0, 2, 8, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Profile::PaperDefault(8, 0, 8, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Profile::PaperDefault(8, 8, 8, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Profile::PaperDefault(8, 2, 1, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Profile::PaperDefault(8192, 2, 8, 1).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(Profile::PaperDefault(8, 2, 8, 1, "qr-gaussian-chacha8-sign-corrected-v1").status().code(),
            absl::StatusCode::kInvalidArgument);
  const Profile h = Make(64, 4, 16, 1, kRotationHadamard);
  EXPECT_EQ(h.rotation_algorithm, kRotationHadamard);
}

TEST(WireIndexBitsTest, BitLengthOfNMinusOne) {
  const std::pair<uint32_t, int> cases[] = {{2, 1},   {3, 2},   {4, 2},    {5, 3},        {8, 3},
                                            {9, 4},   {33, 6},  {256, 8},  {257, 9},      {1000, 10},
                                            {1024, 10}, {1025, 11}, {1u << 20, 20}, {(1u << 20) + 1, 21}};
  for (const auto& [n, bits] : cases) {
    absl::StatusOr<uint8_t> b = WireIndexBits(n);
    ASSERT_TRUE(b.ok()) << n;
    EXPECT_EQ(*b, bits) << n;
  }
  EXPECT_EQ(WireIndexBits(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WireIndexBits(1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CodeBytes, TwoNormBytesPlusPackedIndices) {
  EXPECT_EQ(Make(128, 4, 256, 1).code_bytes(), 2u + 32u);  // 32 blocks x 8 bits
  EXPECT_EQ(Make(128, 8, 256, 1).code_bytes(), 2u + 16u);  // 16 blocks x 8 bits
  EXPECT_EQ(Make(9, 3, 3, 1).code_bytes(), 2u + 1u);       // 3 blocks x 2 bits = 6 bits
  EXPECT_EQ(Make(64, 2, 16, 1).code_bytes(), 2u + 16u);    // 32 blocks x 4 bits
  EXPECT_EQ(Make(10, 2, 3, 1).code_bytes(), 2u + 2u);      // 5 blocks x 2 bits = 10 bits
  EXPECT_EQ(Make(4096, 1, 1u << 20, 1).code_bytes(), 2u + 10240u);  // 4096 x 20 bits
}

// Any head_dim: k need not divide d; the vector is padded to rotation_dim = ceil(d/k)*k, which
// sets the block count and the code length. Dividing profiles keep rotation_dim == d.
TEST(Profile, AnyHeadDimPadsToAMultipleOfBlockDim) {
  struct Case {
    uint32_t d, k, n, rotation_dim, blocks;
    size_t code_bytes;
  };
  for (const Case& c : {Case{100, 8, 256, 104, 13, 2 + 13}, Case{80, 3, 256, 81, 27, 2 + 27},
                        Case{96, 4, 256, 96, 24, 2 + 24}, Case{300, 8, 16, 304, 38, 2 + 19},
                        Case{4096, 3, 256, 4098, 1366, 2 + 1366}, Case{3, 2, 4, 4, 2, 2 + 1}}) {
    const Profile p = Make(c.d, c.k, c.n, 1);
    EXPECT_TRUE(p.Validate().ok()) << c.d << "/" << c.k;
    EXPECT_EQ(p.rotation_dim(), c.rotation_dim) << c.d << "/" << c.k;
    EXPECT_EQ(p.block_count(), c.blocks) << c.d << "/" << c.k;
    EXPECT_EQ(p.code_bytes(), c.code_bytes) << c.d << "/" << c.k;
    // The same under Hadamard, which no longer needs a power of two.
    absl::StatusOr<Profile> h = Profile::PaperDefault(c.d, c.k, c.n, 1, kRotationHadamard);
    ASSERT_TRUE(h.ok()) << h.status();
    EXPECT_EQ(h->rotation_dim(), c.rotation_dim);
  }
  // The padding is implied by (ambient_dim, block_dim), both already digested: pinned here.
  EXPECT_EQ(DigestOf(Make(100, 8, 256, 1)), "sha256:4507ae7fdcae474aa0d5e3b299ac3dfe6e3b88e9f3cc3fa914db9f9009b446ea");
}

// ------------------------------------------------------------------------------------------------
// Validate: every rule, with its exact code and a message naming the field.

struct Rule {
  const char* name;
  std::function<void(Profile&)> mutate;
  absl::StatusCode code;
  const char* field;  // substring the message must contain
};

Profile Base() { return Make(64, 2, 16, 11); }  // k=2, N=16, d=64

TEST(Validate, EveryRuleWithItsCode) {
  using C = absl::StatusCode;
  const C kIA = C::kInvalidArgument;
  const C kRE = C::kResourceExhausted;
  const std::vector<Rule> rules = {
      // 1. schema
      {"schema", [](Profile& p) { p.schema_version = "fib_quant_profile_v1"; }, kIA, "schema_version"},
      {"schema empty", [](Profile& p) { p.schema_version.clear(); }, kIA, "schema_version"},
      // 2. parts
      {"d zero", [](Profile& p) { p.ambient_dim = 0; }, kIA, "ambient_dim"},
      {"k zero", [](Profile& p) { p.block_dim = 0; }, kIA, "block_dim"},
      {"k == d", [](Profile& p) { p.block_dim = 64; }, kIA, "block_dim"},
      {"k > d", [](Profile& p) { p.block_dim = 128; }, kIA, "block_dim"},
      {"d > max", [](Profile& p) { p.ambient_dim = 4098; }, kRE, "ambient_dim"},
      {"k > max", [](Profile& p) { p.ambient_dim = 1024; p.block_dim = 512; }, kRE, "block_dim"},
      {"N zero", [](Profile& p) { p.codebook_size = 0; }, kIA, "codebook_size"},
      {"N one", [](Profile& p) { p.codebook_size = 1; }, kIA, "codebook_size"},
      {"N > 2^20", [](Profile& p) { p.codebook_size = (1u << 20) + 1; }, kIA, "codebook_size"},
      // 3. resources: 2^20 * 128 = 2^27 codebook values > 2^26
      {"N*k", [](Profile& p) { p.ambient_dim = 256; p.block_dim = 128; p.codebook_size = 1u << 20; },
       kRE, "codebook_size * profile.block_dim"},
      // 4. formats
      {"norm_format", [](Profile& p) { p.norm_format = static_cast<NormFormat>(3); }, kIA, "norm_format"},
      {"source_mode", [](Profile& p) { p.source_mode = static_cast<SourceMode>(1); }, kIA, "source_mode"},
      {"rotation unknown", [](Profile& p) { p.rotation_algorithm = "qr-gaussian-chacha8-sign-corrected-v1"; },
       kIA, "rotation_algorithm"},
      {"codebook_version", [](Profile& p) { p.codebook_version = "fib-quant:paper-core-v1"; }, kIA,
       "codebook_version"},
      {"empty_cell_policy", [](Profile& p) { p.empty_cell_policy = static_cast<EmptyCellPolicy>(9); },
       kIA, "empty_cell_policy"},
      // 5. rates
      {"wire bits", [](Profile& p) { p.wire_index_bits = 5; }, kIA, "wire_index_bits"},
      {"wire bits zero", [](Profile& p) { p.wire_index_bits = 0; }, kIA, "wire_index_bits"},
      {"paper rate off", [](Profile& p) { p.paper_rate_bits_per_coord += 1e-9; }, kIA,
       "paper_rate_bits_per_coord"},
      {"paper rate nan",
       [](Profile& p) { p.paper_rate_bits_per_coord = std::numeric_limits<double>::quiet_NaN(); }, kIA,
       "paper_rate_bits_per_coord"},
      {"paper rate inf",
       [](Profile& p) { p.paper_rate_bits_per_coord = std::numeric_limits<double>::infinity(); }, kIA,
       "paper_rate_bits_per_coord"},
      {"wire rate off", [](Profile& p) { p.wire_bits_per_coord -= 1e-9; }, kIA, "wire_bits_per_coord"},
      {"wire rate nan",
       [](Profile& p) { p.wire_bits_per_coord = std::numeric_limits<double>::quiet_NaN(); }, kIA,
       "wire_bits_per_coord"},
      {"wire rate -inf",
       [](Profile& p) { p.wire_bits_per_coord = -std::numeric_limits<double>::infinity(); }, kIA,
       "wire_bits_per_coord"},
      // 6. methods (k = 2 demands k2_closed_form + fibonacci_spiral)
      {"radius for k2", [](Profile& p) { p.radius_method = RadiusMethod::kBetaQuantile; }, kIA,
       "radius_method"},
      {"direction for k2", [](Profile& p) { p.direction_method = DirectionMethod::kRobertsKronecker; },
       kIA, "direction_method"},
      {"direction invalid enum", [](Profile& p) { p.direction_method = static_cast<DirectionMethod>(7); },
       kIA, "direction_method"},
      // 7. training
      {"restarts 0", [](Profile& p) { p.lloyd_restarts = 0; }, kIA, "lloyd_restarts"},
      {"restarts > max", [](Profile& p) { p.lloyd_restarts = 1025; }, kRE, "lloyd_restarts"},
      {"iterations 0", [](Profile& p) { p.lloyd_iterations = 0; }, kIA, "lloyd_iterations"},
      {"iterations > max", [](Profile& p) { p.lloyd_iterations = 100'001; }, kRE, "lloyd_iterations"},
      {"samples < N", [](Profile& p) { p.training_samples = 15; }, kIA, "training_samples"},
      {"samples > max", [](Profile& p) { p.training_samples = 10'000'001; }, kRE, "training_samples"},
  };
  ASSERT_TRUE(Base().Validate().ok());
  for (const Rule& r : rules) {
    Profile p = Base();
    r.mutate(p);
    const absl::Status s = p.Validate();
    EXPECT_EQ(s.code(), r.code) << r.name << ": " << s;
    EXPECT_THAT(Msg(s), HasSubstr(r.field)) << r.name;
    // Only a valid profile has a canonical encoding or a digest.
    EXPECT_EQ(p.Digest().status().code(), r.code) << r.name;
    EXPECT_EQ(p.CanonicalBytes().status().code(), r.code) << r.name;
  }
}

TEST(Validate, BoundaryValuesAreAccepted) {
  const std::vector<std::function<void(Profile&)>> ok = {
      [](Profile& p) { p.lloyd_restarts = 1; },
      [](Profile& p) { p.lloyd_restarts = 1024; },
      [](Profile& p) { p.lloyd_iterations = 1; },
      [](Profile& p) { p.lloyd_iterations = 100'000; },
      [](Profile& p) { p.training_samples = 16; },  // == N
      [](Profile& p) { p.training_samples = 10'000'000; },
      [](Profile& p) { p.paper_rate_bits_per_coord += 5e-13; },
      [](Profile& p) { p.wire_bits_per_coord -= 5e-13; },
      [](Profile& p) { p.empty_cell_policy = EmptyCellPolicy::kFailClosed; },
      [](Profile& p) { p.rotation_algorithm = std::string(kRotationHadamard); },  // d = 64
      [](Profile& p) { p.rotation_seed = 0; p.codebook_seed = 0; },  // seeds are free
      [](Profile& p) { p.ambient_dim = 4096; },
  };
  for (size_t i = 0; i < ok.size(); ++i) {
    Profile p = Base();
    ok[i](p);
    EXPECT_TRUE(p.Validate().ok()) << i << ": " << p.Validate();
  }
  // The largest legal codebook: N * k = 2^20 * 64 = 2^26 values, exactly at the limit.
  EXPECT_TRUE(Profile::PaperDefault(128, 64, 1u << 20, 1).ok());
  EXPECT_EQ(Profile::PaperDefault(256, 128, 1u << 19, 1).status().code(),
            absl::StatusCode::kOk);  // 2^26 again
  EXPECT_EQ(Profile::PaperDefault(256, 128, (1u << 19) + 1, 1).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(Profile::PaperDefault(512, 256, 16, 1).ok());
}

TEST(Validate, MethodTableForEveryBlockDim) {
  const RadiusMethod radii[] = {RadiusMethod::kK2ClosedForm, RadiusMethod::kBetaQuantile};
  const DirectionMethod dirs[] = {DirectionMethod::kFibonacciSpiral, DirectionMethod::kFibonacciSphere,
                                  DirectionMethod::kRobertsKronecker, DirectionMethod::kScalarQuantile};
  for (uint32_t k : {1u, 2u, 3u, 4u, 6u}) {
    const Profile p = Make(12, k, 16, 1);
    int legal = 0;
    for (RadiusMethod r : radii) {
      for (DirectionMethod d : dirs) {
        Profile q = p;
        q.radius_method = r;
        q.direction_method = d;
        const absl::Status s = q.Validate();
        if (s.ok()) {
          ++legal;
        } else {
          EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
        }
      }
    }
    EXPECT_EQ(legal, 1) << "exactly one legal method pair for k=" << k;
  }
}

TEST(Validate, FirstFailureWins) {
  Profile p = Base();
  p.schema_version = "bad";
  p.ambient_dim = 0;
  p.lloyd_restarts = 0;
  EXPECT_THAT(Msg(p.Validate()), HasSubstr("schema_version"));
  p.schema_version = std::string(kProfileSchema);
  EXPECT_THAT(Msg(p.Validate()), HasSubstr("ambient_dim"));
  // Parts (step 2) before resources (step 3): k > 256 and N*k over the limit report block_dim.
  Profile q = Base();
  q.ambient_dim = 1024;
  q.block_dim = 512;
  q.codebook_size = 1u << 20;
  EXPECT_EQ(q.Validate().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(Msg(q.Validate()), HasSubstr("profile.block_dim exceeds"));
  // Formats (step 4) before rates (step 5).
  Profile r = Base();
  r.codebook_version = "x";
  r.wire_index_bits = 1;
  EXPECT_THAT(Msg(r.Validate()), HasSubstr("codebook_version"));
  // Rates (step 5) before methods (step 6) before training (step 7).
  Profile s = Base();
  s.wire_index_bits = 1;
  s.radius_method = RadiusMethod::kBetaQuantile;
  s.lloyd_iterations = 0;
  EXPECT_THAT(Msg(s.Validate()), HasSubstr("wire_index_bits"));
  s.wire_index_bits = 4;
  EXPECT_THAT(Msg(s.Validate()), HasSubstr("radius_method"));
  s.radius_method = RadiusMethod::kK2ClosedForm;
  EXPECT_THAT(Msg(s.Validate()), HasSubstr("lloyd_iterations"));
}

TEST(Validate, MessagesNameTheLimit) {
  Profile p = Base();
  p.lloyd_restarts = 5000;
  EXPECT_THAT(Msg(p.Validate()), HasSubstr("1024"));
  p = Base();
  p.ambient_dim = 8192;
  EXPECT_THAT(Msg(p.Validate()), HasSubstr("4096"));
  p = Base();
  p.training_samples = 20'000'000;
  EXPECT_THAT(Msg(p.Validate()), HasSubstr("10000000"));
}

// ------------------------------------------------------------------------------------------------
// Canonical bytes and digests

TEST(Digest, StableAndWellFormed) {
  const Profile a = Make(128, 4, 256, 99);
  const Profile b = Make(128, 4, 256, 99);
  EXPECT_EQ(a, b);
  EXPECT_EQ(DigestOf(a), DigestOf(b));
  EXPECT_TRUE(IsDigestString(DigestOf(a)));
  absl::StatusOr<std::string> bytes = a.CanonicalBytes();
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(Sha256Digest(*bytes), DigestOf(a));
}

// The encoding spelled out field by field, independently of profile.cc, for the worked example.
TEST(Digest, CanonicalBytesLayout) {
  const Profile p = Make(8, 2, 8, 7);
  absl::StatusOr<std::string> bytes = p.CanonicalBytes();
  ASSERT_TRUE(bytes.ok());
  std::string want;
  auto raw = [&](std::string_view s) { want.append(s); };
  auto le = [&](uint64_t v, int n) {
    for (int i = 0; i < n; ++i) want.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  auto str = [&](std::string_view s) {
    le(s.size(), 4);
    raw(s);
  };
  raw(std::string_view("fq_profile_v1\0", 14));
  str("fq_profile_v1");
  le(8, 4);
  le(2, 4);
  le(8, 4);
  le(0x3FF8000000000000ull, 8);  // 1.5
  le(3, 1);
  le(0x3FF8000000000000ull, 8);  // 1.5
  str("fp16");
  le(7, 8);
  str("fq-haar-householder-qr-sign-corrected-v1");
  le(11400714819323198492ull, 8);
  str("fq-fibquant-paper-core-cpp-v1");
  str("canonical_spherical_beta");
  str("k2_closed_form");
  str("fibonacci_spiral");
  le(4, 4);
  le(25, 4);
  le(256, 4);
  str("split_highest_distortion");
  EXPECT_EQ(*bytes, want);
  EXPECT_EQ(bytes->size(), 267u);
}

// Golden digests: any change to the canonical encoding, the defaults or the rate arithmetic fails
// here. docs/format/profile.md quotes the first one as its worked example.
TEST(Digest, GoldenDigests) {
  EXPECT_EQ(DigestOf(Make(8, 2, 8, 7)),
            "sha256:5d35c6d9b7c3237cf74aaa7d3fbaa77987b62e94ed469c85c0e402064461ce2f");
  EXPECT_EQ(DigestOf(Make(64, 2, 16, 42)), "sha256:5790e83ecb4313f1cafcbb162487a42db3fcb42e5c9f0a149bbf2d2b23e78a13");
  EXPECT_EQ(DigestOf(Make(128, 4, 256, 42)), "sha256:75da5f0cb1a80d9b79bc7ad5809565d474b0737dd582491879be56555b2a552c");
  EXPECT_EQ(DigestOf(Make(128, 8, 256, 42)), "sha256:2ee3bdeb1405c16f58f38eae597f2d6a546336bba40cd65b29edf827e474a0da");
  EXPECT_EQ(DigestOf(Make(128, 1, 16, 42, kRotationHadamard)), "sha256:0188c1cbf1b6bd94dcab7329516fa882ec7e0b8c8b22ec5e384acfb843ad2fac");
  EXPECT_EQ(DigestOf(Make(96, 3, 1000, 0xFFFFFFFFFFFFFFFFull)), "sha256:6327657a62e13ed46a84d744ce6a199e6324d7dc2f99cd0b2a3d6bdb324a96d7");
}

// Every field is covered by the digest: each valid variant that differs from the base in one field
// (plus the fields derived from it) has its own digest.
TEST(Digest, ChangesWhenAnyFieldChanges) {
  const Profile base = Make(8, 2, 8, 7);
  struct Variant {
    const char* field;
    Profile p;
  };
  std::vector<Variant> variants;
  auto add = [&](const char* field, const std::function<void(Profile&)>& f) {
    Profile p = base;
    f(p);
    variants.push_back({field, p});
  };
  add("ambient_dim", [](Profile& p) { p.ambient_dim = 16; });
  add("block_dim (+ derived rates and methods)", [](Profile& p) {
    Profile q = Make(8, 4, 8, 7);
    p.block_dim = q.block_dim;
    p.paper_rate_bits_per_coord = q.paper_rate_bits_per_coord;
    p.wire_bits_per_coord = q.wire_bits_per_coord;
    p.radius_method = q.radius_method;
    p.direction_method = q.direction_method;
  });
  add("codebook_size (+ paper rate)", [](Profile& p) {
    p.codebook_size = 7;
    p.paper_rate_bits_per_coord = Make(8, 2, 7, 7).paper_rate_bits_per_coord;
  });
  add("paper_rate_bits_per_coord",
      [](Profile& p) { p.paper_rate_bits_per_coord = std::nextafter(p.paper_rate_bits_per_coord, 2.0); });
  add("wire_index_bits (+ N, rates)", [](Profile& p) {
    Profile q = Make(8, 2, 9, 7);
    p.codebook_size = q.codebook_size;
    p.wire_index_bits = q.wire_index_bits;
    p.paper_rate_bits_per_coord = q.paper_rate_bits_per_coord;
    p.wire_bits_per_coord = q.wire_bits_per_coord;
  });
  add("wire_bits_per_coord",
      [](Profile& p) { p.wire_bits_per_coord = std::nextafter(p.wire_bits_per_coord, 0.0); });
  add("rotation_seed", [](Profile& p) { p.rotation_seed += 1; });
  add("rotation_algorithm", [](Profile& p) { p.rotation_algorithm = std::string(kRotationHadamard); });
  add("codebook_seed", [](Profile& p) { p.codebook_seed += 1; });
  add("radius/direction (k=3)", [](Profile& p) {
    Profile q = Make(9, 3, 8, 7);
    p = q;
    p.ambient_dim = 9;
  });
  add("lloyd_restarts", [](Profile& p) { p.lloyd_restarts = 5; });
  add("lloyd_iterations", [](Profile& p) { p.lloyd_iterations = 26; });
  add("training_samples", [](Profile& p) { p.training_samples = 257; });
  add("empty_cell_policy", [](Profile& p) { p.empty_cell_policy = EmptyCellPolicy::kFailClosed; });
  // Swapping two adjacent u32 values must not collide either.
  add("lloyd restarts/iterations swapped", [](Profile& p) {
    p.lloyd_restarts = 25;
    p.lloyd_iterations = 4;
  });

  std::set<std::string> seen = {DigestOf(base)};
  for (const Variant& v : variants) {
    ASSERT_TRUE(v.p.Validate().ok()) << v.field << ": " << v.p.Validate();
    EXPECT_TRUE(seen.insert(DigestOf(v.p)).second) << "digest did not change for " << v.field;
  }
  // Fields with a single legal value cannot change in a valid profile; the encoding still carries
  // them, so a future second value would change the digest.
  const std::string bytes = *base.CanonicalBytes();
  for (std::string_view s : {kProfileSchema, kCodebookVersion, std::string_view("fp16"),
                             std::string_view("canonical_spherical_beta")}) {
    EXPECT_NE(bytes.find(std::string(s)), std::string::npos) << s;
  }
}

// ------------------------------------------------------------------------------------------------
// Enum names

TEST(EnumNames, RoundTripAndRejectUnknown) {
  EXPECT_EQ(NormFormatName(NormFormat::kFp16), "fp16");
  EXPECT_EQ(SourceModeName(SourceMode::kCanonicalSphericalBeta), "canonical_spherical_beta");
  for (RadiusMethod v : {RadiusMethod::kK2ClosedForm, RadiusMethod::kBetaQuantile}) {
    EXPECT_EQ(*ParseRadiusMethod(RadiusMethodName(v)), v);
  }
  for (DirectionMethod v : {DirectionMethod::kFibonacciSpiral, DirectionMethod::kFibonacciSphere,
                            DirectionMethod::kRobertsKronecker, DirectionMethod::kScalarQuantile}) {
    EXPECT_EQ(*ParseDirectionMethod(DirectionMethodName(v)), v);
  }
  for (EmptyCellPolicy v : {EmptyCellPolicy::kSplitHighestDistortion, EmptyCellPolicy::kFailClosed}) {
    EXPECT_EQ(*ParseEmptyCellPolicy(EmptyCellPolicyName(v)), v);
  }
  EXPECT_EQ(*ParseNormFormat("fp16"), NormFormat::kFp16);
  EXPECT_EQ(*ParseSourceMode("canonical_spherical_beta"), SourceMode::kCanonicalSphericalBeta);
  EXPECT_EQ(DirectionMethodName(DirectionMethod::kScalarQuantile), "scalar_quantile");
  EXPECT_EQ(EmptyCellPolicyName(EmptyCellPolicy::kSplitHighestDistortion), "split_highest_distortion");
  const absl::StatusCode kIA = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(ParseNormFormat("fp16_paper").status().code(), kIA);
  EXPECT_EQ(ParseSourceMode("").status().code(), kIA);
  EXPECT_EQ(ParseRadiusMethod("Beta_Quantile").status().code(), kIA);
  EXPECT_EQ(ParseDirectionMethod("fibonacci").status().code(), kIA);
  EXPECT_EQ(ParseEmptyCellPolicy("invalid").status().code(), kIA);
}

// ------------------------------------------------------------------------------------------------
// JSON

std::vector<Profile> JsonSamples() {
  std::vector<Profile> out = {Make(8, 2, 8, 7), Make(128, 4, 256, 42), Make(128, 1, 16, 3, kRotationHadamard),
                              Make(96, 3, 1000, std::numeric_limits<uint64_t>::max()),
                              Make(64, 2, 33, (1ull << 53) + 1)};
  Profile custom = Make(256, 8, 4096, 0x123456789ABCDEF1ull);
  custom.lloyd_restarts = 2;
  custom.lloyd_iterations = 3;
  custom.training_samples = 5000;
  custom.empty_cell_policy = EmptyCellPolicy::kFailClosed;
  out.push_back(custom);
  return out;
}

TEST(Json, RoundTripPreservesEveryFieldAndTheDigest) {
  for (const Profile& p : JsonSamples()) {
    const std::string text = p.ToJson();
    absl::StatusOr<Profile> back = Profile::FromJson(text);
    ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
    EXPECT_EQ(*back, p);
    EXPECT_EQ(DigestOf(*back), DigestOf(p));
    // Compact form and the value form too.
    absl::StatusOr<Profile> compact = Profile::FromJson(p.ToJson(-1));
    ASSERT_TRUE(compact.ok()) << compact.status();
    EXPECT_EQ(*compact, p);
    absl::StatusOr<Profile> value = Profile::FromJsonValue(p.ToJsonValue());
    ASSERT_TRUE(value.ok()) << value.status();
    EXPECT_EQ(*value, p);
  }
}

TEST(Json, FieldsInDeclarationOrderWithSnakeCaseEnums) {
  const std::string text = Make(8, 2, 8, 7).ToJson();
  const char* order[] = {"schema_version", "ambient_dim", "block_dim", "codebook_size",
                         "paper_rate_bits_per_coord", "wire_index_bits", "wire_bits_per_coord",
                         "norm_format", "rotation_seed", "rotation_algorithm", "codebook_seed",
                         "codebook_version", "source_mode", "radius_method", "direction_method",
                         "lloyd_restarts", "lloyd_iterations", "training_samples", "empty_cell_policy"};
  size_t last = 0;
  for (const char* f : order) {
    const size_t at = text.find(std::string("\"") + f + "\"");
    ASSERT_NE(at, std::string::npos) << f;
    EXPECT_GT(at, last) << f;
    last = at;
  }
  EXPECT_THAT(text, HasSubstr("\"radius_method\": \"k2_closed_form\""));
  EXPECT_THAT(text, HasSubstr("\"direction_method\": \"fibonacci_spiral\""));
  EXPECT_THAT(text, HasSubstr("\"codebook_seed\": 11400714819323198492"));
  EXPECT_THAT(text, HasSubstr("\n  \"ambient_dim\": 8,"));  // indent 2
}

TEST(Json, SeedsAbove2To53SurviveExactly) {
  for (uint64_t seed : {(1ull << 53) + 1, 0xFFFFFFFFFFFFFFFFull, 0xFFFFFFFFFFFFFFFEull,
                        0x8000000000000001ull}) {
    const Profile p = Make(8, 2, 8, seed);
    const std::string text = p.ToJson();
    EXPECT_THAT(text, HasSubstr(std::to_string(seed)));
    absl::StatusOr<Profile> back = Profile::FromJson(text);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->rotation_seed, seed);
    EXPECT_EQ(back->codebook_seed, seed + 0x9E3779B97F4A7C15ull);
  }
  // A seed written by hand above 2^53 is not routed through a double.
  nlohmann::json j = Make(8, 2, 8, 7).ToJsonValue();
  std::string text = j.dump();
  const std::string from = "\"rotation_seed\":7";
  text.replace(text.find(from), from.size(), "\"rotation_seed\":18446744073709551615");
  absl::StatusOr<Profile> back = Profile::FromJson(text);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->rotation_seed, std::numeric_limits<uint64_t>::max());
}

TEST(Json, RejectsUnknownMissingDuplicateAndMalformed) {
  const absl::StatusCode kIA = absl::StatusCode::kInvalidArgument;
  const nlohmann::json good = Make(8, 2, 8, 7).ToJsonValue();
  {
    nlohmann::json j = good;
    j["lloyd_mode"] = "fast";
    const absl::Status s = Profile::FromJson(j.dump()).status();
    EXPECT_EQ(s.code(), kIA);
    EXPECT_THAT(Msg(s), HasSubstr("\"lloyd_mode\""));
    EXPECT_THAT(Msg(s), HasSubstr("unknown"));
  }
  for (auto it = good.begin(); it != good.end(); ++it) {
    nlohmann::json j = good;
    j.erase(it.key());
    const absl::Status s = Profile::FromJson(j.dump()).status();
    EXPECT_EQ(s.code(), kIA) << it.key();
    EXPECT_THAT(Msg(s), HasSubstr("\"" + it.key() + "\"")) << it.key();
    EXPECT_THAT(Msg(s), HasSubstr("missing")) << it.key();
  }
  {
    std::string text = good.dump();
    text.insert(1, "\"block_dim\":2,");
    const absl::Status s = Profile::FromJson(text).status();
    EXPECT_EQ(s.code(), kIA);
    EXPECT_THAT(Msg(s), HasSubstr("duplicate"));
    EXPECT_THAT(Msg(s), HasSubstr("\"block_dim\""));
  }
  EXPECT_EQ(Profile::FromJson("").status().code(), kIA);
  EXPECT_EQ(Profile::FromJson("{").status().code(), kIA);
  EXPECT_EQ(Profile::FromJson("[]").status().code(), kIA);
  EXPECT_EQ(Profile::FromJson("null").status().code(), kIA);
  EXPECT_EQ(Profile::FromJson(good.dump() + "x").status().code(), kIA);
}

TEST(Json, RejectsWrongTypesNamingTheField) {
  const absl::StatusCode kIA = absl::StatusCode::kInvalidArgument;
  const nlohmann::json good = Make(8, 2, 8, 7).ToJsonValue();
  struct Bad {
    const char* field;
    nlohmann::json value;
  };
  const std::vector<Bad> bads = {
      {"schema_version", 1},
      {"schema_version", nullptr},
      {"ambient_dim", "8"},
      {"ambient_dim", 8.0},       // a float, even integral, is not an integer
      {"ambient_dim", -8},
      {"ambient_dim", 4294967296ull},  // > u32
      {"block_dim", true},
      {"codebook_size", nlohmann::json::array({8})},
      {"paper_rate_bits_per_coord", "1.5"},
      {"paper_rate_bits_per_coord", nullptr},  // how nlohmann writes NaN
      {"wire_index_bits", 256},
      {"wire_index_bits", 3.0},
      {"wire_bits_per_coord", nlohmann::json::object()},
      {"norm_format", 0},
      {"norm_format", "fp16_paper"},
      {"rotation_seed", -1},
      {"rotation_seed", 7.0},
      {"rotation_seed", "7"},
      {"rotation_algorithm", 1},
      {"codebook_seed", 1.8446744073709552e19},
      {"codebook_version", false},
      {"source_mode", "reference_gaussian_projection"},
      {"radius_method", 0},
      {"radius_method", "beta"},
      {"direction_method", "Fibonacci_Spiral"},
      {"lloyd_restarts", "4"},
      {"lloyd_iterations", 25.5},
      {"training_samples", -256},
      {"empty_cell_policy", 1},
      {"empty_cell_policy", "split"},
  };
  for (const Bad& b : bads) {
    nlohmann::json j = good;
    j[b.field] = b.value;
    const absl::Status s = Profile::FromJson(j.dump()).status();
    EXPECT_EQ(s.code(), kIA) << b.field << " = " << b.value.dump() << ": " << s;
    EXPECT_THAT(Msg(s), HasSubstr(std::string("\"") + b.field + "\"")) << b.value.dump();
    const absl::Status sv = Profile::FromJsonValue(j).status();
    EXPECT_EQ(sv.code(), kIA) << b.field;
  }
}

TEST(Json, ValidatesAfterParsing) {
  nlohmann::json j = Make(8, 2, 8, 7).ToJsonValue();
  j["block_dim"] = 4;  // rates and methods no longer match
  EXPECT_EQ(Profile::FromJson(j.dump()).status().code(), absl::StatusCode::kInvalidArgument);
  j = Make(8, 2, 8, 7).ToJsonValue();
  j["lloyd_restarts"] = 2000;
  EXPECT_EQ(Profile::FromJson(j.dump()).status().code(), absl::StatusCode::kResourceExhausted);
  j = Make(8, 2, 8, 7).ToJsonValue();
  j["paper_rate_bits_per_coord"] = 1.6;
  const absl::Status s = Profile::FromJson(j.dump()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(s), HasSubstr("paper_rate_bits_per_coord"));
}

TEST(Json, ValueBuiltInCodeWithSignedIntegersIsAccepted) {
  nlohmann::json j = Make(8, 2, 8, 7).ToJsonValue();
  j["ambient_dim"] = static_cast<int>(8);  // number_integer rather than number_unsigned
  j["wire_index_bits"] = static_cast<int64_t>(3);
  j["paper_rate_bits_per_coord"] = 1.5;
  j["wire_bits_per_coord"] = static_cast<int>(1) + 0.5;
  absl::StatusOr<Profile> p = Profile::FromJsonValue(j);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, Make(8, 2, 8, 7));
}

// ------------------------------------------------------------------------------------------------
// Spec JSON

TEST(SpecJson, MinimalEqualsPaperDefault) {
  absl::StatusOr<Profile> p =
      Profile::FromSpecJson(R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": 42})");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, Make(128, 4, 256, 42));
}

TEST(SpecJson, Overrides) {
  absl::StatusOr<Profile> p = Profile::FromSpecJson(R"({
      "ambient_dim": 128, "block_dim": 8, "codebook_size": 256, "seed": 18446744073709551615,
      "rotation_algorithm": "hadamard", "lloyd_restarts": 1, "lloyd_iterations": 2,
      "training_samples": 300, "empty_cell_policy": "fail_closed"})");
  ASSERT_TRUE(p.ok()) << p.status();
  Profile want = Make(128, 8, 256, std::numeric_limits<uint64_t>::max(), kRotationHadamard);
  want.lloyd_restarts = 1;
  want.lloyd_iterations = 2;
  want.training_samples = 300;
  want.empty_cell_policy = EmptyCellPolicy::kFailClosed;
  EXPECT_EQ(*p, want);
  EXPECT_EQ(p->rotation_seed, std::numeric_limits<uint64_t>::max());

  absl::StatusOr<Profile> full = Profile::FromSpecJson(
      std::string(R"({"ambient_dim": 64, "block_dim": 2, "codebook_size": 16, "seed": 1, "rotation_algorithm": ")") +
      std::string(kRotationHadamard) + "\"}");
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->rotation_algorithm, kRotationHadamard);
  absl::StatusOr<Profile> haar = Profile::FromSpecJson(
      R"({"ambient_dim": 64, "block_dim": 2, "codebook_size": 16, "seed": 1, "rotation_algorithm": "haar_qr"})");
  ASSERT_TRUE(haar.ok()) << haar.status();
  EXPECT_EQ(haar->rotation_algorithm, kRotationHaarQr);
}

TEST(SpecJson, Rejections) {
  const absl::StatusCode kIA = absl::StatusCode::kInvalidArgument;
  const absl::StatusCode kRE = absl::StatusCode::kResourceExhausted;
  struct Case {
    const char* json;
    absl::StatusCode code;
    const char* needle;
  };
  const Case cases[] = {
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256})", kIA, "\"seed\""},
      {R"({"block_dim": 4, "codebook_size": 256, "seed": 1})", kIA, "\"ambient_dim\""},
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": 1, "restarts": 2})", kIA,
       "\"restarts\""},
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": -1})", kIA, "\"seed\""},
      {R"({"ambient_dim": "128", "block_dim": 4, "codebook_size": 256, "seed": 1})", kIA,
       "\"ambient_dim\""},
      {R"({"ambient_dim": 128, "block_dim": 128, "codebook_size": 256, "seed": 1})", kIA, "block_dim"},
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": 1, "rotation_algorithm": "qr"})",
       kIA, "rotation_algorithm"},
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": 1, "lloyd_restarts": 0})", kIA,
       "lloyd_restarts"},
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": 1, "lloyd_iterations": 100001})",
       kRE, "lloyd_iterations"},
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": 1, "training_samples": 20000000})",
       kRE, "training_samples"},
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": 1, "training_samples": 255})",
       kIA, "training_samples"},
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": 1, "empty_cell_policy": "drop"})",
       kIA, "empty_cell_policy"},
      {R"({"ambient_dim": 8192, "block_dim": 4, "codebook_size": 256, "seed": 1})", kRE, "ambient_dim"},
      {R"({"ambient_dim": 128, "block_dim": 4, "codebook_size": 256, "seed": 1, "seed": 2})", kIA,
       "duplicate"},
      {R"([1, 2])", kIA, "object"},
      {R"({"ambient_dim": 128,)", kIA, "JSON"},
  };
  for (const Case& c : cases) {
    const absl::Status s = Profile::FromSpecJson(c.json).status();
    EXPECT_EQ(s.code(), c.code) << c.json << ": " << s;
    EXPECT_THAT(Msg(s), HasSubstr(c.needle)) << c.json;
  }
}

}  // namespace
}  // namespace fibquant
