// End to end: `fibquant recommend` (RecommendProfile) and the calibration RPCs against a real
// fibquant-server on 127.0.0.1 (tests/server/ops_test_util.h). Input: one KV head of the decoder-like
// generator (bench/decoder_synth.h), keys and one query head as raw f32 [tokens, 1, 128]. Checks the
// ranked answer, the best candidate marked, a budget no candidate meets (exit 3 and a summary, not
// an error), and that the recommended calibrated spec registers (with its stored calibration) and
// compresses, while the same spec without its calibration registered is NotFound.
#include <sys/wait.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "bench/decoder_synth.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/server/ops_test_util.h"

namespace fibquant::cli {
namespace {

using ::fibquant::server::testing::ReadWholeFile;
using ::fibquant::server::testing::ServerProcess;
using ::fibquant::server::testing::TempDir;
using ::fibquant::server::testing::WriteWholeFile;
using ::testing::HasSubstr;

struct RunResult {
  int code = -1;
  std::string out, err;
};

class RecommendE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    server_ = new ServerProcess();
    server_->Start({"--listen=127.0.0.1:0", "--metrics-listen=", "--workers=2",
                    "--data-dir=" + (dir_->path() / "data").string()},
                   dir_->path());
    auto port = server_->WaitForPort();
    ASSERT_TRUE(port.has_value()) << server_->Log();
    address_ = "127.0.0.1:" + std::to_string(*port);
    bench::DecoderSynthOptions o;
    o.kv_heads = 1;
    o.sequences = 4;  // 512 tokens: calibrate on 256, measure on 256
    const bench::DecoderSynth s = bench::MakeDecoderSynth(o);
    std::string k(reinterpret_cast<const char*>(s.k.data()), s.k.size() * 4), q;
    for (size_t t = 0; t < s.tokens(); ++t) {  // query head 0 of the group
      q.append(reinterpret_cast<const char*>(&s.q[t * s.q_heads() * 128]), 128 * 4);
    }
    WriteWholeFile(dir_->path() / "k.f32", k);
    WriteWholeFile(dir_->path() / "q.f32", q);
  }
  static void TearDownTestSuite() {
    delete server_;
    delete dir_;
  }
  static std::string Path(const std::string& name) { return (dir_->path() / name).string(); }
  static RunResult Run(std::vector<std::string> args) {
    static int n = 0;
    const std::string out = Path("run" + std::to_string(n) + ".out");
    const std::string err = Path("run" + std::to_string(n++) + ".err");
    std::string cmd = std::string("timeout 300 ") + FQ_CLI_BINARY;
    args.push_back("--server=" + address_);
    for (const auto& a : args) cmd += " '" + a + "'";
    cmd += " >" + out + " 2>" + err;
    const int st = std::system(cmd.c_str());
    RunResult r;
    r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    r.out = ReadWholeFile(out);
    r.err = ReadWholeFile(err);
    return r;
  }
  static std::vector<std::string> Sample(std::vector<std::string> extra) {
    std::vector<std::string> a = {"recommend", "--keys", Path("k.f32"), "--queries", Path("q.f32"), "--raw-dtype",
                                  "f32", "--shape", "512,1,128", "--max-codebook-size", "256"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  static TempDir* dir_;
  static ServerProcess* server_;
  static std::string address_;
};

TempDir* RecommendE2eTest::dir_ = nullptr;
ServerProcess* RecommendE2eTest::server_ = nullptr;
std::string RecommendE2eTest::address_;

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
