// Operator-facing behaviour of the real fibquant-server binary (child processes on 127.0.0.1):
// exclusive listening port (no SO_REUSEPORT sharing), exclusive data dir (LOCK file naming the
// holder's pid, released on exit, a dead holder's lock taken over), reflection (grpc.reflection.v1
// and v1alpha) describing every advertised service including grpc.health.v1.Health.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>
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

// Runs a server to its "serving" line, stops it with SIGTERM, returns its log. Each run logs into
// a fresh directory: a log left by an earlier run would be read as this one's "serving" line.
std::string RunOnce(const std::vector<std::string>& flags, const TempDir&) {
  TempDir logs;
  ServerProcess p;
  p.Start(flags, logs.path());
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
  // One prefix for every line the server writes (the per-spec preload lines included).
  std::istringstream first_lines(first);
  for (std::string line; std::getline(first_lines, line);) {
    EXPECT_TRUE(line.starts_with("fibquant-server: ")) << line;
  }
  EXPECT_THAT(first, HasSubstr("fibquant-server: preloaded " + (dir.path() / "preload" / "small.json").string() +
                               " as sha256:"));
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

// Runs `argv` to completion (bounded), stdout+stderr to `out_file`; returns the exit code.
int RunCommand(const std::vector<std::string>& argv_in, const std::filesystem::path& out_file) {
  std::vector<std::string> store = argv_in;
  std::vector<char*> argv;
  for (auto& a : store) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string out = out_file.string();
  const pid_t pid = fork();
  if (pid == 0) {
    int fd = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    execv(argv[0], argv.data());
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + testing::kExitTimeout;
  int st = 0;
  while (waitpid(pid, &st, WNOHANG) != pid) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

// The exec probe commands of deploy/overlays/tls/deployment-tls.yaml, as written there (one list
// item per line after `command:`), in file order: startup, readiness, liveness.
std::vector<std::vector<std::string>> OverlayProbeCommands() {
  std::istringstream in(testing::ReadWholeFile(testing::SourceRoot() / "deploy" / "overlays" /
                                               "tls" / "deployment-tls.yaml"));
  std::vector<std::vector<std::string>> out;
  bool in_cmd = false;
  for (std::string line; std::getline(in, line);) {
    const size_t start = line.find_first_not_of(' ');
    const std::string t = start == std::string::npos ? "" : line.substr(start);
    if (t == "command:" && line.size() - t.size() >= 6) {  // the probes' (indented) command lists
      in_cmd = true;
      out.emplace_back();
      continue;
    }
    if (in_cmd && t.starts_with("- ")) {
      std::string arg = t.substr(2);
      if (arg == "\"\"") arg.clear();
      out.back().push_back(arg);
    } else {
      in_cmd = false;
    }
  }
  return out;
}

TEST(OpsOperatorTest, TlsOverlayExecProbesPassAgainstAnMtlsServer) {
  TempDir dir;
  const std::string certs = (dir.path() / "certs").string();
  ASSERT_EQ(std::system(((testing::SourceRoot() / "scripts" / "gen-test-certs").string() + " " +
                         certs + " > /dev/null 2>&1").c_str()),
            0);
  auto flags = Flags(dir.path() / "data", "127.0.0.1:0");
  flags.push_back("--tls-cert=" + certs + "/server.crt");
  flags.push_back("--tls-key=" + certs + "/server.key");
  flags.push_back("--tls-client-ca=" + certs + "/ca.crt");
  ServerProcess p;
  p.Start(flags, dir.path());
  const auto port = p.WaitForPort();
  ASSERT_TRUE(port.has_value()) << p.Log();

  const auto probes = OverlayProbeCommands();
  ASSERT_EQ(probes.size(), 3u) << "startup, readiness and liveness exec probes";
  for (size_t i = 0; i < probes.size(); ++i) {
    // The overlay's paths and port mapped to this test's files and port; nothing else changed.
    std::vector<std::string> cmd;
    for (std::string a : probes[i]) {
      if (a == "/usr/local/bin/fibquant") a = FQ_CLI_BINARY;
      if (a == "--server=127.0.0.1:50051") a = "--server=127.0.0.1:" + std::to_string(*port);
      if (const size_t at = a.find("/etc/fibquant/tls/"); at != std::string::npos) {
        std::string file = a.substr(at + 18);
        file = file == "tls.crt" ? "server.crt" : file == "tls.key" ? "server.key" : file;
        a = a.substr(0, at) + certs + "/" + file;
      }
      cmd.push_back(a);
    }
    const auto out = dir.path() / ("probe" + std::to_string(i) + ".out");
    EXPECT_EQ(RunCommand(cmd, out), 0) << testing::ReadWholeFile(out);
    EXPECT_THAT(testing::ReadWholeFile(out), HasSubstr("\"status\":\"SERVING\"")) << i;
  }
  // The same probe without the client certificate is refused by the mTLS port: the probe really
  // goes through the handshake.
  std::vector<std::string> bare;
  for (const auto& a : probes[1]) {
    if (!a.starts_with("--tls-cert=") && !a.starts_with("--tls-key=")) bare.push_back(a);
  }
  bare[0] = FQ_CLI_BINARY;
  for (auto& a : bare) {
    if (a.starts_with("--server=")) a = "--server=127.0.0.1:" + std::to_string(*port);
    if (a.starts_with("--tls-ca=")) a = "--tls-ca=" + certs + "/ca.crt";
  }
  EXPECT_EQ(RunCommand(bare, dir.path() / "bare.out"), 1) << testing::ReadWholeFile(dir.path() / "bare.out");
  p.Signal(SIGTERM);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
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
