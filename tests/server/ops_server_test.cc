// Operations tests against the real fibquant-server binary (child process, 127.0.0.1 only, ports
// chosen by the server with :0): --help, refusal of plaintext on a non-loopback address, bad TLS
// flags, TLS refusals (no / wrong-CA / expired client certificate under mTLS, a server certificate of
// another CA, an expired server certificate), certificate and client CA rotation without a restart
// (--tls-reload-seconds) including a bad rotation that must not be served, the admin token on
// RegisterProfile, and drain on SIGTERM with exit code 0.
#include <signal.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "gtest/gtest.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

using ::testing::HasSubstr;
using testing::ServerProcess;
using testing::TempDir;

constexpr char kService[] = "fibquant.v1.KvCompressionService";
constexpr char kToken[] = "ops-test-admin-token-0123456789";

// A small, cheap profile (head_dim 64, k = 2, N = 16): builds in milliseconds.
constexpr char kSmallSpec[] = R"({
  "profile_id": "ops-test-small",
  "shape": {"role": "key", "attention_kind": "mha", "batch": 1, "layers": 1, "kv_heads": 1,
            "query_heads": 1, "tokens": 64, "head_dim": 64, "dtype": "f32",
            "rope_state": "pre_rope"},
  "axis_policy": "per_token",
  "tokens_per_page": 16,
  "fibquant": {"block_dim": 2, "codebook_size": 16, "seed": 7}
})";

// Flags every test server gets: loopback, free port, metrics off (the exposer's 2 s teardown is not
// what these tests are about), a private data dir.
std::vector<std::string> BaseFlags(const TempDir& dir) {
  return {"--listen=127.0.0.1:0", "--metrics-listen=", "--workers=2",
          "--data-dir=" + (dir.path() / "data").string(), "--drain-seconds=5"};
}

struct RunResult {
  int exit_code = -1;
  std::string log;
};

// Runs the binary to completion (it must exit on its own within the bounded wait).
RunResult RunToExit(const std::vector<std::string>& args, const TempDir& dir) {
  ServerProcess p;
  p.Start(args, dir.path());
  RunResult r;
  r.exit_code = p.WaitForExit().value_or(-1);
  r.log = p.Log();
  return r;
}

std::shared_ptr<grpc::Channel> PlainChannel(int port) {
  return grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                             grpc::InsecureChannelCredentials());
}

TEST(OpsServerTest, HelpListsEveryFlagWithItsDefault) {
  TempDir dir;
  RunResult r = RunToExit({"--help"}, dir);
  EXPECT_EQ(r.exit_code, 0) << r.log;
  for (const char* line : {"--listen  (default: 127.0.0.1:50051)", "--workers  (default: 0)",
                           "--data-dir  (default: ./fibquant-data)", "--preload-dir  (default: \"\")",
                           "--metrics-listen  (default: 127.0.0.1:9464)", "--tls-cert  (default",
                           "--tls-key  (default", "--tls-client-ca  (default",
                           "--admin-token-file  (default", "--allow-insecure  (default: false)",
                           "--max-message-bytes  (default", "--max-page-bytes  (default",
                           "--max-inflight-pages-per-stream  (default",
                           "--max-concurrent-streams  (default", "--max-profile-build-cost  (default",
                           "--receipt-retention  (default", "--drain-seconds  (default: 30)",
                           "--build-workers  (default: 1)",
                           "--tls-reload-seconds  (default: 60)"}) {
    EXPECT_THAT(r.log, HasSubstr(line)) << line;
  }
}

TEST(OpsServerTest, RefusesPlaintextOnNonLoopbackWithoutAllowInsecure) {
  TempDir dir;
  std::vector<std::string> args = BaseFlags(dir);
  args[0] = "--listen=0.0.0.0:0";
  RunResult r = RunToExit(args, dir);
  EXPECT_EQ(r.exit_code, 1) << r.log;
  EXPECT_THAT(r.log, HasSubstr("--allow-insecure"));
  EXPECT_THAT(r.log, HasSubstr("0.0.0.0:0"));
  EXPECT_THAT(r.log, ::testing::Not(HasSubstr("serving")));
}

TEST(OpsServerTest, RefusesIncompleteTlsAndBadFlags) {
  TempDir dir;
  std::vector<std::string> args = BaseFlags(dir);
  args.push_back("--tls-key=/nonexistent.key");
  RunResult r = RunToExit(args, dir);
  EXPECT_EQ(r.exit_code, 1) << r.log;
  EXPECT_THAT(r.log, HasSubstr("--tls-key requires --tls-cert"));

  testing::WriteWholeFile(dir.path() / "short-token", "abc\n");
  args = BaseFlags(dir);
  args.push_back("--admin-token-file=" + (dir.path() / "short-token").string());
  r = RunToExit(args, dir);
  EXPECT_EQ(r.exit_code, 1) << r.log;
  EXPECT_THAT(r.log, HasSubstr("--admin-token-file"));

  args = BaseFlags(dir);
  args[0] = "--listen=127.0.0.1:99999";  // gRPC itself would wrap this to port 34463
  r = RunToExit(args, dir);
  EXPECT_EQ(r.exit_code, 1) << r.log;
  EXPECT_THAT(r.log, HasSubstr("--listen=127.0.0.1:99999: port must be a number in [0, 65535]"));

  args = BaseFlags(dir);
  args.push_back("--drain-seconds=-1");
  r = RunToExit(args, dir);
  EXPECT_EQ(r.exit_code, 1) << r.log;
  EXPECT_THAT(r.log, HasSubstr("--drain-seconds"));

  for (const char* bad : {"--tls-reload-seconds=-1", "--tls-reload-seconds=86401"}) {
    args = BaseFlags(dir);
    args.push_back(bad);
    r = RunToExit(args, dir);
    EXPECT_EQ(r.exit_code, 1) << bad << ": " << r.log;
    EXPECT_THAT(r.log, HasSubstr("--tls-reload-seconds must be 0 (no reload) or in [1, 86400]"))
        << bad;
  }
}

// A throwaway PKI from scripts/gen-test-certs --negative in <dir>/certs.
std::string MakeCerts(const TempDir& dir) {
  const std::string certs = (dir.path() / "certs").string();
  const std::string gen = (testing::SourceRoot() / "scripts" / "gen-test-certs").string() +
                          " --negative '" + certs + "' >/dev/null";
  EXPECT_EQ(std::system(gen.c_str()), 0);
  return certs;
}

// TLS client credentials trusting `ca`, with a client certificate when `client` is not empty.
std::shared_ptr<grpc::ChannelCredentials> ClientCreds(const std::string& certs, const char* ca,
                                                      const char* client = "") {
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = testing::ReadWholeFile(certs + "/" + ca + ".crt");
  if (*client != '\0') {
    o.pem_cert_chain = testing::ReadWholeFile(certs + "/" + client + ".crt");
    o.pem_private_key = testing::ReadWholeFile(certs + "/" + client + ".key");
  }
  return grpc::SslCredentials(o);
}

// Health over a fresh channel; each refused handshake is UNAVAILABLE on the client.
testing::HealthResult HealthVia(int port, const std::shared_ptr<grpc::ChannelCredentials>& creds) {
  return testing::CheckHealth(grpc::CreateChannel("localhost:" + std::to_string(port), creds), "");
}

TEST(OpsServerTest, MtlsRefusesClientsWithoutAValidCertificate) {
  TempDir dir;
  const std::string certs = MakeCerts(dir);
  std::vector<std::string> args = BaseFlags(dir);
  args.push_back("--tls-cert=" + certs + "/server.crt");
  args.push_back("--tls-key=" + certs + "/server.key");
  args.push_back("--tls-client-ca=" + certs + "/ca.crt");
  ServerProcess p;
  p.Start(args, dir.path());
  std::optional<int> port = p.WaitForPort();
  ASSERT_TRUE(port.has_value()) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("(mtls,"));
  EXPECT_THAT(p.Log(), HasSubstr("tls certificate subject CN=localhost, valid "));

  struct Refused {
    const char* what;
    const char* client;  // certificate the client presents ("" = none)
  };
  for (const Refused& r : {Refused{"no client certificate", ""},
                           Refused{"client certificate of another CA", "other-client"},
                           Refused{"expired client certificate", "expired-client"}}) {
    auto refused = HealthVia(*port, ClientCreds(certs, "ca", r.client));
    EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE)
        << r.what << ": " << refused.status.error_message();
  }

  // The refusals did not disturb the server: a client with a valid certificate is served.
  auto channel =
      grpc::CreateChannel("localhost:" + std::to_string(*port), ClientCreds(certs, "ca", "client"));
  auto overall = testing::CheckHealth(channel, "");
  ASSERT_TRUE(overall.status.ok()) << overall.status.error_message();
  EXPECT_EQ(overall.serving_status, 1);  // SERVING
  auto service = testing::CheckHealth(channel, kService);
  ASSERT_TRUE(service.status.ok()) << service.status.error_message();
  EXPECT_EQ(service.serving_status, 1);

  // Plaintext to a TLS port fails too.
  auto plain = testing::CheckHealth(PlainChannel(*port), "");
  EXPECT_EQ(plain.status.error_code(), grpc::StatusCode::UNAVAILABLE);

  p.Signal(SIGTERM);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
}

TEST(OpsServerTest, TlsClientRefusesAServerItsCaDidNotSign) {
  TempDir dir;
  const std::string certs = MakeCerts(dir);
  std::vector<std::string> args = BaseFlags(dir);
  args.push_back("--tls-cert=" + certs + "/other-server.crt");
  args.push_back("--tls-key=" + certs + "/other-server.key");
  args.push_back("--tls-reload-seconds=0");  // the static credentials of before reload existed
  ServerProcess p;
  p.Start(args, dir.path());
  std::optional<int> port = p.WaitForPort();
  ASSERT_TRUE(port.has_value()) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("(tls,"));
  EXPECT_THAT(p.Log(), HasSubstr("(read once; --tls-reload-seconds=0)"));

  auto wrong_ca = HealthVia(*port, ClientCreds(certs, "ca"));
  EXPECT_EQ(wrong_ca.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << wrong_ca.status.error_message();
  auto right_ca = HealthVia(*port, ClientCreds(certs, "other-ca"));
  ASSERT_TRUE(right_ca.status.ok()) << right_ca.status.error_message();
  EXPECT_EQ(right_ca.serving_status, 1);

  p.Signal(SIGTERM);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
}

// Copies the generated <certs>/<from> over <to> via a temporary name and a rename, as a Secret
// update replaces files.
void Rotate(const std::string& certs, const char* from, const std::filesystem::path& to) {
  const std::filesystem::path tmp = to.string() + ".tmp";
  testing::WriteWholeFile(tmp, testing::ReadWholeFile(certs + "/" + from));
  std::filesystem::rename(tmp, to);
}

// Health over a channel with its own subchannel pool, so a refused handshake of an earlier channel
// (and its reconnect backoff) cannot answer for this one.
testing::HealthResult FreshHealth(int port, const std::shared_ptr<grpc::ChannelCredentials>& creds) {
  grpc::ChannelArguments ch_args;
  ch_args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return testing::CheckHealth(
      grpc::CreateCustomChannel("localhost:" + std::to_string(port), creds, ch_args), "");
}

// Polls until `done` holds or the bound (a hang bound, not a speed assertion) passes.
template <typename F>
bool PollUntil(F done, std::chrono::seconds bound = std::chrono::seconds(60)) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return done();
}

TEST(OpsServerTest, TlsReloadServesARotatedCertificateAndKeepsTheLastGoodOnABadOne) {
  TempDir dir;
  const std::string certs = MakeCerts(dir);
  const auto crt = dir.path() / "tls.crt";
  const auto key = dir.path() / "tls.key";
  Rotate(certs, "other-server.crt", crt);
  Rotate(certs, "other-server.key", key);
  std::vector<std::string> args = BaseFlags(dir);
  args.push_back("--tls-cert=" + crt.string());
  args.push_back("--tls-key=" + key.string());
  args.push_back("--tls-reload-seconds=1");
  ServerProcess p;
  p.Start(args, dir.path());
  std::optional<int> port = p.WaitForPort();
  ASSERT_TRUE(port.has_value()) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("files re-checked every 1 s"));

  auto before = FreshHealth(*port, ClientCreds(certs, "ca"));
  EXPECT_EQ(before.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << before.status.error_message();

  // The rotation: a certificate of the CA the client trusts, key first (as a careless copy would).
  Rotate(certs, "server.key", key);
  Rotate(certs, "server.crt", crt);
  ASSERT_TRUE(PollUntil([&] {
    auto h = FreshHealth(*port, ClientCreds(certs, "ca"));
    return h.status.ok() && h.serving_status == 1;
  })) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("tls certificate reloaded: subject CN=localhost, valid "));
  EXPECT_THAT(p.Log(), HasSubstr("issuer CN=fibquant test CA"));

  // A bad rotation: an expired certificate (with its own key). It is refused with a warning and
  // the last good certificate stays in use.
  Rotate(certs, "expired-server.key", key);
  Rotate(certs, "expired-server.crt", crt);
  ASSERT_TRUE(PollUntil([&] {
    return p.Log().find("warning: tls files not reloaded: --tls-cert") != std::string::npos;
  })) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("keeping the last good certificate in use"));
  // Two more check intervals: still the good certificate.
  std::this_thread::sleep_for(std::chrono::seconds(3));
  auto after = FreshHealth(*port, ClientCreds(certs, "ca"));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message() << "\n" << p.Log();
  EXPECT_EQ(after.serving_status, 1);

  // A key that is not the certificate's: refused the same way.
  Rotate(certs, "server.crt", crt);
  Rotate(certs, "client.key", key);
  ASSERT_TRUE(PollUntil([&] {
    return p.Log().find("is not the private key of --tls-cert") != std::string::npos;
  })) << p.Log();
  std::this_thread::sleep_for(std::chrono::seconds(3));
  auto mismatched = FreshHealth(*port, ClientCreds(certs, "ca"));
  ASSERT_TRUE(mismatched.status.ok()) << mismatched.status.error_message();
  EXPECT_EQ(mismatched.serving_status, 1);

  p.Signal(SIGTERM);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
}

TEST(OpsServerTest, TlsReloadPicksUpARotatedClientCa) {
  TempDir dir;
  const std::string certs = MakeCerts(dir);
  const auto client_ca = dir.path() / "client-ca.crt";
  Rotate(certs, "other-ca.crt", client_ca);
  std::vector<std::string> args = BaseFlags(dir);
  args.push_back("--tls-cert=" + certs + "/server.crt");
  args.push_back("--tls-key=" + certs + "/server.key");
  args.push_back("--tls-client-ca=" + client_ca.string());
  args.push_back("--tls-reload-seconds=1");
  ServerProcess p;
  p.Start(args, dir.path());
  std::optional<int> port = p.WaitForPort();
  ASSERT_TRUE(port.has_value()) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("(mtls,"));

  // A client certificate of ca is refused while the server trusts only other-ca ...
  auto refused = FreshHealth(*port, ClientCreds(certs, "ca", "client"));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << refused.status.error_message();
  auto other = FreshHealth(*port, ClientCreds(certs, "ca", "other-client"));
  ASSERT_TRUE(other.status.ok()) << other.status.error_message();

  // ... and accepted once the client CA file is rotated to ca; other-ca's clients are then refused.
  Rotate(certs, "ca.crt", client_ca);
  ASSERT_TRUE(PollUntil([&] {
    auto h = FreshHealth(*port, ClientCreds(certs, "ca", "client"));
    return h.status.ok() && h.serving_status == 1;
  })) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("tls client ca reloaded from '" + client_ca.string() + "'"));
  auto old_client = FreshHealth(*port, ClientCreds(certs, "ca", "other-client"));
  EXPECT_EQ(old_client.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  // Client certificates are still required.
  auto none = FreshHealth(*port, ClientCreds(certs, "ca"));
  EXPECT_EQ(none.status.error_code(), grpc::StatusCode::UNAVAILABLE);

  p.Signal(SIGTERM);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
}

TEST(OpsServerTest, RefusesToStartWithAnExpiredCertificate) {
  TempDir dir;
  const std::string certs = MakeCerts(dir);
  std::vector<std::string> args = BaseFlags(dir);
  args.push_back("--tls-cert=" + certs + "/expired-server.crt");
  args.push_back("--tls-key=" + certs + "/expired-server.key");
  RunResult r = RunToExit(args, dir);
  EXPECT_EQ(r.exit_code, 1) << r.log;
  EXPECT_THAT(r.log, HasSubstr("--tls-cert: certificate '" + certs + "/expired-server.crt'"));
  EXPECT_THAT(r.log, HasSubstr("expired at 20"));
  EXPECT_THAT(r.log, ::testing::Not(HasSubstr("serving")));
}

// The server refuses to start with an expired certificate, so the client side of an expired server
// certificate is shown against a bare gRPC server (health service only) given that certificate.
TEST(OpsServerTest, TlsClientRefusesAnExpiredServerCertificate) {
  TempDir dir;
  const std::string certs = MakeCerts(dir);
  grpc::SslServerCredentialsOptions o;
  o.pem_key_cert_pairs.push_back({testing::ReadWholeFile(certs + "/expired-server.key"),
                                  testing::ReadWholeFile(certs + "/expired-server.crt")});
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::SslServerCredentials(o), &port);
  // gRPC needs one registered service (without one it wants a polled completion queue); every
  // method of this one is UNIMPLEMENTED, only the handshake and health matter here.
  fibquant::v1::KvCompressionService::CallbackService unimplemented;
  builder.RegisterService(&unimplemented);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_NE(port, 0);

  auto expired = HealthVia(port, ClientCreds(certs, "ca"));
  EXPECT_EQ(expired.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << expired.status.error_message();
  // Control: the same bare server with a valid certificate is reachable, so the refusal above is
  // the expiry and not the set-up.
  grpc::SslServerCredentialsOptions valid;
  valid.pem_key_cert_pairs.push_back({testing::ReadWholeFile(certs + "/server.key"),
                                      testing::ReadWholeFile(certs + "/server.crt")});
  grpc::ServerBuilder valid_builder;
  int valid_port = 0;
  valid_builder.AddListeningPort("127.0.0.1:0", grpc::SslServerCredentials(valid), &valid_port);
  fibquant::v1::KvCompressionService::CallbackService unimplemented2;
  valid_builder.RegisterService(&unimplemented2);
  std::unique_ptr<grpc::Server> valid_server = valid_builder.BuildAndStart();
  ASSERT_NE(valid_server, nullptr);
  auto ok = HealthVia(valid_port, ClientCreds(certs, "ca"));
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  valid_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

TEST(OpsServerTest, AdminTokenGuardsRegisterProfile) {
  TempDir dir;
  testing::WriteWholeFile(dir.path() / "token", std::string(kToken) + "\n");
  std::vector<std::string> args = BaseFlags(dir);
  args.push_back("--admin-token-file=" + (dir.path() / "token").string());
  ServerProcess p;
  p.Start(args, dir.path());
  std::optional<int> port = p.WaitForPort();
  ASSERT_TRUE(port.has_value()) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("admin token required"));
  // Scoped: the channel is closed before SIGTERM. (A channel that made synchronous calls and stays
  // open keeps the server's drain waiting until --drain-seconds; that is correct but slow.)
  {
    auto stub = fibquant::v1::KvCompressionService::NewStub(PlainChannel(*port));

    fibquant::v1::RegisterProfileRequest req;
    req.set_spec_json(kSmallSpec);
    auto call = [&](const char* authorization, fibquant::v1::RegisterProfileResponse* resp) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      if (authorization != nullptr) ctx.AddMetadata("authorization", authorization);
      return stub->RegisterProfile(&ctx, req, resp);
    };
    fibquant::v1::RegisterProfileResponse resp;
    EXPECT_EQ(call(nullptr, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(call("Bearer wrong-token-000000000000", &resp).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
    const std::string bearer = std::string("Bearer ") + kToken;
    grpc::Status ok = call(bearer.c_str(), &resp);
    ASSERT_TRUE(ok.ok()) << ok.error_code() << " " << ok.error_message();
    EXPECT_EQ(resp.profile().profile_id(), "ops-test-small");
    EXPECT_EQ(resp.profile().digest().rfind("sha256:", 0), 0u) << resp.profile().digest();

    // Read-only methods stay open.
    grpc::ClientContext ctx;
    fibquant::v1::GetServerInfoResponse info;
    EXPECT_TRUE(stub->GetServerInfo(&ctx, {}, &info).ok());
  }

  p.Signal(SIGTERM);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
}

TEST(OpsServerTest, SigtermDrainsAndExitsZero) {
  TempDir dir;
  ServerProcess p;
  p.Start(BaseFlags(dir), dir.path());
  std::optional<int> port = p.WaitForPort();
  ASSERT_TRUE(port.has_value()) << p.Log();
  auto channel = PlainChannel(*port);
  auto health = testing::CheckHealth(channel, kService);
  ASSERT_TRUE(health.status.ok()) << health.status.error_message();
  EXPECT_EQ(health.serving_status, 1);

  p.Signal(SIGTERM);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("received SIGTERM, draining"));
  EXPECT_THAT(p.Log(), HasSubstr("stopped"));
}

// A page of 16 real K vectors: tokens [16*index, 16*index+16) of layer 0, head 0 of
// tests/data/L0_k.f32 (float32 [64 tokens, 4 heads, 64 dims]), token-major.
fibquant::v1::CompressPagesRequest KeyPage(int index) {
  const std::string all = testing::ReadWholeFile(std::string(FQ_TEST_DATA_DIR) + "/L0_k.f32");
  constexpr size_t kRow = 64 * sizeof(float), kHeads = 4, kTokens = 16;
  fibquant::v1::CompressPagesRequest req;
  auto* page = req.mutable_page();
  page->mutable_coordinates()->set_token_start(static_cast<uint32_t>(index * kTokens));
  page->mutable_coordinates()->set_token_count(kTokens);
  page->set_client_sequence(static_cast<uint64_t>(index));
  for (size_t t = 0; t < kTokens; ++t) {
    const size_t token = static_cast<size_t>(index) * kTokens + t;
    page->mutable_data()->append(all.substr(token * kHeads * kRow, kRow));
  }
  return req;
}

TEST(OpsServerTest, DrainLetsARunningStreamFinishAndRefusesNewCalls) {
  TempDir dir;
  ServerProcess p;
  p.Start(BaseFlags(dir), dir.path());
  std::optional<int> port = p.WaitForPort();
  ASSERT_TRUE(port.has_value()) << p.Log();
  {
    auto stub = fibquant::v1::KvCompressionService::NewStub(PlainChannel(*port));
    std::string digest;
    {
      grpc::ClientContext ctx;
      fibquant::v1::RegisterProfileRequest req;
      req.set_spec_json(kSmallSpec);
      fibquant::v1::RegisterProfileResponse resp;
      grpc::Status s = stub->RegisterProfile(&ctx, req, &resp);
      ASSERT_TRUE(s.ok()) << s.error_message();
      digest = resp.profile().digest();
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    auto stream = stub->CompressPages(&ctx);
    fibquant::v1::CompressPagesRequest header;
    header.mutable_header()->set_profile_digest(digest);
    header.mutable_header()->set_input_dtype(fibquant::v1::DTYPE_F32);
    ASSERT_TRUE(stream->Write(header));
    fibquant::v1::CompressPagesResponse resp;
    ASSERT_TRUE(stream->Write(KeyPage(0)));
    ASSERT_TRUE(stream->Read(&resp));
    ASSERT_TRUE(resp.has_page());

    // The stream is running; drain starts.
    p.Signal(SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + testing::kStartTimeout;
    while (p.Log().find("draining: health NOT_SERVING") == std::string::npos &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ASSERT_THAT(p.Log(), HasSubstr("draining: health NOT_SERVING"));

    // A new client is not served. Depending on how far grpc::Server::Shutdown has got, health
    // answers NOT_SERVING (before Shutdown), gRPC cancels the new call (CANCELLED, Shutdown
    // started), or the listener is gone (UNAVAILABLE). SERVING or any other code is a failure.
    auto fresh = testing::CheckHealth(PlainChannel(*port), kService);
    if (fresh.status.ok()) {
      EXPECT_EQ(fresh.serving_status, 2);  // NOT_SERVING
    } else {
      EXPECT_THAT(fresh.status.error_code(),
                  ::testing::AnyOf(grpc::StatusCode::CANCELLED, grpc::StatusCode::UNAVAILABLE))
          << fresh.status.error_message();
    }

    // The running stream still completes: one more page, half-close, receipt, OK.
    ASSERT_TRUE(stream->Write(KeyPage(1)));
    ASSERT_TRUE(stream->Read(&resp));
    EXPECT_TRUE(resp.has_page());
    ASSERT_TRUE(stream->WritesDone());
    ASSERT_TRUE(stream->Read(&resp));
    ASSERT_TRUE(resp.has_receipt());
    EXPECT_EQ(resp.receipt().pages(), 2u);
    EXPECT_FALSE(stream->Read(&resp));
    grpc::Status finish = stream->Finish();
    EXPECT_TRUE(finish.ok()) << finish.error_code() << " " << finish.error_message();
  }
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
}

TEST(OpsServerTest, SigintAlsoExitsZero) {
  TempDir dir;
  ServerProcess p;
  p.Start(BaseFlags(dir), dir.path());
  ASSERT_TRUE(p.WaitForPort().has_value()) << p.Log();
  p.Signal(SIGINT);
  EXPECT_EQ(p.WaitForExit(), 0) << p.Log();
  EXPECT_THAT(p.Log(), HasSubstr("received SIGINT"));
}

}  // namespace
}  // namespace fibquant::server
