// Registry storage of calibration artifacts (server/registry.h): persisted and reloaded, a tampered
// file quarantined (never loaded), and a calibrated profile reloaded with its calibration — or
// quarantined as DataLoss when its calibration is gone. No server, no ports.
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/kv_calib.h"
#include "core/kv_codec.h"
#include "gtest/gtest.h"
#include "server/registry.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

using absl::StatusCode;
using testing::TempDir;

KvTensorShape Shape() {
  KvTensorShape s;
  s.role = KvRole::kKey;
  s.batch = s.layers = s.kv_heads = s.query_heads = 1;
  s.tokens = 32;
  s.head_dim = 8;
  s.rope_state = KvRopeState::kPostRope;
  return s;
}

KvCalibration Calibration() {
  std::vector<float> x(32 * 8);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i * 37 % 11) - 5) + (i % 8 == 2 ? 9.0f : 0.0f);
  auto c = ComputeKvCalibration(Shape(), x, {}, {});
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

std::shared_ptr<const KvCodec> CalibratedCodec(const KvCalibration& cal) {
  nlohmann::json j;
  j["profile_id"] = "calibrated";
  j["shape"] = nlohmann::json::parse(Shape().ToJson(-1));
  j["axis_policy"] = "per_token";
  j["tokens_per_page"] = 16;
  j["fibquant"] = {{"block_dim", 2}, {"codebook_size", 8}, {"seed", 3}, {"training_samples", 500},
                   {"lloyd_restarts", 1}, {"lloyd_iterations", 3}};
  j["channel_transform"] = "calibration";
  j["calibration_digest"] = cal.digest;
  auto p = KvCompressionProfile::FromSpecJson(j.dump());
  EXPECT_TRUE(p.ok()) << p.status();
  auto c = KvCodec::Build(*p, 1, nullptr, std::make_shared<const KvCalibration>(cal));
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

TEST(CalibrationRegistry, PersistsReloadsAndQuarantinesTampering) {
  TempDir dir;
  RegistryOptions o;
  o.data_dir = dir.path().string();
  const KvCalibration cal = Calibration();
  {
    auto r = Registry::Open(o, nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    bool inserted = false;
    auto s = (*r)->InsertCalibration(cal, &inserted);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_TRUE(inserted);
    auto again = (*r)->InsertCalibration(cal, &inserted);
    ASSERT_TRUE(again.ok());
    EXPECT_FALSE(inserted);
    EXPECT_EQ((*r)->LookupCalibration("sha256:00").status().code(), StatusCode::kNotFound);
    // A calibrated profile stored with it.
    ProfileEntry e;
    e.codec = CalibratedCodec(cal);
    e.digest = e.codec->profile_digest();
    e.profile_json = e.codec->profile().ToJson();
    ASSERT_TRUE((*r)->Insert(std::move(e), &inserted).ok());
  }
  {
    auto r = Registry::Open(o, nullptr);
    ASSERT_TRUE(r.ok());
    auto c = (*r)->LookupCalibration(cal.digest);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(**c, cal);
    EXPECT_EQ((*r)->size(), 1u);  // the calibrated profile reloaded with its calibration
    EXPECT_EQ((*r)->quarantined(), 0u);
  }
  // Tamper with the stored calibration: quarantined at the next start, and the profile that needs
  // it is quarantined too (DataLoss: its calibration is not registered).
  const auto file = dir.path() / "calibrations" / Registry::EntryFileName(cal.digest);
  std::string text = testing::ReadWholeFile(file);
  nlohmann::json j = nlohmann::json::parse(text);
  j["mean"][0] = j["mean"][0].get<double>() + 1.0;
  testing::WriteWholeFile(file, j.dump());
  {
    auto r = Registry::Open(o, nullptr);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ((*r)->LookupCalibration(cal.digest).status().code(), StatusCode::kNotFound);
    EXPECT_EQ((*r)->calibration_count(), 0u);
    EXPECT_EQ((*r)->size(), 0u);
    EXPECT_EQ((*r)->quarantined(), 2u);
  }
}

TEST(CalibrationRegistry, MaxCalibrations) {
  RegistryOptions o;  // memory only
  o.max_calibrations = 1;
  auto r = Registry::Open(o, nullptr);
  ASSERT_TRUE(r.ok());
  bool inserted = false;
  KvCalibration a = Calibration();
  ASSERT_TRUE((*r)->InsertCalibration(a, &inserted).ok());
  KvCalibration b = a;
  b.mean[0] += 1.0f;
  b.digest = b.ComputeDigest();
  auto s = (*r)->InsertCalibration(b, &inserted);
  EXPECT_EQ(s.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.status().message().find("max_calibrations"), std::string::npos);
}

}  // namespace
}  // namespace fibquant::server
