// fq_client (client/client.h) against
//   - the real KvCompressionServiceImpl in this process (in-process channel, and a loopback port
//     for the restart test), with the real USE-Lite key fixture; and
//   - a scripted fake service, for what a healthy server never does on cue: UNAVAILABLE, lost
//     profiles, slow answers, out-of-order answers, and for observing the client's send window.
#include "client/client.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/metrics.h"
#include "server/security.h"
#include "server/service.h"

namespace fibquant::client {
namespace {

namespace v1 = fibquant::v1;
using ::testing::HasSubstr;

// --- the real service ------------------------------------------------------------------------

// The real service behind a gRPC server in this process. `listen` empty: in-process channel only.
class RealServer {
 public:
  explicit RealServer(const std::string& listen = "",
                      std::shared_ptr<grpc::ServerCredentials> creds = nullptr) {
    server::ServiceOptions options;  // data_dir empty: registry in memory (lost on restart)
    options.worker_threads = 2;
    auto service = server::KvCompressionServiceImpl::Create(options, &metrics_);
    EXPECT_TRUE(service.ok()) << service.status();
    service_ = *std::move(service);
    grpc::EnableDefaultHealthCheckService(true);  // as server/main.cc does
    grpc::ServerBuilder builder;
    if (!listen.empty()) {
      builder.AddListeningPort(listen, creds ? creds : grpc::InsecureServerCredentials(), &port_);
    }
    builder.RegisterService(service_.get());
    builder.SetMaxReceiveMessageSize(64 << 20);
    builder.SetMaxSendMessageSize(64 << 20);
    server_ = builder.BuildAndStart();
    // A fixed port may legitimately be taken (the restart test checks port()); any other failure
    // to start is a test failure.
    if (listen.empty() || listen.ends_with(":0")) {
      EXPECT_NE(server_, nullptr);
    }
  }
  ~RealServer() {
    if (server_ != nullptr) {  // null when the port could not be bound
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
      server_->Wait();
    }
    server_.reset();  // the service must outlive the server
    service_.reset();
  }
  void SetServing(bool serving) {
    server_->GetHealthCheckService()->SetServingStatus("fibquant.v1.KvCompressionService", serving);
  }
  std::shared_ptr<grpc::Channel> InProcessChannel() {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    return server_->InProcessChannel(args);
  }
  int port() const { return port_; }

 private:
  server::Metrics metrics_;
  std::unique_ptr<server::KvCompressionServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

// USE-Lite layer 0 keys: [tokens 64, heads 4, head_dim 64] f32 (tests/data/README.md).
constexpr uint32_t kTokens = 64, kHeads = 4, kHeadDim = 64, kTokensPerPage = 16;

std::vector<float> LoadKeys() {
  std::ifstream in(std::string(FQ_TEST_DATA_DIR) + "/L0_k.f32", std::ios::binary);
  std::vector<float> v(kTokens * kHeads * kHeadDim);
  in.read(reinterpret_cast<char*>(v.data()),
          static_cast<std::streamsize>(v.size() * sizeof(float)));
  EXPECT_TRUE(in.good()) << "tests/data/L0_k.f32 missing or short";
  return v;
}

v1::KvProfileSpec KeySpec(uint64_t seed = 7) {
  v1::KvProfileSpec spec;
  spec.set_profile_id("client-test-use-lite-l0-keys");
  spec.set_axis_policy("per_token");
  v1::KvShape* shape = spec.mutable_shape();
  shape->set_role("key");
  shape->set_attention_kind("mha");
  shape->set_batch(1);
  shape->set_layers(1);
  shape->set_kv_heads(kHeads);
  shape->set_query_heads(kHeads);
  shape->set_tokens(kTokens);
  shape->set_head_dim(kHeadDim);
  shape->set_dtype("f32");
  shape->set_rope_state("pre_rope");
  spec.mutable_page_geometry()->set_tokens_per_page(kTokensPerPage);
  v1::FibQuantParams* fq = spec.mutable_fibquant();
  fq->set_block_dim(2);
  fq->set_codebook_size(64);  // small: the codebook builds in well under a second
  fq->set_seed(seed);
  return spec;
}

// Every (head, page) of the fixture as a RawPage, token-major f32.
std::vector<v1::RawPage> KeyPages(const std::vector<float>& keys) {
  std::vector<v1::RawPage> pages;
  for (uint32_t h = 0; h < kHeads; ++h) {
    for (uint32_t t0 = 0; t0 < kTokens; t0 += kTokensPerPage) {
      v1::RawPage p;
      auto* c = p.mutable_coordinates();
      c->set_batch(0);
      c->set_layer(0);
      c->set_kv_head(h);
      c->set_token_start(t0);
      c->set_token_count(kTokensPerPage);
      std::string data(kTokensPerPage * kHeadDim * sizeof(float), '\0');
      for (uint32_t t = 0; t < kTokensPerPage; ++t) {
        std::memcpy(&data[t * kHeadDim * sizeof(float)], &keys[((t0 + t) * kHeads + h) * kHeadDim],
                    kHeadDim * sizeof(float));
      }
      p.set_data(std::move(data));
      pages.push_back(std::move(p));
    }
  }
  return pages;
}

double Cosine(const std::string& a, const std::string& b) {
  const size_t n = a.size() / sizeof(float);
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < n; ++i) {
    float x, y;
    std::memcpy(&x, a.data() + i * sizeof(float), sizeof x);
    std::memcpy(&y, b.data() + i * sizeof(float), sizeof y);
    dot += double{x} * y;
    na += double{x} * x;
    nb += double{y} * y;
  }
  return dot / std::sqrt(na * nb);
}

ClientOptions FastRetries() {
  ClientOptions o;
  o.initial_backoff = std::chrono::milliseconds(10);
  o.max_backoff = std::chrono::milliseconds(200);
  o.unary_timeout = std::chrono::seconds(60);
  o.stream_timeout = std::chrono::seconds(120);
  return o;
}

TEST(ClientRealServer, RegisterCompressDecompressReceiptCodebook) {
  RealServer srv;
  ClientOptions opts = FastRetries();
  opts.max_pages_in_flight = 3;  // fewer than the 16 pages: the window must slide
  KvClient client(srv.InProcessChannel(), opts);

  auto info = client.RegisterProfile(KeySpec());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_THAT(info->digest(), ::testing::StartsWith("sha256:"));
  EXPECT_EQ(info->head_dim(), kHeadDim);
  EXPECT_THAT(client.HeldDigests(), ::testing::ElementsAre(info->digest()));
  // Registering again is idempotent: same digest.
  auto again = client.RegisterProfile(KeySpec());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->digest(), info->digest());

  const std::vector<float> keys = LoadKeys();
  const std::vector<v1::RawPage> pages = KeyPages(keys);
  CompressOptions co;
  co.label = "client_test";
  auto compressed = client.CompressPages(info->digest(), pages, co);
  ASSERT_TRUE(compressed.ok()) << compressed.status();
  ASSERT_EQ(compressed->pages.size(), pages.size());
  std::vector<std::string> frames;
  for (size_t i = 0; i < pages.size(); ++i) {
    const v1::CompressedPage& cp = compressed->pages[i];
    EXPECT_EQ(cp.sequence(), i);
    EXPECT_EQ(cp.client_sequence(), i);
    EXPECT_EQ(cp.coordinates().SerializeAsString(), pages[i].coordinates().SerializeAsString());
    EXPECT_LT(cp.frame().size(), pages[i].data().size());  // it does compress
    frames.push_back(cp.frame());
  }
  const v1::Receipt& receipt = compressed->receipt;
  EXPECT_EQ(receipt.pages(), pages.size());
  EXPECT_EQ(receipt.profile_digest(), info->digest());
  EXPECT_EQ(receipt.label(), "client_test");
  EXPECT_GT(receipt.compression_ratio(), 1.0);

  auto fetched = client.GetReceipt(receipt.receipt_id());
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_EQ(fetched->receipt_digest(), receipt.receipt_digest());
  auto listed = client.ListReceipts(info->digest());
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_FALSE(listed->empty());
  EXPECT_EQ(listed->front().receipt_id(), receipt.receipt_id());

  auto decoded = client.DecompressPages(frames, v1::DTYPE_F32, info->digest());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_EQ(decoded->pages.size(), pages.size());
  for (size_t i = 0; i < pages.size(); ++i) {
    const v1::DecodedPage& dp = decoded->pages[i];
    EXPECT_EQ(dp.sequence(), i);
    EXPECT_EQ(dp.coordinates().SerializeAsString(), pages[i].coordinates().SerializeAsString());
    ASSERT_EQ(dp.data().size(), pages[i].data().size());
    // 3 bits per coordinate (N = 64, k = 2) on real keys: close, not exact.
    EXPECT_GT(Cosine(dp.data(), pages[i].data()), 0.9) << "page " << i;
  }

  auto codebook = client.GetCodebook(info->digest());
  ASSERT_TRUE(codebook.ok()) << codebook.status();
  EXPECT_EQ(codebook->codebook_size(), 64u);
  EXPECT_EQ(codebook->block_dim(), 2u);
  EXPECT_EQ(codebook->codewords_size(), 64 * 2);
  EXPECT_EQ(codebook->codebook_digest(), info->codebook_digest());
}

TEST(ClientRealServer, ErrorsAreAbslStatusesNamingTheMethod) {
  RealServer srv;
  KvClient client(srv.InProcessChannel(), FastRetries());
  const std::string unknown = "sha256:" + std::string(64, '0');
  auto p = client.GetProfile(unknown);  // not held by this client: no recovery, plain NOT_FOUND
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(p.status().message(), HasSubstr("GetProfile: "));
  v1::KvProfileSpec bad = KeySpec();
  bad.mutable_fibquant()->set_block_dim(64);  // must be below head_dim 64
  auto r = client.RegisterProfile(bad);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(client.HeldDigests().empty());
}

// One client shared by several threads (the documented use): every stream keeps its own order.
TEST(ClientRealServer, ConcurrentStreamsFromOneClient) {
  RealServer srv;
  ClientOptions opts = FastRetries();
  opts.max_pages_in_flight = 4;
  KvClient client(srv.InProcessChannel(), opts);
  auto info = client.RegisterProfile(KeySpec());
  ASSERT_TRUE(info.ok()) << info.status();
  const std::vector<v1::RawPage> pages = KeyPages(LoadKeys());
  constexpr int kThreads = 4;
  std::vector<absl::StatusOr<CompressResult>> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Each thread sends the pages rotated by t, so a mix-up between streams would show.
      std::vector<v1::RawPage> mine(pages.begin() + t, pages.end());
      mine.insert(mine.end(), pages.begin(), pages.begin() + t);
      results[t] = client.CompressPages(info->digest(), mine);
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_TRUE(results[t].ok()) << "thread " << t << ": " << results[t].status();
    ASSERT_EQ(results[t]->pages.size(), pages.size());
    for (size_t i = 0; i < pages.size(); ++i) {
      const v1::RawPage& want = pages[(i + t) % pages.size()];
      EXPECT_EQ(results[t]->pages[i].coordinates().SerializeAsString(),
                want.coordinates().SerializeAsString())
          << "thread " << t << " page " << i;
    }
  }
}

TEST(ClientRealServer, CheckHealth) {
  RealServer srv;
  KvClient client(srv.InProcessChannel(), FastRetries());
  srv.SetServing(true);
  auto serving = client.CheckHealth("fibquant.v1.KvCompressionService");
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
  auto overall = client.CheckHealth("");
  ASSERT_TRUE(overall.ok()) << overall.status();
  EXPECT_TRUE(*overall);
  srv.SetServing(false);
  serving = client.CheckHealth("fibquant.v1.KvCompressionService");
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_FALSE(*serving);
  auto unknown = client.CheckHealth("no.such.Service");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << unknown.status();
}

// A server restart that loses the registry (memory-only data dir): while it is down the client's
// calls fail with UNAVAILABLE and are retried; once it is back, the profile digest is unknown
// (NOT_FOUND), so the client re-registers the spec it holds and the compression goes through.
TEST(ClientRealServer, SurvivesServerRestartThatLosesProfiles) {
  auto first = std::make_unique<RealServer>("127.0.0.1:0");
  const int port = first->port();
  ASSERT_GT(port, 0);
  const std::string target = "127.0.0.1:" + std::to_string(port);
  ClientOptions opts = FastRetries();
  opts.max_attempts = 50;  // up to ~10 s of backoff: enough for the restart below
  std::atomic<int> retries{0};
  opts.on_retry = [&](int, const absl::Status& s) {
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
    ++retries;
  };
  KvClient client(MakeInsecureChannel(target), opts);
  auto info = client.RegisterProfile(KeySpec());
  ASSERT_TRUE(info.ok()) << info.status();

  first.reset();  // server gone; its registry with it
  std::unique_ptr<RealServer> second;
  std::thread restart([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    second = std::make_unique<RealServer>(target);
  });
  const std::vector<v1::RawPage> pages = KeyPages(LoadKeys());
  auto compressed = client.CompressPages(info->digest(), pages);
  restart.join();
  ASSERT_NE(second, nullptr);
  if (second->port() != port) {
    // Another process took the freed port in the half second it was free: the scenario could
    // not be staged, which says nothing about the client.
    GTEST_SKIP() << "port " << port << " was taken before the server could restart on it";
  }
  ASSERT_TRUE(compressed.ok()) << compressed.status();
  EXPECT_EQ(compressed->pages.size(), pages.size());
  EXPECT_EQ(compressed->receipt.profile_digest(), info->digest());
  EXPECT_GE(retries.load(), 1) << "the call never saw the server down";
}

// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with the
// openssl command-line tool (package openssl, installed by scripts/install-deps).
class TestPki {
 public:
  TestPki() {
    char tmpl[] = "/tmp/fq-client-tls-XXXXXX";
    const char* made = mkdtemp(tmpl);
    if (made == nullptr) return;
    dir_ = made;
    const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    std::ofstream(dir_ / "san.ext") << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
    const std::string script =
        "cd " + dir_.string() + " && openssl req -x509" + ec +
        " -keyout ca.key -out ca.crt -days 1 -subj /CN=fq-test-ca && openssl req" + ec +
        " -keyout server.key -out server.csr -subj /CN=localhost && openssl x509 -req" +
        " -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 1" +
        " -extfile san.ext && openssl req" + ec +
        " -keyout client.key -out client.csr -subj /CN=fq-test-client && openssl x509 -req" +
        " -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 1" +
        " >/dev/null 2>&1";
    ok_ = std::system(script.c_str()) == 0;
  }
  ~TestPki() {
    std::error_code ec;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
  }
  bool ok() const { return ok_; }
  std::string Path(const char* name) const { return (dir_ / name).string(); }
  std::string Read(const char* name) const {
    std::ifstream in(dir_ / name);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

 private:
  std::filesystem::path dir_;
  bool ok_ = false;
};

// MakeTlsChannel against the server's own credentials code (server/security.h) in mTLS mode.
TEST(ClientRealServer, MutualTlsChannel) {
  TestPki pki;
  ASSERT_TRUE(pki.ok()) << "openssl could not make the test certificates";
  auto creds = server::MakeServerCredentials(
      server::TlsFlags{pki.Path("server.crt"), pki.Path("server.key"), pki.Path("ca.crt")});
  ASSERT_TRUE(creds.ok()) << creds.status();
  RealServer srv("127.0.0.1:0", *creds);
  ASSERT_GT(srv.port(), 0);
  const std::string target = "localhost:" + std::to_string(srv.port());

  TlsChannelConfig tls;
  tls.root_certs_pem = pki.Read("ca.crt");
  tls.client_cert_chain_pem = pki.Read("client.crt");
  tls.client_key_pem = pki.Read("client.key");
  KvClient client(MakeTlsChannel(target, tls), FastRetries());
  auto info = client.GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  auto profile = client.RegisterProfile(KeySpec());
  ASSERT_TRUE(profile.ok()) << profile.status();

  // Without a client certificate the handshake fails: UNAVAILABLE after the configured attempts.
  TlsChannelConfig no_cert;
  no_cert.root_certs_pem = tls.root_certs_pem;
  ClientOptions twice = FastRetries();
  twice.max_attempts = 2;
  twice.unary_timeout = std::chrono::seconds(10);
  auto refused = KvClient(MakeTlsChannel(target, no_cert), twice).GetServerInfo();
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
}

// --- the scripted fake ------------------------------------------------------------------------

constexpr char kFakeDigest[] = "sha256:fake";

class FakeService final : public v1::KvCompressionService::Service {
 public:
  std::atomic<int> register_calls{0};
  std::atomic<int> unavailable_registers{0};  // answer this many RegisterProfile calls UNAVAILABLE
  std::atomic<bool> known{false};             // whether kFakeDigest is "registered"
  std::atomic<bool> register_forgets{false};  // RegisterProfile answers OK but registers nothing
  std::atomic<int> register_delay_ms{0};
  std::atomic<bool> swap_answers{false};  // answer pages 0 and 1 in the wrong order
  size_t window_probe = 0;                // >0: observe the client's send window (below)
  std::atomic<bool> window_exceeded{false};
  std::atomic<size_t> pages_before_first_answer{0};

  grpc::Status RegisterProfile(grpc::ServerContext* ctx, const v1::RegisterProfileRequest*,
                               v1::RegisterProfileResponse* resp) override {
    ++register_calls;
    for (int waited = 0; waited < register_delay_ms.load(); waited += 10) {
      if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (unavailable_registers.load() > 0) {
      --unavailable_registers;
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "fake: warming up");
    }
    if (!register_forgets) known = true;
    resp->mutable_profile()->set_digest(kFakeDigest);
    return grpc::Status::OK;
  }

  grpc::Status GetCodebook(grpc::ServerContext*, const v1::GetCodebookRequest* req,
                           v1::GetCodebookResponse* resp) override {
    if (req->digest() != kFakeDigest || !known) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "fake: unknown profile " + req->digest());
    }
    resp->set_profile_digest(kFakeDigest);
    return grpc::Status::OK;
  }

  // Echoes pages (frame = page data), answering in pairs. With window_probe = W: first reads W
  // pages without answering, checks for 300 ms that no further page arrives (the client must wait
  // for an answer), then answers one page, which must release exactly one more page.
  grpc::Status CompressPages(grpc::ServerContext*,
                             grpc::ServerReaderWriter<v1::CompressPagesResponse,
                                                      v1::CompressPagesRequest>* stream) override {
    v1::CompressPagesRequest req;
    if (!stream->Read(&req) || !req.has_header()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "fake: header first");
    }
    if (req.header().profile_digest() != kFakeDigest || !known) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "fake: unknown profile");
    }
    std::vector<v1::RawPage> pending;
    uint64_t next = 0;
    auto answer = [&](const v1::RawPage& p, uint64_t seq) {
      v1::CompressPagesResponse resp;
      resp.mutable_page()->set_sequence(seq);
      resp.mutable_page()->set_client_sequence(p.client_sequence());
      *resp.mutable_page()->mutable_coordinates() = p.coordinates();
      resp.mutable_page()->set_frame(p.data());
      stream->Write(resp);
    };
    bool more = true;
    if (window_probe > 0) {
      while (pending.size() < window_probe && (more = stream->Read(&req)))
        pending.push_back(req.page());
      pages_before_first_answer = pending.size();
      if (more) {
        auto extra = std::async(std::launch::async, [&] { return stream->Read(&req); });
        if (extra.wait_for(std::chrono::milliseconds(300)) == std::future_status::ready) {
          window_exceeded = true;
        }
        answer(pending.front(), next++);  // frees one slot: the extra read can now complete
        pending.erase(pending.begin());
        more = extra.get();
        if (more) pending.push_back(req.page());
      }
      // Answer everything read so far: the client's window is full, so waiting for another page
      // before answering would deadlock.
      for (const auto& p : pending) answer(p, next++);
      pending.clear();
    }
    while (more && (more = stream->Read(&req))) {
      pending.push_back(req.page());
      if (pending.size() >= 2) {
        if (swap_answers && next == 0) {
          answer(pending[1], next++);
          answer(pending[0], next++);
        } else {
          answer(pending[0], next++);
          answer(pending[1], next++);
        }
        pending.erase(pending.begin(), pending.begin() + 2);
      }
    }
    for (const auto& p : pending) answer(p, next++);
    v1::CompressPagesResponse done;
    done.mutable_receipt()->set_pages(next);
    done.mutable_receipt()->set_profile_digest(kFakeDigest);
    stream->Write(done);
    return grpc::Status::OK;
  }
};

class FakeServer {
 public:
  FakeServer() {
    grpc::ServerBuilder builder;
    builder.RegisterService(&service);
    server_ = builder.BuildAndStart();
  }
  ~FakeServer() {
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_->Wait();
  }
  std::shared_ptr<grpc::Channel> Channel() { return server_->InProcessChannel({}); }
  FakeService service;

 private:
  std::unique_ptr<grpc::Server> server_;
};

std::vector<v1::RawPage> FakePages(size_t n) {
  std::vector<v1::RawPage> pages(n);
  for (size_t i = 0; i < n; ++i) {
    pages[i].mutable_coordinates()->set_token_start(static_cast<uint32_t>(i));
    pages[i].set_data("page-" + std::to_string(i));
  }
  return pages;
}

TEST(ClientFake, RetriesUnavailableWithBackoffThenSucceeds) {
  FakeServer fake;
  fake.service.unavailable_registers = 2;
  ClientOptions opts = FastRetries();
  std::vector<int> attempts;
  opts.on_retry = [&](int attempt, const absl::Status& s) {
    attempts.push_back(attempt);
    EXPECT_THAT(s.message(), HasSubstr("RegisterProfile: fake: warming up"));
  };
  KvClient client(fake.Channel(), opts);
  auto info = client.RegisterProfile(KeySpec());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->digest(), kFakeDigest);
  EXPECT_EQ(fake.service.register_calls.load(), 3);
  EXPECT_THAT(attempts, ::testing::ElementsAre(2, 3));
}

TEST(ClientFake, GivesUpAfterMaxAttempts) {
  FakeServer fake;
  fake.service.unavailable_registers = 100;
  ClientOptions opts = FastRetries();
  opts.max_attempts = 4;
  opts.initial_backoff = std::chrono::milliseconds(40);
  opts.backoff_multiplier = 2.0;
  KvClient client(fake.Channel(), opts);
  const auto start = std::chrono::steady_clock::now();
  auto info = client.RegisterProfile(KeySpec());
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake.service.register_calls.load(), 4);
  // Backoffs 40, 80, 160 ms, each jittered to at least half: >= 140 ms in all.
  EXPECT_GE(waited, std::chrono::milliseconds(140));
}

TEST(ClientFake, DeadlineOnEveryCallAndNoRetryAfterIt) {
  FakeServer fake;
  fake.service.register_delay_ms = 5000;
  ClientOptions opts = FastRetries();
  opts.register_timeout = std::chrono::milliseconds(200);
  KvClient client(fake.Channel(), opts);
  const auto start = std::chrono::steady_clock::now();
  auto info = client.RegisterProfile(KeySpec());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kDeadlineExceeded) << info.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  EXPECT_EQ(fake.service.register_calls.load(), 1);
}

TEST(ClientFake, NotFoundReRegistersHeldSpecOnce) {
  FakeServer fake;
  KvClient client(fake.Channel(), FastRetries());
  ASSERT_TRUE(client.RegisterProfile(KeySpec()).ok());
  fake.service.known = false;  // the server "lost" the profile
  auto cb = client.GetCodebook(kFakeDigest);
  ASSERT_TRUE(cb.ok()) << cb.status();
  EXPECT_EQ(fake.service.register_calls.load(), 2);

  fake.service.known = false;
  auto compressed = client.CompressPages(kFakeDigest, FakePages(5));
  ASSERT_TRUE(compressed.ok()) << compressed.status();
  EXPECT_EQ(fake.service.register_calls.load(), 3);

  // A digest this client never registered: NOT_FOUND passes through, nothing is registered.
  auto other = client.GetCodebook("sha256:other");
  EXPECT_EQ(other.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(fake.service.register_calls.load(), 3);
}

TEST(ClientFake, NotFoundRecoveryIsBoundedByMaxProfileRecoveries) {
  FakeServer fake;
  ClientOptions opts = FastRetries();
  opts.max_profile_recoveries = 3;
  KvClient client(fake.Channel(), opts);
  ASSERT_TRUE(client.RegisterProfile(KeySpec()).ok());
  // Re-registration "succeeds" but the profile stays unknown (as when every retry reaches another
  // replica): max_profile_recoveries recoveries, then the NOT_FOUND.
  fake.service.known = false;
  fake.service.register_forgets = true;
  auto cb = client.GetCodebook(kFakeDigest);
  EXPECT_EQ(cb.status().code(), absl::StatusCode::kNotFound) << cb.status();
  EXPECT_EQ(fake.service.register_calls.load(), 1 + 3);
}

TEST(ClientFake, PipelinesUpToTheWindowAndNoFurther) {
  FakeServer fake;
  ASSERT_TRUE(KvClient(fake.Channel(), FastRetries()).RegisterProfile(KeySpec()).ok());
  fake.service.window_probe = 6;
  ClientOptions opts = FastRetries();
  opts.max_pages_in_flight = 6;
  KvClient client(fake.Channel(), opts);
  const std::vector<v1::RawPage> pages = FakePages(40);
  auto r = client.CompressPages(kFakeDigest, pages);
  ASSERT_TRUE(r.ok()) << r.status();
  // Six pages were on the wire before any answer (pipelined, not one at a time) ...
  EXPECT_EQ(fake.service.pages_before_first_answer.load(), 6u);
  // ... and no seventh until an answer arrived.
  EXPECT_FALSE(fake.service.window_exceeded.load());
  ASSERT_EQ(r->pages.size(), pages.size());
  for (size_t i = 0; i < pages.size(); ++i) EXPECT_EQ(r->pages[i].frame(), pages[i].data());
  EXPECT_EQ(r->receipt.pages(), pages.size());
}

TEST(ClientFake, OutOfOrderAnswersAreAnError) {
  FakeServer fake;
  KvClient client(fake.Channel(), FastRetries());
  ASSERT_TRUE(client.RegisterProfile(KeySpec()).ok());
  fake.service.swap_answers = true;
  auto r = client.CompressPages(kFakeDigest, FakePages(8));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(r.status().message(), HasSubstr("out of order"));
}

}  // namespace
}  // namespace fibquant::client
