// Operator-facing behaviour of the real fibquant-server binary (child processes on 127.0.0.1):
// exclusive listening port (no SO_REUSEPORT sharing), exclusive data dir (LOCK file naming the
// holder's pid, released on exit, a dead holder's lock taken over), reflection (grpc.reflection.v1
// and v1alpha) describing every advertised service including grpc.health.v1.Health.
#include <signal.h>

#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "google/protobuf/descriptor.pb.h"
#include "grpc/reflection/v1/reflection.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

using ::testing::HasSubstr;
using testing::ServerProcess;
using testing::TempDir;

std::vector<std::string> Flags(const std::filesystem::path& data, const std::string& listen) {
  return {"--listen=" + listen, "--metrics-listen=", "--workers=1",
          "--data-dir=" + data.string(), "--drain-seconds=2"};
}

TEST(OpsOperatorTest, SecondServerOnTheSamePortExitsOne) {
  TempDir dir_a, dir_b;
  ServerProcess a;
  a.Start(Flags(dir_a.path() / "data", "127.0.0.1:0"), dir_a.path());
  const auto port = a.WaitForPort();
  ASSERT_TRUE(port.has_value()) << a.Log();
  ServerProcess b;
  b.Start(Flags(dir_b.path() / "data", "127.0.0.1:" + std::to_string(*port)), dir_b.path());
  EXPECT_EQ(b.WaitForExit(), 1) << b.Log();
  EXPECT_THAT(b.Log(), HasSubstr("cannot listen (address in use"));
  // The first server is untouched and still the only one answering.
  auto health = testing::CheckHealth(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(*port), grpc::InsecureChannelCredentials()),
      "");
  EXPECT_TRUE(health.status.ok()) << health.status.error_message();
  EXPECT_EQ(health.serving_status, 1);
  a.Signal(SIGTERM);
  EXPECT_EQ(a.WaitForExit(), 0) << a.Log();
}

TEST(OpsOperatorTest, SecondServerOnTheSameDataDirExitsOneNamingTheHolder) {
  TempDir dir, dir_b;
  const auto data = dir.path() / "data";
  ServerProcess a;
  a.Start(Flags(data, "127.0.0.1:0"), dir.path());
  ASSERT_TRUE(a.WaitForPort().has_value()) << a.Log();
  EXPECT_EQ(testing::ReadWholeFile(data / "LOCK"), std::to_string(a.pid()) + "\n");

  ServerProcess b;
  b.Start(Flags(data, "127.0.0.1:0"), dir_b.path());
  EXPECT_EQ(b.WaitForExit(), 1) << b.Log();
  EXPECT_THAT(b.Log(), HasSubstr("fibquant-server: error: --data-dir=" + data.string() +
                                 " is in use by another fibquant-server (pid " +
                                 std::to_string(a.pid()) + ", lock "));
  EXPECT_THAT(b.Log(), ::testing::Not(HasSubstr("serving")));

  // A clean exit releases the lock (and empties the pid): the next server starts.
  a.Signal(SIGTERM);
  ASSERT_EQ(a.WaitForExit(), 0) << a.Log();
  EXPECT_EQ(testing::ReadWholeFile(data / "LOCK"), "");
  ServerProcess c;
  c.Start(Flags(data, "127.0.0.1:0"), dir_b.path());
  EXPECT_TRUE(c.WaitForPort().has_value()) << c.Log();
  c.Signal(SIGTERM);
  EXPECT_EQ(c.WaitForExit(), 0) << c.Log();
}

TEST(OpsOperatorTest, LockOfAKilledServerIsStaleAndTakenOver) {
  TempDir dir, dir_b;
  const auto data = dir.path() / "data";
  ServerProcess a;
  a.Start(Flags(data, "127.0.0.1:0"), dir.path());
  ASSERT_TRUE(a.WaitForPort().has_value()) << a.Log();
  a.Signal(SIGKILL);  // no cleanup runs: the LOCK file still names the dead pid
  ASSERT_EQ(a.WaitForExit(), 128 + SIGKILL);
  EXPECT_EQ(testing::ReadWholeFile(data / "LOCK"), std::to_string(a.pid()) + "\n");

  ServerProcess b;
  b.Start(Flags(data, "127.0.0.1:0"), dir_b.path());
  ASSERT_TRUE(b.WaitForPort().has_value()) << b.Log();
  EXPECT_EQ(testing::ReadWholeFile(data / "LOCK"), std::to_string(b.pid()) + "\n");
  b.Signal(SIGTERM);
  EXPECT_EQ(b.WaitForExit(), 0) << b.Log();
}

// A small, cheap profile (head_dim 64, k = 2, N = 16): builds in milliseconds.
constexpr char kSmallSpec[] = R"({
  "profile_id": "ops-operator-small",
  "shape": {"role": "key", "attention_kind": "mha", "batch": 1, "layers": 1, "kv_heads": 1,
            "query_heads": 1, "tokens": 64, "head_dim": 64, "dtype": "f32",
            "rope_state": "pre_rope"},
  "axis_policy": "per_token",
  "tokens_per_page": 16,
  "fibquant": {"block_dim": 2, "codebook_size": 16, "seed": 7}
})";

// Runs a server to its "serving" line, stops it with SIGTERM, returns its log.
std::string RunOnce(const std::vector<std::string>& flags, const TempDir& dir) {
  ServerProcess p;
  p.Start(flags, dir.path());
  EXPECT_TRUE(p.WaitForPort().has_value()) << p.Log();
  p.Signal(SIGTERM);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
  return p.Log();
}

TEST(OpsOperatorTest, PreloadLogCountsWhatThePreloadDidNotTheRegistryTotal) {
  TempDir dir;
  std::filesystem::create_directories(dir.path() / "preload");
  testing::WriteWholeFile(dir.path() / "preload" / "small.json", kSmallSpec);
  auto flags = Flags(dir.path() / "data", "127.0.0.1:0");
  flags.push_back("--preload-dir=" + (dir.path() / "preload").string());
  const std::string first = RunOnce(flags, dir);
  EXPECT_THAT(first, HasSubstr("preloaded 1 profile spec from " + (dir.path() / "preload").string() +
                               " (1 newly registered, 0 already in the data dir); 1 profiles "
                               "registered in total"));
  // Second start: the profile comes from the data dir; the preload registers nothing new.
  const std::string second = RunOnce(flags, dir);
  EXPECT_THAT(second, HasSubstr("(0 newly registered, 1 already in the data dir); 1 profiles "
                                "registered in total"));
  // One prefix for every line the server writes.
  std::istringstream lines(second);
  for (std::string line; std::getline(lines, line);) {
    EXPECT_TRUE(line.starts_with("fibquant-server: ")) << line;
  }
}

namespace v1 = grpc::reflection::v1;

// One reflection stream at `method` (v1 or v1alpha: the messages are the same on the wire): sends
// every request, then returns the answers.
std::vector<v1::ServerReflectionResponse> Reflect(const std::shared_ptr<grpc::Channel>& channel,
                                                  const std::string& method,
                                                  const std::vector<v1::ServerReflectionRequest>& requests) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  std::unique_ptr<grpc::ClientReaderWriter<v1::ServerReflectionRequest, v1::ServerReflectionResponse>>
      stream(grpc::internal::ClientReaderWriterFactory<v1::ServerReflectionRequest,
                                                       v1::ServerReflectionResponse>::
                 Create(channel.get(),
                        grpc::internal::RpcMethod(method.c_str(),
                                                  grpc::internal::RpcMethod::BIDI_STREAMING,
                                                  channel),
                        &ctx));
  std::vector<v1::ServerReflectionResponse> out;
  for (const auto& r : requests) {
    if (!stream->Write(r)) break;
    v1::ServerReflectionResponse resp;
    if (!stream->Read(&resp)) break;
    out.push_back(std::move(resp));
  }
  stream->WritesDone();
  const grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << method << ": " << status.error_message();
  return out;
}

// The file names and services of a file_descriptor_response.
std::vector<std::string> ServicesIn(const v1::ServerReflectionResponse& resp) {
  std::vector<std::string> names;
  for (const auto& bytes : resp.file_descriptor_response().file_descriptor_proto()) {
    google::protobuf::FileDescriptorProto file;
    EXPECT_TRUE(file.ParseFromString(bytes));
    for (const auto& svc : file.service()) names.push_back(file.package() + "." + svc.name());
  }
  return names;
}

TEST(OpsOperatorTest, ReflectionV1AndV1alphaDescribeEveryListedServiceIncludingHealth) {
  TempDir dir;
  ServerProcess p;
  p.Start(Flags(dir.path() / "data", "127.0.0.1:0"), dir.path());
  const auto port = p.WaitForPort();
  ASSERT_TRUE(port.has_value()) << p.Log();
  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(*port), grpc::InsecureChannelCredentials());
  for (const std::string method : {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}) {
    SCOPED_TRACE(method);
    v1::ServerReflectionRequest list;
    list.set_list_services("");
    auto listed = Reflect(channel, method, {list});
    ASSERT_EQ(listed.size(), 1u);
    std::vector<std::string> services;
    for (const auto& s : listed[0].list_services_response().service()) services.push_back(s.name());
    EXPECT_THAT(services, ::testing::IsSupersetOf({"fibquant.v1.KvCompressionService",
                                                   "grpc.health.v1.Health",
                                                   "grpc.reflection.v1.ServerReflection",
                                                   "grpc.reflection.v1alpha.ServerReflection"}));
    // Every listed service can be described (a client resolves each by symbol).
    std::vector<v1::ServerReflectionRequest> lookups;
    for (const auto& name : services) {
      v1::ServerReflectionRequest r;
      r.set_file_containing_symbol(name);
      lookups.push_back(r);
    }
    auto answers = Reflect(channel, method, lookups);
    ASSERT_EQ(answers.size(), services.size());
    for (size_t i = 0; i < services.size(); ++i) {
      EXPECT_FALSE(answers[i].has_error_response())
          << services[i] << ": " << answers[i].error_response().error_message();
      EXPECT_THAT(ServicesIn(answers[i]), ::testing::Contains(services[i]));
    }
    // An unknown symbol is NOT_FOUND in the answer, not a broken stream.
    v1::ServerReflectionRequest missing;
    missing.set_file_containing_symbol("no.such.Service");
    auto miss = Reflect(channel, method, {missing});
    ASSERT_EQ(miss.size(), 1u);
    EXPECT_EQ(miss[0].error_response().error_code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  }
  p.Signal(SIGTERM);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
}

}  // namespace
}  // namespace fibquant::server
