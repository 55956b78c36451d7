// Issue 14 (hardening) at the service and registry level, in process: receipt ids, receipts of
// failed and empty streams, the memory budget, idle streams, unauthenticated builds, shutdown of
// builds. Each test names the defect it pins and fails on the code before the fix.
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "core/kv_frame.h"
#include "core/kv_frame_auth.h"
#include "server/metrics.h"
#include "server/registry.h"
#include "server/service.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::fibquant::v1;
using ::testing::HasSubstr;

std::string FreshDir(const char* tag) {
  std::string tmpl = ::testing::TempDir() + "fq_harden_" + tag + "_XXXXXX";
  EXPECT_NE(::mkdtemp(tmpl.data()), nullptr);
  return tmpl;
}

v1::Receipt SomeReceipt() {
  v1::Receipt r;
  r.set_operation("compress");
  r.set_pages(1);
  return r;
}

// Issue 14 item 9: ids were "rcpt-<counter>" with the counter rebuilt from the files on disk, so a
// receipt that was never persisted, every memory-only replica and every restart after the files
// were dropped reissued rcpt-000000000000.
TEST(HardenRegistry, ReceiptIdsAreUniqueAcrossRestartsAndReplicas) {
  std::set<std::string> ids;
  auto add = [&](Registry* r) {
    auto stored = r->AddReceipt(SomeReceipt());
    ASSERT_TRUE(stored.ok()) << stored.status();
    EXPECT_TRUE(ids.insert(stored->receipt_id()).second) << "repeated " << stored->receipt_id();
    EXPECT_THAT(stored->receipt_id(), ::testing::MatchesRegex("rcpt-[0-9]+-[0-9a-f]{8}-[0-9]{12}"));
  };
  // Two memory-only replicas.
  for (int replica = 0; replica < 2; ++replica) {
    auto r = Registry::Open(RegistryOptions{}, nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    add(r->get());
    add(r->get());
  }
  // Restarts on one data dir, with every file removed in between (a receipt not persisted, or a
  // retention that dropped them all).
  const std::string dir = FreshDir("ids");
  for (int restart = 0; restart < 3; ++restart) {
    RegistryOptions o;
    o.data_dir = dir;
    auto r = Registry::Open(o, nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    add(r->get());
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(fs::path(dir) / "receipts")) fs::remove(e.path(), ec);
  }
  EXPECT_EQ(ids.size(), 7u);
  // The order key is the last field, for old and new ids alike.
  EXPECT_EQ(Registry::ReceiptSeqOf("rcpt-000000000042"), 42u);
  EXPECT_EQ(Registry::ReceiptSeqOf("rcpt-1764990000-0a1b2c3d-000000000007"), 7u);
  EXPECT_FALSE(Registry::ReceiptSeqOf("receipt-7").has_value());
  EXPECT_FALSE(Registry::ReceiptSeqOf("rcpt-12-ab-x").has_value());
  std::error_code ec;
  fs::remove_all(dir, ec);
}

TEST(HardenRegistry, RemoveReceiptDropsMemoryAndFile) {
  const std::string dir = FreshDir("rm");
  RegistryOptions o;
  o.data_dir = dir;
  auto r = Registry::Open(o, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  auto stored = (*r)->AddReceipt(SomeReceipt());
  ASSERT_TRUE(stored.ok());
  const fs::path file = fs::path(dir) / "receipts" / (stored->receipt_id() + ".json");
  EXPECT_TRUE(fs::exists(file));
  (*r)->RemoveReceipt(stored->receipt_id());
  EXPECT_FALSE(fs::exists(file));
  EXPECT_EQ((*r)->GetReceipt(stored->receipt_id()).status().code(), absl::StatusCode::kNotFound);
  std::error_code ec;
  fs::remove_all(dir, ec);
}

// ---------------------------------------------------------------------------------------------
// The service over loopback TCP (real HTTP/2 flow control: a client that does not read makes the
// server's writes wait, which an in-process channel would not).

constexpr uint32_t kBigDim = 1024;  // a 1024-token page of head_dim 1024 decodes to 4 MiB (f32)

// Per-token keys, head_dim 1024, 1024-token pages, k = 256, N = 2: 4 bits of code per token, so a
// frame of ~1 KiB decodes to 4 MiB: the amplification of issue 14 item 1 at a quarter scale.
std::string BigSpec() {
  return R"({"profile_id":"harden.big","shape":{"role":"key","attention_kind":"mha","batch":1,)"
         R"("layers":1,"kv_heads":1,"query_heads":1,"tokens":1024,"head_dim":1024,"dtype":"f32",)"
         R"("rope_state":"pre_rope"},"axis_policy":"per_token","tokens_per_page":1024,)"
         R"("fibquant":{"block_dim":256,"codebook_size":2,"seed":3,"training_samples":64,)"
         R"("lloyd_restarts":1,"lloyd_iterations":2,"rotation_algorithm":"hadamard"}})";
}

std::string SmallSpec(const std::string& id, const std::string& fib_extra = "") {
  return R"({"profile_id":")" + id +
         R"(","shape":{"role":"key","attention_kind":"mha","batch":1,"layers":1,"kv_heads":1,)"
         R"("query_heads":1,"tokens":64,"head_dim":64,"dtype":"f32","rope_state":"pre_rope"},)"
         R"("axis_policy":"per_token","tokens_per_page":16,"fibquant":{"block_dim":2,)"
         R"("codebook_size":16,"seed":7)" + fib_extra + "}}";
}

// The value of the unlabelled series `name` in Prometheus text (nullopt when absent).
std::optional<double> SeriesValue(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(name + " ", 0) == 0) return std::strtod(line.c_str() + name.size() + 1, nullptr);
  }
  return std::nullopt;
}

template <typename Pred>
bool WaitUntil(Pred done, int seconds = 60) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return done();
}

class HardenService : public ::testing::Test {
 protected:
  void SetUp() override {
    data_dir_ = FreshDir("svc");
    options_.data_dir = data_dir_;
    options_.worker_threads = 2;
    options_.build_threads = 1;
  }
  void TearDown() override {
    stub_.reset();
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
      server_->Wait();
    }
    server_.reset();
    svc_.reset();
    std::error_code ec;
    fs::remove_all(data_dir_, ec);
  }
  void Start() {
    auto svc = KvCompressionServiceImpl::Create(options_, &metrics_);
    ASSERT_TRUE(svc.ok()) << svc.status();
    svc_ = *std::move(svc);
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(svc_.get());
    b.SetMaxReceiveMessageSize(64 << 20);
    b.SetMaxSendMessageSize(64 << 20);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    target_ = "127.0.0.1:" + std::to_string(port);
    stub_ = NewStub();
  }
  // A stub on a connection of its own (the server caps streams per connection only in main.cc).
  std::unique_ptr<v1::KvCompressionService::Stub> NewStub() {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a private connection
    return v1::KvCompressionService::NewStub(
        grpc::CreateCustomChannel(target_, grpc::InsecureChannelCredentials(), args));
  }
  std::string Register(const std::string& spec, const std::string& token = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    v1::RegisterProfileRequest req;
    req.set_spec_json(spec);
    v1::RegisterProfileResponse resp;
    grpc::Status s = stub_->RegisterProfile(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.profile().digest();
  }
  // Compresses one page of `tokens` x `dim` deterministic values; returns the frame.
  std::string CompressOne(const std::string& digest, uint32_t tokens, uint32_t dim) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    auto stream = stub_->CompressPages(&ctx);
    v1::CompressPagesRequest req;
    req.mutable_header()->set_profile_digest(digest);
    req.mutable_header()->set_input_dtype(v1::DTYPE_F32);
    EXPECT_TRUE(stream->Write(req));
    req.Clear();
    std::vector<float> x(size_t{tokens} * dim);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(((i * 2654435761u) % 1000) / 500.0 - 1.0);
    req.mutable_page()->mutable_coordinates()->set_token_count(tokens);
    req.mutable_page()->set_data(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float));
    EXPECT_TRUE(stream->Write(req));
    EXPECT_TRUE(stream->WritesDone());
    std::string frame;
    v1::CompressPagesResponse out;
    while (stream->Read(&out)) {
      if (out.has_page()) frame = out.page().frame();
    }
    grpc::Status s = stream->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
    return frame;
  }
  std::vector<v1::Receipt> Receipts() {
    grpc::ClientContext ctx;
    v1::ListReceiptsRequest req;
    req.set_page_size(1000);
    v1::ListReceiptsResponse resp;
    EXPECT_TRUE(stub_->ListReceipts(&ctx, req, &resp).ok());
    return {resp.receipts().begin(), resp.receipts().end()};
  }

  std::string data_dir_;
  ServiceOptions options_;
  Metrics metrics_;
  std::unique_ptr<KvCompressionServiceImpl> svc_;
  std::unique_ptr<grpc::Server> server_;
  std::string target_;
  std::unique_ptr<v1::KvCompressionService::Stub> stub_;
};

// The budget and reaper counted what they did but /metrics did not show it. Every admission
// series exists from the start: 0, and the limit as configured (the tests below make them move).
TEST_F(HardenService, AdmissionMetricsExistFromTheStart) {
  options_.max_buffered_bytes = 40ull << 20;
  Start();
  auto port = metrics_.StartExposer("127.0.0.1:0");
  ASSERT_TRUE(port.ok()) << port.status();
  const std::string scraped = testing::HttpGet(*port, "/metrics");
  ASSERT_THAT(scraped, HasSubstr("200 OK"));
  EXPECT_EQ(SeriesValue(scraped, "fibquant_buffered_bytes"), 0.0) << scraped;
  EXPECT_EQ(SeriesValue(scraped, "fibquant_buffered_bytes_limit"), double(40ull << 20));
  EXPECT_EQ(SeriesValue(scraped, "fibquant_buffered_bytes_waits_total"), 0.0);
  EXPECT_EQ(SeriesValue(scraped, "fibquant_buffered_bytes_refusals_total"), 0.0);
  EXPECT_EQ(SeriesValue(scraped, "fibquant_streams_idle_reaped_total"), 0.0);
  EXPECT_THAT(scraped, HasSubstr("# TYPE fibquant_buffered_bytes_refusals_total counter"));
  EXPECT_THAT(scraped, HasSubstr("# TYPE fibquant_buffered_bytes gauge"));
  // Without a service they read 0 too (the source is cleared when the service goes away).
  stub_.reset();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server_->Wait();
  server_.reset();
  svc_.reset();
  EXPECT_EQ(SeriesValue(metrics_.Serialize(), "fibquant_buffered_bytes_limit"), 0.0);
}

// Issue 14 item 1: DecompressPages streams that never read held every decoded page (3 streams of
// 64 MiB pages: +1 GiB). Now the decoded bytes in flight never exceed --max-buffered-bytes; a
// stream whose page cannot be admitted (and has none of its own in flight to wait for) fails with
// RESOURCE_EXHAUSTED naming the flag, and everything is released when the streams end.
TEST_F(HardenService, DecodedBytesInFlightAreBoundedServerWide) {
  options_.max_buffered_bytes = 40ull << 20;  // three 12 MiB decode reservations fit, a fourth not
  options_.stream_idle_timeout_seconds = 0;
  Start();
  const std::string digest = Register(BigSpec());
  const std::string frame = CompressOne(digest, kBigDim, kBigDim);
  ASSERT_FALSE(frame.empty());
  ASSERT_LT(frame.size(), 4096u);  // ~1 KiB frame -> 4 MiB page

  constexpr int kStreams = 6, kFramesEach = 4;
  struct Hostile {
    std::unique_ptr<v1::KvCompressionService::Stub> stub;
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<v1::DecompressPagesRequest, v1::DecompressPagesResponse>> stream;
  };
  std::vector<std::unique_ptr<Hostile>> hostile;
  for (int i = 0; i < kStreams; ++i) {
    auto h = std::make_unique<Hostile>();
    h->stub = NewStub();
    h->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    h->stream = h->stub->DecompressPages(&h->ctx);
    v1::DecompressPagesRequest req;
    req.mutable_header()->set_output_dtype(v1::DTYPE_F32);
    ASSERT_TRUE(h->stream->Write(req));
    for (int f = 0; f < kFramesEach; ++f) {
      req.Clear();
      req.mutable_frame()->set_frame(frame);
      if (!h->stream->Write(req)) break;  // the server finished the stream
    }
    hostile.push_back(std::move(h));
  }
  // Let the server take what it will (it stops reading a stream whose page waits for room).
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_LE(svc_->peak_buffered_bytes(), options_.max_buffered_bytes);
  EXPECT_GT(svc_->peak_buffered_bytes(), 0u);
  // The admission metrics: the bytes held now (unread answers keep their pages), within the limit.
  const std::string held = metrics_.Serialize();
  EXPECT_GT(SeriesValue(held, "fibquant_buffered_bytes").value_or(-1), 0.0) << held;
  EXPECT_LE(SeriesValue(held, "fibquant_buffered_bytes").value_or(-1), double(options_.max_buffered_bytes));
  EXPECT_EQ(SeriesValue(held, "fibquant_buffered_bytes_limit"), double(options_.max_buffered_bytes));
  // Now read: streams that were refused report RESOURCE_EXHAUSTED naming the flag.
  int exhausted = 0, ok = 0;
  for (auto& h : hostile) {
    h->stream->WritesDone();
    v1::DecompressPagesResponse out;
    while (h->stream->Read(&out)) {
    }
    grpc::Status s = h->stream->Finish();
    if (s.ok()) {
      ++ok;
    } else {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
      EXPECT_THAT(s.error_message(), HasSubstr("--max-buffered-bytes"));
      ++exhausted;
    }
  }
  RecordProperty("peak_buffered_bytes", std::to_string(svc_->peak_buffered_bytes()));
  EXPECT_GE(exhausted, 1);
  EXPECT_GE(ok, 1);
  EXPECT_LE(svc_->peak_buffered_bytes(), options_.max_buffered_bytes);
  EXPECT_TRUE(WaitUntil([&] { return svc_->buffered_bytes() == 0 && svc_->open_streams() == 0; }));
  // Each refused stream is one refusal; pages of the streams that went on waited (every stream
  // sends 4 pages and 3 fill the budget, so at least one admitted stream's next page waited).
  const std::string after = metrics_.Serialize();
  EXPECT_EQ(SeriesValue(after, "fibquant_buffered_bytes_refusals_total"), double(exhausted)) << after;
  EXPECT_GE(SeriesValue(after, "fibquant_buffered_bytes_waits_total").value_or(-1), 1.0) << after;
  EXPECT_EQ(SeriesValue(after, "fibquant_buffered_bytes"), 0.0);
}

// Issue 14 item 2: a large unary answer counts against the same budget.
TEST_F(HardenService, GetCodebookAnswerCountsAgainstTheBudget) {
  options_.max_buffered_bytes = 1ull << 20;
  Start();
  // Haar d = 256: the rotation matrix alone is 512 KiB of doubles (x2 with its wire copy).
  const std::string digest = Register(
      R"({"profile_id":"harden.haar","shape":{"role":"key","attention_kind":"mha","batch":1,)"
      R"("layers":1,"kv_heads":1,"query_heads":1,"tokens":16,"head_dim":256,"dtype":"f32",)"
      R"("rope_state":"pre_rope"},"axis_policy":"per_token","tokens_per_page":16,)"
      R"("fibquant":{"block_dim":2,"codebook_size":16,"seed":7,"training_samples":512,)"
      R"("lloyd_restarts":1,"lloyd_iterations":2}})");
  v1::GetCodebookRequest req;
  req.set_digest(digest);
  v1::GetCodebookResponse resp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->GetCodebook(&ctx, req, &resp).ok());  // without the matrix: small
  }
  req.set_include_rotation_matrix(true);
  grpc::ClientContext ctx;
  grpc::Status s = stub_->GetCodebook(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("--max-buffered-bytes"));
  EXPECT_TRUE(WaitUntil([&] { return svc_->buffered_bytes() == 0; }));
  EXPECT_EQ(SeriesValue(metrics_.Serialize(), "fibquant_buffered_bytes_refusals_total"), 1.0);
}

// Issue 14 item 3: streams that send nothing, or only a header, held every stream slot for as
// long as their client stayed connected. Now they are cancelled after the idle timeout and a new
// client gets a slot.
TEST_F(HardenService, IdleAndHeaderOnlyStreamsAreReaped) {
  options_.max_concurrent_streams = 4;
  options_.stream_idle_timeout_seconds = 1;
  Start();
  const std::string digest = Register(SmallSpec("harden.idle"));
  struct Idle {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<v1::CompressPagesRequest, v1::CompressPagesResponse>> stream;
  };
  std::vector<std::unique_ptr<Idle>> idle;
  for (int i = 0; i < 4; ++i) {
    auto s = std::make_unique<Idle>();
    s->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    s->stream = stub_->CompressPages(&s->ctx);
    if (i % 2 == 0) {  // half of them send a header, the others nothing at all
      v1::CompressPagesRequest req;
      req.mutable_header()->set_profile_digest(digest);
      req.mutable_header()->set_input_dtype(v1::DTYPE_F32);
      ASSERT_TRUE(s->stream->Write(req));
    }
    idle.push_back(std::move(s));
  }
  ASSERT_TRUE(WaitUntil([&] { return svc_->open_streams() == 4 || svc_->idle_reaped() > 0; }));
  ASSERT_TRUE(WaitUntil([&] { return svc_->idle_reaped() >= 4 && svc_->open_streams() == 0; }))
      << "reaped " << svc_->idle_reaped() << ", open " << svc_->open_streams();
  for (auto& s : idle) {
    grpc::Status st = s->stream->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED) << st.error_message();
  }
  // Exported on /metrics (the scrape an operator's Prometheus makes).
  auto port = metrics_.StartExposer("127.0.0.1:0");
  ASSERT_TRUE(port.ok()) << port.status();
  const std::string scraped = testing::HttpGet(*port, "/metrics");
  EXPECT_EQ(SeriesValue(scraped, "fibquant_streams_idle_reaped_total"), double(svc_->idle_reaped())) << scraped;
  EXPECT_GE(SeriesValue(scraped, "fibquant_streams_idle_reaped_total").value_or(-1), 4.0);
  // A stream that works steadily is not reaped, and there is room for it.
  EXPECT_FALSE(CompressOne(digest, 16, 64).empty());
}

// Issue 14 item 5: streams that ended in a deadline or a client cancel sometimes got a stored
// receipt for their partial page count (a failed read was taken as a half-close).
TEST_F(HardenService, FailedStreamsStoreNoReceipt) {
  options_.stream_idle_timeout_seconds = 0;
  Start();
  const std::string digest = Register(SmallSpec("harden.fail"));
  const std::string frame = CompressOne(digest, 16, 64);
  const size_t before = Receipts().size();  // the one of CompressOne
  ASSERT_EQ(before, 1u);
  for (int i = 0; i < 24; ++i) {
    grpc::ClientContext ctx;
    const bool cancel = i % 2 == 0;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(cancel ? 60000 : 150 + 10 * i));
    auto stream = stub_->DecompressPages(&ctx);
    v1::DecompressPagesRequest req;
    req.mutable_header()->set_output_dtype(v1::DTYPE_F32);
    stream->Write(req);
    req.Clear();
    req.mutable_frame()->set_frame(frame);
    stream->Write(req);
    v1::DecompressPagesResponse out;
    stream->Read(&out);  // the page
    if (cancel) ctx.TryCancel();
    while (stream->Read(&out)) {
    }
    EXPECT_FALSE(stream->Finish().ok());
  }
  ASSERT_TRUE(WaitUntil([&] { return svc_->open_streams() == 0; }));
  EXPECT_EQ(Receipts().size(), before) << "a failed stream left a receipt";
}

// Issue 14 item 7: with --receipt-retention=50, 60 header-only streams evicted a real receipt.
TEST_F(HardenService, EmptyStreamsDoNotEvictReceipts) {
  options_.receipt_retention = 3;
  options_.stream_idle_timeout_seconds = 0;
  Start();
  const std::string digest = Register(SmallSpec("harden.empty"));
  CompressOne(digest, 16, 64);
  std::vector<v1::Receipt> r = Receipts();
  ASSERT_EQ(r.size(), 1u);
  const std::string real = r[0].receipt_id();
  for (int i = 0; i < 8; ++i) {
    grpc::ClientContext ctx;
    auto stream = stub_->DecompressPages(&ctx);
    v1::DecompressPagesRequest req;
    req.mutable_header()->set_output_dtype(v1::DTYPE_F32);
    ASSERT_TRUE(stream->Write(req));
    ASSERT_TRUE(stream->WritesDone());
    v1::DecompressPagesResponse out;
    ASSERT_TRUE(stream->Read(&out));
    ASSERT_TRUE(out.has_receipt());
    EXPECT_EQ(out.receipt().pages(), 0u);
    EXPECT_TRUE(out.receipt().receipt_id().empty());
    EXPECT_FALSE(out.receipt().persisted());
    EXPECT_TRUE(stream->Finish().ok());
  }
  grpc::ClientContext ctx;
  v1::GetReceiptRequest req;
  req.set_receipt_id(real);
  v1::GetReceiptResponse resp;
  grpc::Status s = stub_->GetReceipt(&ctx, req, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(Receipts().size(), 1u);
  EXPECT_TRUE(fs::exists(fs::path(data_dir_) / "receipts" / (real + ".json")));
}

// Issue 14 item 6 at the service: with frame keys, CompressPages returns sealed frames (and its
// frame_digest covers the sealed bytes), DecompressPages decodes them, and refuses with DATA_LOSS
// an unsealed frame, a frame sealed with another key, and a sealed frame changed and resealed
// (checksum recomputed) as an attacker without the key would.
TEST_F(HardenService, FrameKeysSealAndOnlySealedFramesDecode) {
  auto ring = KvFrameKeyRing::FromKeys({KvFrameKey{4, std::string(32, 'q')}});
  ASSERT_TRUE(ring.ok());
  auto shared = std::make_shared<const KvFrameKeyRing>(*std::move(ring));
  options_.frame_keys = [shared] { return shared; };
  Start();
  const std::string digest = Register(SmallSpec("harden.keys"));
  const std::string frame = CompressOne(digest, 16, 64);
  auto view = ParseKvFrame(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(frame.data()), frame.size()));
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_TRUE(view->header.authenticated());
  EXPECT_EQ(view->header.key_id, 4);
  auto decode = [&](const std::string& f) {
    grpc::ClientContext ctx;
    auto stream = stub_->DecompressPages(&ctx);
    v1::DecompressPagesRequest req;
    req.mutable_header()->set_output_dtype(v1::DTYPE_F32);
    stream->Write(req);
    req.Clear();
    req.mutable_frame()->set_frame(f);
    stream->Write(req);
    stream->WritesDone();
    v1::DecompressPagesResponse out;
    while (stream->Read(&out)) {
    }
    return stream->Finish();
  };
  EXPECT_TRUE(decode(frame).ok());
  auto reseal = [](std::string f) {
    const uint64_t sum = KvFrameChecksum(
        absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(f.data()), f.size() - kKvFrameChecksumBytes));
    for (int i = 0; i < 8; ++i) f[f.size() - 8 + i] = static_cast<char>((sum >> (8 * i)) & 0xFF);
    return f;
  };
  std::string changed = frame;
  changed[kKvFrameHeaderBytes + 5] ^= 0x10;  // a code byte
  auto other = KvFrameKeyRing::FromKeys({KvFrameKey{4, std::string(32, 'x')}});
  ASSERT_TRUE(other.ok());
  // The unsealed form of the same page: strip the flag, key id and tag.
  std::string plain = frame.substr(0, frame.size() - kKvFrameChecksumBytes - kKvFrameTagBytes) + std::string(8, '\0');
  plain[4] = 1;
  plain[6] = static_cast<char>(plain[6] & ~kKvFrameFlagAuthenticated);
  plain[10] = 0;
  plain[11] = 0;
  plain = reseal(plain);
  auto resealed_other = SealKvFrame(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(plain.data()), plain.size()), *other);
  ASSERT_TRUE(resealed_other.ok()) << resealed_other.status();
  for (const auto& [what, f] : std::vector<std::pair<std::string, std::string>>{
           {"changed and resealed", reseal(changed)}, {"unsealed", plain},
           {"sealed with another key", *resealed_other}}) {
    grpc::Status st = decode(f);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::DATA_LOSS) << what << ": " << st.error_message();
  }
}

constexpr char kAdmin[] = "harden-admin-token-0123456789";

// Issue 14 item 4: with an admin token, EvaluateQuality (no token needed) builds of cost near the
// limit delayed an admin's RegisterProfile by a minute, and a cancelled caller's build kept the
// pool for 27 s. Now unauthenticated builds have a tighter cost limit and a pool of their own, and
// a build stops when its only caller goes away.
absl::Status AdminOnly(const grpc::ServerContextBase& ctx) {
  auto it = ctx.client_metadata().find("authorization");
  if (it == ctx.client_metadata().end()) return absl::UnauthenticatedError("no token");
  return std::string(it->second.data(), it->second.size()) == std::string("Bearer ") + kAdmin
             ? absl::OkStatus()
             : absl::PermissionDeniedError("wrong token");
}

v1::EvaluateQualityRequest EvalRequest(const std::string& spec) {
  v1::EvaluateQualityRequest req;
  req.add_candidate_spec_jsons(spec);
  for (int i = 0; i < 64 * 16; ++i) req.add_keys(0.01f * static_cast<float>(i % 97) - 0.4f);
  return req;
}

TEST_F(HardenService, UnauthenticatedBuildsHaveATighterCostLimit) {
  options_.authorize_admin = AdminOnly;
  options_.max_unauthenticated_build_cost = 100'000'000;
  Start();
  const v1::EvaluateQualityRequest req =
      EvalRequest(SmallSpec("harden.big-eval", R"(,"training_samples":65536,"lloyd_iterations":40)"));
  {
    grpc::ClientContext ctx;
    v1::EvaluateQualityResponse resp;
    grpc::Status s = stub_->EvaluateQuality(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("--max-unauthenticated-build-cost"));
  }
  {  // the admin may evaluate it
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", std::string("Bearer ") + kAdmin);
    v1::EvaluateQualityResponse resp;
    grpc::Status s = stub_->EvaluateQuality(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
  }
}

TEST_F(HardenService, UnauthenticatedBuildsCannotStarveRegistrationAndStopWhenCancelled) {
  options_.authorize_admin = AdminOnly;
  // Limits lifted so that a build of 1024 x 100,000 Lloyd iterations is accepted: it would run for
  // hours unless cancellation stops it.
  options_.max_profile_build_cost = ~uint64_t{0};
  options_.max_unauthenticated_build_cost = ~uint64_t{0};
  Start();
  grpc::ClientContext slow_ctx;
  const v1::EvaluateQualityRequest slow = EvalRequest(
      SmallSpec("harden.slow-eval", R"(,"training_samples":4096,"lloyd_iterations":100000,"lloyd_restarts":1024)"));
  v1::EvaluateQualityResponse slow_resp;
  std::atomic<bool> slow_done{false};
  grpc::Status slow_status;
  auto slow_stub = NewStub();
  std::thread slow_thread([&] {
    slow_status = slow_stub->EvaluateQuality(&slow_ctx, slow, &slow_resp);
    slow_done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // let it reach its build
  // The admin's registration (a build of its own) does not wait for it.
  EXPECT_FALSE(Register(SmallSpec("harden.admin"), kAdmin).empty());
  EXPECT_FALSE(slow_done.load());
  // The caller goes away: its build stops, and the unauthenticated pool (one worker) serves the
  // next caller. Without cancellation the next call would wait hours for the worker; its deadline
  // bounds the wait.
  slow_ctx.TryCancel();
  slow_thread.join();
  EXPECT_EQ(slow_status.error_code(), grpc::StatusCode::CANCELLED);
  grpc::ClientContext next_ctx;
  next_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::EvaluateQualityResponse next_resp;
  grpc::Status ns = stub_->EvaluateQuality(
      &next_ctx, EvalRequest(SmallSpec("harden.next-eval", R"(,"training_samples":512,"lloyd_iterations":2)")),
      &next_resp);
  EXPECT_TRUE(ns.ok()) << ns.error_code() << " " << ns.error_message()
                       << " (the cancelled caller's build still holds the pool)";
}

}  // namespace
}  // namespace fibquant::server
