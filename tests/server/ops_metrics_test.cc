// Tests of server/metrics.h: every recording method moves its series, the text output passes
// `promtool check metrics` (skipped with a message when promtool is not installed; the e2e script
// installs it), and the exposer serves /metrics on a chosen or free port.
#include "server/metrics.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

using ::fibquant::server::testing::HttpGet;
using ::testing::HasSubstr;

void RecordOneOfEverything(Metrics& m) {
  m.SetTlsCertificateExpiry(absl::FromUnixSeconds(1795886990));
  m.RecordRpc("RegisterProfile", absl::StatusCode::kOk, 0.25);
  m.RecordRpc("RegisterProfile", grpc::StatusCode::INVALID_ARGUMENT, 0.001);
  m.AddBytes("raw_in", 4096);
  m.AddBytes("compressed_out", 640);
  m.AddPages("compress", 2);
  m.AddVectors("compressed", 60);
  m.AddVectors("raw_protected", 4);
  m.AddFallback("norm_out_of_range");
  m.ObserveCompressionRatio(6.4);
  m.ObserveDistortion("mse", 0.01);
  m.SetQueueDepth(3);
  m.StreamStarted();
  m.StreamStarted();
  m.StreamFinished();
  m.SetRegistrySize(5);
  m.ObserveBuildSeconds(1.5);
  m.RegistryFileQuarantined();
}

TEST(MetricsTest, EveryMethodMovesItsSeries) {
  Metrics m;
  RecordOneOfEverything(m);
  const std::string text = m.Serialize();
  for (const char* line : {
           R"(fibquant_rpc_handled_total{code="OK",method="RegisterProfile"} 1)",
           R"(fibquant_rpc_handled_total{code="INVALID_ARGUMENT",method="RegisterProfile"} 1)",
           R"(fibquant_rpc_duration_seconds_count{method="RegisterProfile"} 2)",
           R"(fibquant_payload_bytes_total{direction="raw_in"} 4096)",
           R"(fibquant_payload_bytes_total{direction="compressed_out"} 640)",
           R"(fibquant_payload_bytes_total{direction="raw_out"} 0)",
           R"(fibquant_pages_total{op="compress"} 2)",
           R"(fibquant_vectors_total{kind="compressed"} 60)",
           R"(fibquant_vectors_total{kind="raw_protected"} 4)",
           R"(fibquant_vectors_total{kind="raw_fallback"} 0)",
           R"(fibquant_fallbacks_total{reason="norm_out_of_range"} 1)",
           "fibquant_page_compression_ratio_count 1",
           R"(fibquant_page_distortion_count{metric="mse"} 1)",
           "fibquant_worker_queue_depth 3",
           "fibquant_streams_in_flight 1",
           "fibquant_streams_started_total 2",
           "fibquant_registry_profiles 5",
           "fibquant_profile_build_duration_seconds_count 1",
           "fibquant_registry_files_quarantined_total 1",
       }) {
    EXPECT_THAT(text, HasSubstr(std::string(line) + "\n")) << line;
  }
}

TEST(MetricsTest, TlsCertificateExpiryExistsOnlyOnceSet) {
  Metrics m;
  EXPECT_THAT(m.Serialize(), ::testing::Not(HasSubstr("fibquant_tls_certificate_expiry")));
  m.SetTlsCertificateExpiry(absl::FromUnixSeconds(1795886990));
  EXPECT_THAT(m.Serialize(),
              HasSubstr("fibquant_tls_certificate_expiry_timestamp_seconds 1795886990\n"));
  m.SetTlsCertificateExpiry(absl::FromUnixSeconds(1795990000));  // a reload
  EXPECT_THAT(m.Serialize(),
              HasSubstr("fibquant_tls_certificate_expiry_timestamp_seconds 1795990000\n"));
}

TEST(MetricsTest, PassesPromtoolCheck) {
  if (std::system("command -v promtool >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "SKIP: promtool not installed (Debian package 'prometheus'); "
                    "tests/server/tls_e2e.sh installs it and checks the live /metrics";
  }
  Metrics m;
  RecordOneOfEverything(m);
  testing::TempDir dir;
  const auto file = dir.path() / "metrics.txt";
  testing::WriteWholeFile(file, m.Serialize());
  const auto out = dir.path() / "promtool.out";
  const std::string cmd =
      "promtool check metrics < '" + file.string() + "' > '" + out.string() + "' 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << testing::ReadWholeFile(out);
}

TEST(MetricsTest, ExposerServesMetricsAndRefusesASecondStart) {
  Metrics m;
  m.AddPages("decompress", 7);
  auto port = m.StartExposer("127.0.0.1:0");
  ASSERT_TRUE(port.ok()) << port.status();
  ASSERT_GT(*port, 0);
  const std::string response = HttpGet(*port, "/metrics");
  EXPECT_THAT(response, HasSubstr("200 OK"));
  EXPECT_THAT(response, HasSubstr("fibquant_pages_total{op=\"decompress\"} 7\n"));

  EXPECT_EQ(m.StartExposer("127.0.0.1:0").status().code(),
            absl::StatusCode::kFailedPrecondition);

  // The port is taken now: a second Metrics cannot bind it.
  Metrics other;
  auto clash = other.StartExposer("127.0.0.1:" + std::to_string(*port));
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(clash.status().message()), HasSubstr("--metrics-listen"));
}

}  // namespace
}  // namespace fibquant::server
