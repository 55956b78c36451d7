// End to end: `fibquant recommend` (RecommendProfile) and the calibration RPCs against a real
// fibquant-server on 127.0.0.1 (tests/cli/cli_test_util.h). Input: one KV head of the decoder-like
// generator (bench/decoder_synth.h), keys and one query head as raw f32 [tokens, 1, 128]. Checks the
// ranked answer, the best candidate marked, a budget no candidate meets (exit 3 and a summary, not
// an error), and that the recommended calibrated spec registers (with its stored calibration) and
// compresses, while the same spec without its calibration registered is NotFound.
#include <string>
#include <vector>

#include "bench/decoder_synth.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cli/cli_test_util.h"

namespace fibquant::cli {
namespace {

using ::fibquant::cli::testing::CliServer;
using ::fibquant::cli::testing::ReadWholeFile;
using ::fibquant::cli::testing::RunResult;
using ::fibquant::cli::testing::WriteWholeFile;
using ::testing::HasSubstr;

class RecommendE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    cli_ = new CliServer();
    auto failed = cli_->Start();
    ASSERT_FALSE(failed.has_value()) << *failed;
    bench::DecoderSynthOptions o;
    o.kv_heads = 1;
    o.sequences = 4;  // 512 tokens: calibrate on 256, measure on 256
    const bench::DecoderSynth s = bench::MakeDecoderSynth(o);
    std::string k(reinterpret_cast<const char*>(s.k.data()), s.k.size() * 4), q;
    for (size_t t = 0; t < s.tokens(); ++t) {  // query head 0 of the group
      q.append(reinterpret_cast<const char*>(&s.q[t * s.q_heads() * 128]), 128 * 4);
    }
    WriteWholeFile(Path("k.f32"), k);
    WriteWholeFile(Path("q.f32"), q);
  }
  static void TearDownTestSuite() { delete cli_; }
  static std::string Path(const std::string& name) { return cli_->Path(name); }
  static RunResult Run(std::vector<std::string> args) { return cli_->Run(std::move(args)); }
  static std::vector<std::string> Sample(std::vector<std::string> extra) {
    std::vector<std::string> a = {"recommend", "--keys", Path("k.f32"), "--queries", Path("q.f32"), "--raw-dtype",
                                  "f32", "--shape", "512,1,128", "--max-codebook-size", "256"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  static CliServer* cli_;
};

CliServer* RecommendE2eTest::cli_ = nullptr;

TEST_F(RecommendE2eTest, RecommendsRegistersAndCompresses) {
  RunResult r = Run(Sample({"--max-attention-tv", "0.25", "--store-calibration", "--prefix", "e2e"}));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j.at("bestIndex").get<int>(), 0) << r.out;
  EXPECT_EQ(j.at("calibrationTokens").get<int>(), 256);
  EXPECT_TRUE(j.at("calibrationStored").get<bool>());
  const auto& cands = j.at("candidates");
  ASSERT_GE(cands.size(), 8u);  // N <= 256 of the default grid
  const auto& best = cands[0];
  EXPECT_TRUE(best.at("qualifies").get<bool>());
  EXPECT_LE(best.at("max").at("attentionTv").get<double>(), 0.25);
  EXPECT_THAT(r.err, HasSubstr("best: " + best.at("profileId").get<std::string>()));
  // On outlier-channel keys the calibrated variant wins at equal bytes: the best is calibrated.
  EXPECT_TRUE(best.value("calibrated", false)) << best.dump();
  WriteWholeFile(Path("best.json"), best.at("specJson").get<std::string>());
  RunResult reg = Run({"profile", "register", Path("best.json")});
  ASSERT_EQ(reg.code, 0) << reg.err;
  const std::string digest = nlohmann::json::parse(reg.out).at("digest").get<std::string>();
  // The registered calibrated profile compresses and round-trips the sample.
  RunResult c = Run({"compress", "--profile", digest, "--in", Path("k.f32"), "--raw-dtype", "f32", "--shape",
                     "512,1,128", "--out", Path("k.fqc")});
  ASSERT_EQ(c.code, 0) << c.err;
  RunResult d = Run({"decompress", "--in", Path("k.fqc"), "--out", Path("k.out"), "--dtype", "f32", "--format", "raw"});
  ASSERT_EQ(d.code, 0) << d.err;
  EXPECT_EQ(ReadWholeFile(Path("k.out")).size(), ReadWholeFile(Path("k.f32")).size());
}

TEST_F(RecommendE2eTest, ImpossibleBudgetIsAnAnswer) {
  RunResult r = Run(Sample({"--max-attention-tv", "1e-9"}));
  EXPECT_EQ(r.code, 3) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("bestIndex").get<int>(), -1);
  EXPECT_THAT(j.at("summary").get<std::string>(), HasSubstr("no candidate meets the budget"));
  EXPECT_THAT(r.err, HasSubstr("no candidate meets the budget"));
  EXPECT_FALSE(j.value("calibrationStored", false));
}

TEST_F(RecommendE2eTest, CalibratedSpecNeedsItsCalibration) {
  // Without --store-calibration the calibration is returned but not registered: its spec is refused.
  RunResult r = Run(Sample({"--prefix", "nostore", "--calibration-fraction", "0.25"}));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  std::string spec;
  for (const auto& c : j.at("candidates")) {
    if (c.value("calibrated", false)) {
      spec = c.at("specJson").get<std::string>();
      break;
    }
  }
  ASSERT_FALSE(spec.empty());
  WriteWholeFile(Path("cal.json"), spec);
  RunResult reg = Run({"profile", "register", Path("cal.json")});
  EXPECT_EQ(reg.code, 1) << reg.out;
  EXPECT_THAT(reg.err, HasSubstr("is not registered"));
  // Bad requests are errors naming the field.
  RunResult bad = Run(Sample({"--calibration-fraction", "1.5"}));
  EXPECT_EQ(bad.code, 1);
  EXPECT_THAT(bad.err, HasSubstr("calibration_fraction"));
}

}  // namespace
}  // namespace fibquant::cli
