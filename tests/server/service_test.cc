// KvCompressionService over an in-process channel (no ports): every RPC, idempotent registration,
// exact error codes, single-flight builds (concurrent registrations of one spec build once; a failed
// build fails every waiter and is retried), the build pool beside the page pool and its bounds,
// stream ordering under a small worker pool, cancellation, restart from the data
// dir, quarantine of a corrupted registry file, and a compress -> decompress round trip on the real
// fixture tests/data/L1_k.f32 ([64 tokens, 4 heads, 128] f32).
#include <grpcpp/grpcpp.h>
#include <stdlib.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/metrics.h"
#include "server/service.h"
#include <nlohmann/json.hpp>

namespace fibquant::server {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::fibquant::v1;

constexpr uint32_t kTokens = 64, kHeads = 4, kDim = 128;

// A small key profile for the L1 fixture: 4 heads, 64 tokens, head_dim 128, pages of 16 tokens,
// k = 4, N = 16 (1 bit/coord), cheap training.
std::string SpecJson(const std::string& id, uint32_t codebook_size = 16, uint32_t tokens_per_page = 16,
                     uint32_t layers = 1, const std::string& extra = "") {
  return absl::StrCat(R"({"profile_id":")", id, R"(","shape":{"role":"key","attention_kind":"mha","batch":1,)",
                      R"("layers":)", layers, R"(,"kv_heads":4,"query_heads":4,"tokens":64,"head_dim":128,)",
                      R"("dtype":"f32","rope_state":"pre_rope"},"axis_policy":"per_token","tokens_per_page":)",
                      tokens_per_page, R"(,"fibquant":{"block_dim":4,"codebook_size":)", codebook_size,
                      R"(,"seed":7,"training_samples":512,"lloyd_restarts":1,"lloyd_iterations":3})", extra, "}");
}

// A key profile whose codebook build takes noticeable time (N = 256, 65536 training samples, 40
// Lloyd iterations: cost 2.7e9, about a second on one core), so other calls can arrive during it.
std::string SlowSpecJson(const std::string& id) {
  return absl::StrCat(R"({"profile_id":")", id, R"(","shape":{"role":"key","attention_kind":"mha","batch":1,)",
                      R"("layers":1,"kv_heads":4,"query_heads":4,"tokens":64,"head_dim":128,)",
                      R"("dtype":"f32","rope_state":"pre_rope"},"axis_policy":"per_token","tokens_per_page":16,)",
                      R"("fibquant":{"block_dim":4,"codebook_size":256,"seed":7,"training_samples":65536,)",
                      R"("lloyd_restarts":1,"lloyd_iterations":40}})");
}

// Waits until `done()` holds, up to 120 s (a hang bound, not a timing assertion).
template <typename Pred>
bool WaitUntil(Pred done) {
  for (int i = 0; i < 12000; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return done();
}

std::vector<float> ReadF32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

// Tokens [start, start+count) of one head of a [tokens, heads, dim] tensor, as [count, dim].
std::vector<float> HeadSlice(const std::vector<float>& t, uint32_t head, uint32_t start, uint32_t count) {
  std::vector<float> out(size_t{count} * kDim);
  for (uint32_t i = 0; i < count; ++i) {
    std::memcpy(&out[size_t{i} * kDim], &t[(size_t{start + i} * kHeads + head) * kDim], kDim * sizeof(float));
  }
  return out;
}

v1::RawPage MakePage(uint32_t layer, uint32_t head, uint32_t start, uint32_t count, const std::vector<float>& data,
                     uint64_t client_seq) {
  v1::RawPage p;
  auto* c = p.mutable_coordinates();
  c->set_layer(layer);
  c->set_kv_head(head);
  c->set_token_start(start);
  c->set_token_count(count);
  p.set_data(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float));
  p.set_client_sequence(client_seq);
  return p;
}

template <typename Resp>
struct StreamResult {
  grpc::Status status;
  std::vector<Resp> responses;
};

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "fq_service_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    data_dir_ = tmpl;
    options_.data_dir = data_dir_;
    options_.worker_threads = 2;
    options_.build_threads = 1;
  }
  void TearDown() override {
    StopServer();
    std::error_code ec;
    fs::remove_all(data_dir_, ec);
  }

  void StartServer() {
    auto svc = KvCompressionServiceImpl::Create(options_, &metrics_);
    ASSERT_TRUE(svc.ok()) << svc.status();
    svc_ = *std::move(svc);
    grpc::ServerBuilder builder;
    builder.RegisterService(svc_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::KvCompressionService::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }
  void StopServer() {
    stub_.reset();
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
      server_->Wait();
      server_.reset();
    }
    svc_.reset();
  }

  v1::RegisterProfileResponse Register(const std::string& spec, grpc::StatusCode want = grpc::StatusCode::OK) {
    grpc::ClientContext ctx;
    v1::RegisterProfileRequest req;
    req.set_spec_json(spec);
    v1::RegisterProfileResponse resp;
    grpc::Status s = stub_->RegisterProfile(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), want) << s.error_message();
    return resp;
  }

  // One RegisterProfile call on its own thread; a 120 s deadline bounds a hang.
  struct AsyncRegistration {
    std::thread thread;
    grpc::Status status;
    v1::RegisterProfileResponse resp;
  };
  void RegisterAsync(const std::string& spec, AsyncRegistration* out) {
    out->thread = std::thread([this, spec, out] {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      v1::RegisterProfileRequest req;
      req.set_spec_json(spec);
      out->status = stub_->RegisterProfile(&ctx, req, &out->resp);
    });
  }

  StreamResult<v1::CompressPagesResponse> Compress(const v1::CompressStreamHeader& header,
                                                   const std::vector<v1::RawPage>& pages, bool send_header = true,
                                                   std::chrono::seconds deadline = std::chrono::seconds(0)) {
    grpc::ClientContext ctx;
    if (deadline.count() > 0) ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    auto stream = stub_->CompressPages(&ctx);
    std::thread writer([&] {
      if (send_header) {
        v1::CompressPagesRequest r;
        *r.mutable_header() = header;
        if (!stream->Write(r)) return;
      }
      for (const auto& p : pages) {
        v1::CompressPagesRequest q;
        *q.mutable_page() = p;
        if (!stream->Write(q)) break;
      }
      stream->WritesDone();
    });
    StreamResult<v1::CompressPagesResponse> out;
    v1::CompressPagesResponse resp;
    while (stream->Read(&resp)) out.responses.push_back(resp);
    writer.join();
    out.status = stream->Finish();
    return out;
  }

  StreamResult<v1::DecompressPagesResponse> Decompress(v1::DType dtype, const std::vector<std::string>& frames,
                                                       const std::string& only_profile = "") {
    grpc::ClientContext ctx;
    auto stream = stub_->DecompressPages(&ctx);
    std::thread writer([&] {
      v1::DecompressPagesRequest r;
      r.mutable_header()->set_output_dtype(dtype);
      r.mutable_header()->set_profile_digest(only_profile);
      if (!stream->Write(r)) return;
      for (size_t i = 0; i < frames.size(); ++i) {
        v1::DecompressPagesRequest q;
        q.mutable_frame()->set_frame(frames[i]);
        q.mutable_frame()->set_client_sequence(i);
        if (!stream->Write(q)) break;
      }
      stream->WritesDone();
    });
    StreamResult<v1::DecompressPagesResponse> out;
    v1::DecompressPagesResponse resp;
    while (stream->Read(&resp)) out.responses.push_back(resp);
    writer.join();
    out.status = stream->Finish();
    return out;
  }

  // OnDone (which releases a stream) runs after the client already saw the status: wait for it, up
  // to 10 s (a bound, not a timing assertion).
  void WaitForNoOpenStreams() {
    for (int i = 0; i < 1000 && svc_->open_streams() != 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_EQ(svc_->open_streams(), 0u);
  }

  // All 16 pages (4 heads x 4 pages of 16 tokens) of the L1 key fixture, head-major.
  std::vector<v1::RawPage> FixturePages(const std::vector<float>& keys) {
    std::vector<v1::RawPage> pages;
    for (uint32_t h = 0; h < kHeads; ++h) {
      for (uint32_t s = 0; s < kTokens; s += 16) pages.push_back(MakePage(0, h, s, 16, HeadSlice(keys, h, s, 16), pages.size()));
    }
    return pages;
  }

  std::string data_dir_;
  ServiceOptions options_;
  Metrics metrics_;
  std::unique_ptr<KvCompressionServiceImpl> svc_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::KvCompressionService::Stub> stub_;
};

TEST_F(ServiceTest, RegisterIsIdempotentAndStructuredMatchesJson) {
  StartServer();
  auto first = Register(SpecJson("l1-keys"));
  ASSERT_EQ(first.profile().digest().rfind("sha256:", 0), 0u);
  EXPECT_FALSE(first.already_registered());
  EXPECT_EQ(first.profile().head_dim(), kDim);
  EXPECT_EQ(first.profile().block_dim(), 4u);
  EXPECT_EQ(first.profile().codebook_size(), 16u);
  EXPECT_FALSE(first.profile().profile_json().empty());
  EXPECT_GT(first.profile().build_stats().cost(), 0u);
  EXPECT_LE(first.profile().build_stats().training_mse(), first.profile().build_stats().init_mse() + 1e-12);

  auto again = Register(SpecJson("l1-keys"));
  EXPECT_TRUE(again.already_registered());
  EXPECT_EQ(again.profile().digest(), first.profile().digest());

  // The same spec in structured form gives the same digest.
  v1::RegisterProfileRequest req;
  v1::KvProfileSpec* s = req.mutable_structured();
  s->set_profile_id("l1-keys");
  s->mutable_shape()->set_role("key");
  s->mutable_shape()->set_layers(1);
  s->mutable_shape()->set_kv_heads(4);
  s->mutable_shape()->set_tokens(64);
  s->mutable_shape()->set_head_dim(128);
  s->set_axis_policy("per_token");
  s->mutable_page_geometry()->set_tokens_per_page(16);
  s->mutable_fibquant()->set_block_dim(4);
  s->mutable_fibquant()->set_codebook_size(16);
  s->mutable_fibquant()->set_seed(7);
  s->mutable_fibquant()->set_training_samples(512);
  s->mutable_fibquant()->set_lloyd_restarts(1);
  s->mutable_fibquant()->set_lloyd_iterations(3);
  grpc::ClientContext ctx;
  v1::RegisterProfileResponse resp;
  ASSERT_TRUE(stub_->RegisterProfile(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.profile().digest(), first.profile().digest());
  EXPECT_TRUE(resp.already_registered());
  EXPECT_EQ(svc_->profile_count(), 1u);
}

TEST_F(ServiceTest, GetProfileCodebookListAndServerInfo) {
  StartServer();
  std::vector<std::string> digests;
  for (uint32_t n : {16u, 32u, 64u}) digests.push_back(Register(SpecJson(absl::StrCat("p", n), n)).profile().digest());

  {
    grpc::ClientContext ctx;
    v1::GetProfileRequest req;
    req.set_digest(digests[1]);
    v1::GetProfileResponse resp;
    ASSERT_TRUE(stub_->GetProfile(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.profile().profile_id(), "p32");
  }
  {
    grpc::ClientContext ctx;
    v1::GetProfileRequest req;
    req.set_digest("sha256:" + std::string(64, '0'));
    v1::GetProfileResponse resp;
    EXPECT_EQ(stub_->GetProfile(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    v1::GetCodebookRequest req;
    req.set_digest(digests[0]);
    req.set_include_rotation_matrix(true);
    v1::GetCodebookResponse resp;
    ASSERT_TRUE(stub_->GetCodebook(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.codewords_size(), 16 * 4);
    EXPECT_EQ(resp.codebook_size(), 16u);
    EXPECT_EQ(resp.block_dim(), 4u);
    EXPECT_EQ(resp.rotation().dim(), kDim);
    EXPECT_EQ(resp.rotation().seed(), 7u);
    EXPECT_EQ(resp.rotation().matrix_size(), static_cast<int>(kDim * kDim));
    EXPECT_EQ(resp.rotation().digest().rfind("sha256:", 0), 0u);
    for (float c : resp.codewords()) EXPECT_TRUE(std::isfinite(c));
  }
  {
    grpc::ClientContext ctx;
    v1::GetCodebookRequest req;
    req.set_digest("sha256:" + std::string(64, 'a'));
    v1::GetCodebookResponse resp;
    EXPECT_EQ(stub_->GetCodebook(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // Pagination: 2 + 1, ordered by digest, no duplicates.
  std::vector<std::string> listed;
  std::string token;
  int pages = 0;
  do {
    grpc::ClientContext ctx;
    v1::ListProfilesRequest req;
    req.set_page_size(2);
    req.set_page_token(token);
    v1::ListProfilesResponse resp;
    ASSERT_TRUE(stub_->ListProfiles(&ctx, req, &resp).ok());
    for (const auto& p : resp.profiles()) listed.push_back(p.digest());
    token = resp.next_page_token();
    ++pages;
  } while (!token.empty() && pages < 10);
  EXPECT_EQ(pages, 2);
  std::sort(digests.begin(), digests.end());
  EXPECT_EQ(listed, digests);
  {
    grpc::ClientContext ctx;
    v1::ListProfilesRequest req;
    req.set_page_token("not-a-token");
    v1::ListProfilesResponse resp;
    EXPECT_EQ(stub_->ListProfiles(&ctx, req, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext ctx;
    v1::GetServerInfoResponse resp;
    ASSERT_TRUE(stub_->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &resp).ok());
    EXPECT_EQ(resp.registered_profiles(), 3u);
    EXPECT_EQ(resp.limits().max_inflight_pages_per_stream(), options_.max_inflight_pages_per_stream);
    EXPECT_EQ(resp.limits().worker_threads(), 2u);
    EXPECT_EQ(resp.limits().build_workers(), static_cast<uint32_t>(options_.build_workers));
    EXPECT_GE(resp.limits().build_threads(), 1u);
    EXPECT_EQ(resp.rotation_algorithms_size(), 2);
    EXPECT_FALSE(resp.frame_formats().empty());
  }
}

TEST_F(ServiceTest, MalformedAndOversizedRequestsGetExactCodesAndServerKeepsServing) {
  options_.max_profile_build_cost = 100'000'000;  // 512 x 16 x 4 x 3 x 1 fits; 30*4096 x 4096 ... does not
  options_.max_page_bytes = 16 * kDim * sizeof(float);  // exactly one 16-token f32 page
  StartServer();
  {
    grpc::ClientContext ctx;
    v1::RegisterProfileResponse resp;
    EXPECT_EQ(stub_->RegisterProfile(&ctx, v1::RegisterProfileRequest(), &resp).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  Register("{", grpc::StatusCode::INVALID_ARGUMENT);
  Register(R"({"profile_id":"x"})", grpc::StatusCode::INVALID_ARGUMENT);
  Register(SpecJson("typo", 16, 16, 1, R"(,"unknown_field":1)"), grpc::StatusCode::INVALID_ARGUMENT);
  {
    // Paper defaults for N = 4096 cost 30*4096 x 4096 x 4 x 25 x 4: refused before any work.
    grpc::ClientContext ctx;
    v1::RegisterProfileRequest req;
    req.set_spec_json(absl::StrCat(
        R"({"profile_id":"big","shape":{"role":"key","attention_kind":"mha","batch":1,"layers":1,"kv_heads":4,)",
        R"("query_heads":4,"tokens":64,"head_dim":128,"dtype":"f32","rope_state":"pre_rope"},)",
        R"("axis_policy":"per_token","tokens_per_page":16,"fibquant":{"block_dim":4,"codebook_size":4096,"seed":1}})"));
    v1::RegisterProfileResponse resp;
    grpc::Status s = stub_->RegisterProfile(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_NE(s.error_message().find("max_profile_build_cost"), std::string::npos) << s.error_message();
  }
  {
    // A Haar rotation costs head_dim^3 (512^3 = 1.3e8 > 1e8) even when the Lloyd term is tiny;
    // the same spec with a Hadamard rotation (512 x 9) fits.
    auto spec = [](const char* id, const char* rotation) {
      return absl::StrCat(
          R"({"profile_id":")", id, R"(","shape":{"role":"key","attention_kind":"mha","batch":1,"layers":1,)",
          R"("kv_heads":1,"query_heads":1,"tokens":16,"head_dim":512,"dtype":"f32","rope_state":"pre_rope"},)",
          R"("axis_policy":"per_token","tokens_per_page":16,"fibquant":{"block_dim":2,"codebook_size":16,)",
          R"("seed":1,"training_samples":256,"lloyd_restarts":1,"lloyd_iterations":2,"rotation_algorithm":")",
          rotation, R"("}})");
    };
    grpc::ClientContext ctx;
    v1::RegisterProfileRequest req;
    req.set_spec_json(spec("haar-512", "haar_qr"));
    v1::RegisterProfileResponse resp;
    grpc::Status s = stub_->RegisterProfile(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
    EXPECT_NE(s.error_message().find("at head_dim 512: 134217728 = head_dim^3"), std::string::npos)
        << s.error_message();
    EXPECT_EQ(svc_->profile_count(), 0u);
    const v1::RegisterProfileResponse ok = Register(spec("hadamard-512", "hadamard"));
    EXPECT_EQ(ok.profile().build_stats().cost(), 256u * 16 * 2 * 2 * 1 + 512 * 9);
    EXPECT_EQ(svc_->profile_count(), 1u);
  }
  const std::string digest = Register(SpecJson("ok")).profile().digest();
  const std::vector<float> page(16 * kDim, 0.5f);

  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  {  // unknown profile
    v1::CompressStreamHeader h = header;
    h.set_profile_digest("sha256:" + std::string(64, 'b'));
    EXPECT_EQ(Compress(h, {}).status.error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {  // no dtype
    v1::CompressStreamHeader h = header;
    h.set_input_dtype(v1::DTYPE_UNSPECIFIED);
    EXPECT_EQ(Compress(h, {}).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // first message is a page, not a header
    auto r = Compress(header, {MakePage(0, 0, 0, 16, page, 0)}, /*send_header=*/false);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // data size does not match the coordinates
    auto r = Compress(header, {MakePage(0, 0, 0, 8, page, 0)});
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
  }
  {  // page above max_page_bytes
    std::vector<float> big(17 * kDim, 0.5f);
    auto r = Compress(header, {MakePage(0, 0, 0, 17, big, 0)});
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_NE(r.status.error_message().find("max_page_bytes"), std::string::npos);
  }
  {  // layer outside the shape
    auto r = Compress(header, {MakePage(3, 0, 0, 16, page, 0)});
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::OUT_OF_RANGE) << r.status.error_message();
    EXPECT_NE(r.status.error_message().find("page 0"), std::string::npos);
  }
  {  // off the page grid
    auto r = Compress(header, {MakePage(0, 0, 5, 16, page, 0)});
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
  }
  {  // receipts and unknown ids
    grpc::ClientContext ctx;
    v1::GetReceiptRequest req;
    req.set_receipt_id("rcpt-999999999999");
    v1::GetReceiptResponse resp;
    EXPECT_EQ(stub_->GetReceipt(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    v1::ListReceiptsRequest req;
    req.set_page_token("x");
    v1::ListReceiptsResponse resp;
    EXPECT_EQ(stub_->ListReceipts(&ctx, req, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // a header and no pages: an empty receipt
    auto r = Compress(header, {});
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
    ASSERT_EQ(r.responses.size(), 1u);
    EXPECT_EQ(r.responses[0].receipt().pages(), 0u);
  }
  // Still serving: a good stream works.
  auto ok = Compress(header, {MakePage(0, 0, 0, 16, page, 0)});
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  ASSERT_EQ(ok.responses.size(), 2u);
  EXPECT_TRUE(ok.responses.back().has_receipt());
}

TEST_F(ServiceTest, CompressDecompressRoundTripOnRealFixture) {
  StartServer();
  const std::vector<float> keys = ReadF32(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32");
  ASSERT_EQ(keys.size(), size_t{kTokens} * kHeads * kDim);
  // k = 4, N = 256: 2 bits per coordinate.
  const std::string digest = Register(SpecJson("l1-keys-2bit", 256)).profile().digest();

  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  header.set_return_page_metrics(true);
  header.set_label("round-trip");
  const auto pages = FixturePages(keys);
  auto c = Compress(header, pages);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  ASSERT_EQ(c.responses.size(), pages.size() + 1);
  std::vector<std::string> frames;
  uint64_t frame_bytes = 0;
  for (size_t i = 0; i < pages.size(); ++i) {
    ASSERT_TRUE(c.responses[i].has_page());
    const auto& p = c.responses[i].page();
    EXPECT_EQ(p.sequence(), i);
    EXPECT_EQ(p.client_sequence(), i);
    EXPECT_EQ(p.coordinates().kv_head(), pages[i].coordinates().kv_head());
    EXPECT_EQ(p.coordinates().token_start(), pages[i].coordinates().token_start());
    EXPECT_GT(p.metrics().cosine_similarity(), 0.8);
    EXPECT_EQ(p.metrics().compressed_vectors() + p.metrics().raw_vectors(), 16u);
    frames.push_back(p.frame());
    frame_bytes += p.frame().size();
  }
  ASSERT_TRUE(c.responses.back().has_receipt());
  const v1::Receipt receipt = c.responses.back().receipt();
  EXPECT_EQ(receipt.operation(), "compress");
  EXPECT_EQ(receipt.pages(), pages.size());
  EXPECT_EQ(receipt.input_bytes(), keys.size() * sizeof(float));
  EXPECT_EQ(receipt.output_bytes(), frame_bytes);
  EXPECT_GT(receipt.compression_ratio(), 4.0);  // 2 bits/coord plus norms and frame headers
  EXPECT_EQ(receipt.label(), "round-trip");
  EXPECT_EQ(receipt.receipt_digest().rfind("sha256:", 0), 0u);
  EXPECT_TRUE(receipt.persisted());
  std::printf("L1_k: %zu pages, %llu -> %llu bytes, ratio %.2f\n", pages.size(),
              static_cast<unsigned long long>(receipt.input_bytes()),
              static_cast<unsigned long long>(receipt.output_bytes()), receipt.compression_ratio());
  {
    grpc::ClientContext ctx;
    v1::GetReceiptRequest req;
    req.set_receipt_id(receipt.receipt_id());
    v1::GetReceiptResponse resp;
    ASSERT_TRUE(stub_->GetReceipt(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.receipt().receipt_digest(), receipt.receipt_digest());
  }

  auto d = Decompress(v1::DTYPE_F32, frames);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  ASSERT_EQ(d.responses.size(), frames.size() + 1);
  double err = 0, energy = 0, dot = 0, hat_energy = 0;
  for (size_t i = 0; i < frames.size(); ++i) {
    const auto& p = d.responses[i].page();
    EXPECT_EQ(p.sequence(), i);
    EXPECT_EQ(p.profile_digest(), digest);
    ASSERT_EQ(p.data().size(), pages[i].data().size());
    const float* x = reinterpret_cast<const float*>(pages[i].data().data());
    const float* y = reinterpret_cast<const float*>(p.data().data());
    for (size_t j = 0; j < 16 * kDim; ++j) {
      err += (x[j] - y[j]) * (x[j] - y[j]);
      energy += x[j] * x[j];
      dot += x[j] * y[j];
      hat_energy += y[j] * y[j];
    }
  }
  const double cosine = dot / std::sqrt(energy * hat_energy);
  std::printf("L1_k round trip: relative MSE %.4f, cosine %.4f\n", err / energy, cosine);
  EXPECT_GT(cosine, 0.9);
  EXPECT_LT(err / energy, 0.2);
  ASSERT_TRUE(d.responses.back().has_receipt());
  EXPECT_EQ(d.responses.back().receipt().operation(), "decompress");
  EXPECT_EQ(d.responses.back().receipt().pages(), frames.size());

  // f16 output: half the bytes.
  auto h = Decompress(v1::DTYPE_F16, {frames[0]});
  ASSERT_TRUE(h.status.ok()) << h.status.error_message();
  EXPECT_EQ(h.responses[0].page().data().size(), 16 * kDim * 2);

  // A corrupted frame fails the stream with DATA_LOSS naming the page.
  std::string bad = frames[1];
  bad[bad.size() / 2] ^= 0x40;
  auto b = Decompress(v1::DTYPE_F32, {frames[0], bad, frames[2]});
  EXPECT_EQ(b.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_NE(b.status.error_message().find("page 1"), std::string::npos) << b.status.error_message();
  auto t = Decompress(v1::DTYPE_F32, {frames[0].substr(0, 40)});
  EXPECT_EQ(t.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_NE(t.status.error_message().find("page 0"), std::string::npos);
}

// Any head_dim through the service: head_dim 100 (the real keys' first 100 channels) with k = 3 and a
// Hadamard rotation: vectors padded to 102 coordinates, two-window Hadamard (P = 64), 34 indices of
// 6 bits = 26 index bytes + 2 norm bytes per vector.
TEST_F(ServiceTest, HeadDimThatIsNotAPowerOfTwoNorAMultipleOfBlockDim) {
  StartServer();
  constexpr uint32_t kCut = 100;
  const std::vector<float> keys = ReadF32(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32");
  ASSERT_EQ(keys.size(), size_t{kTokens} * kHeads * kDim);
  const std::string spec = absl::StrCat(
      R"({"profile_id":"l1-keys-d100","shape":{"role":"key","attention_kind":"mha","batch":1,"layers":1,)",
      R"("kv_heads":4,"query_heads":4,"tokens":64,"head_dim":100,"dtype":"f32","rope_state":"pre_rope"},)",
      R"("axis_policy":"per_token","tokens_per_page":16,"fibquant":{"block_dim":3,"codebook_size":64,)",
      R"("seed":7,"rotation_algorithm":"hadamard","training_samples":4096,"lloyd_restarts":1,"lloyd_iterations":6}})");
  const auto reg = Register(spec);
  const std::string digest = reg.profile().digest();
  ASSERT_EQ(digest.rfind("sha256:", 0), 0u) << reg.DebugString();
  {
    grpc::ClientContext ctx;
    v1::GetCodebookRequest req;
    req.set_digest(digest);
    v1::GetCodebookResponse resp;
    ASSERT_TRUE(stub_->GetCodebook(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.rotation().dim(), 102u);
    EXPECT_EQ(resp.rotation().signs_size(), 6 * 102);  // two windows
    EXPECT_EQ(resp.block_dim(), 3u);
  }
  std::vector<v1::RawPage> pages;
  std::vector<std::vector<float>> cut;
  for (uint32_t h = 0; h < kHeads; ++h) {
    for (uint32_t s = 0; s < kTokens; s += 16) {
      const std::vector<float> full = HeadSlice(keys, h, s, 16);
      std::vector<float> c(size_t{16} * kCut);
      for (size_t t = 0; t < 16; ++t) std::memcpy(&c[t * kCut], &full[t * kDim], kCut * sizeof(float));
      pages.push_back(MakePage(0, h, s, 16, c, pages.size()));
      cut.push_back(std::move(c));
    }
  }
  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  auto c = Compress(header, pages);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  std::vector<std::string> frames;
  for (size_t i = 0; i < pages.size(); ++i) frames.push_back(c.responses[i].page().frame());
  auto d = Decompress(v1::DTYPE_F32, frames);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  double dot = 0, xx = 0, yy = 0;
  for (size_t i = 0; i < frames.size(); ++i) {
    const std::string& out = d.responses[i].page().data();
    ASSERT_EQ(out.size(), size_t{16} * kCut * sizeof(float));
    const float* y = reinterpret_cast<const float*>(out.data());
    for (size_t j = 0; j < size_t{16} * kCut; ++j) {
      dot += double(cut[i][j]) * y[j];
      xx += double(cut[i][j]) * cut[i][j];
      yy += double(y[j]) * y[j];
    }
  }
  const double cosine = dot / std::sqrt(xx * yy);
  const v1::Receipt receipt = c.responses.back().receipt();
  std::printf("head_dim 100, k=3, N=64, hadamard: ratio %.2f, cosine %.4f\n", receipt.compression_ratio(),
              cosine);
  EXPECT_GT(cosine, 0.9);  // 2 bits per stored coordinate
  // 400 input bytes per vector against 28 code bytes plus the frame header: well above 10x.
  EXPECT_GT(receipt.compression_ratio(), 10.0);
}

// Prints stream throughput on the real fixture (a figure for the report, not an assertion).
TEST_F(ServiceTest, ReportsStreamThroughput) {
  options_.worker_threads = 2;
  options_.max_inflight_pages_per_stream = 8;
  StartServer();
  const std::vector<float> keys = ReadF32(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32");
  const std::string digest = Register(SpecJson("throughput", 256)).profile().digest();
  std::vector<v1::RawPage> pages;
  for (int rep = 0; rep < 40; ++rep) {
    for (const auto& p : FixturePages(keys)) pages.push_back(p);
  }
  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  const auto t0 = std::chrono::steady_clock::now();
  auto c = Compress(header, pages);
  const double tc = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  std::vector<std::string> frames;
  for (size_t i = 0; i + 1 < c.responses.size(); ++i) frames.push_back(c.responses[i].page().frame());
  const auto t1 = std::chrono::steady_clock::now();
  auto d = Decompress(v1::DTYPE_F32, frames);
  const double td = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  const double mib = static_cast<double>(pages.size()) * 16 * kDim * sizeof(float) / (1 << 20);
  std::printf("throughput (2 workers, window 8, in-process, k=4 N=256, 16x128 f32 pages): %zu pages, "
              "%.1f MiB raw; compress %.0f pages/s %.1f MiB/s; decompress %.0f pages/s %.1f MiB/s\n",
              pages.size(), mib, pages.size() / tc, mib / tc, pages.size() / td, mib / td);
}

TEST_F(ServiceTest, OutputKeepsInputOrderUnderConcurrentSmallPool) {
  options_.worker_threads = 2;
  options_.max_inflight_pages_per_stream = 8;
  StartServer();
  // 4 layers x 4 heads x 16 pages of 4 tokens = 256 pages.
  const std::string digest = Register(SpecJson("many", 16, 4, 4)).profile().digest();
  std::mt19937 rng(123);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<v1::RawPage> pages;
  for (uint32_t l = 0; l < 4; ++l) {
    for (uint32_t h = 0; h < 4; ++h) {
      for (uint32_t s = 0; s < kTokens; s += 4) {
        std::vector<float> data(4 * kDim);
        for (float& v : data) v = normal(rng);
        pages.push_back(MakePage(l, h, s, 4, data, 1000 + pages.size()));
      }
    }
  }
  // Shuffle the order pages are sent in: the output must follow the input order, whatever it is.
  std::shuffle(pages.begin(), pages.end(), rng);
  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  auto r = Compress(header, pages);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_EQ(r.responses.size(), pages.size() + 1);
  for (size_t i = 0; i < pages.size(); ++i) {
    const auto& p = r.responses[i].page();
    ASSERT_EQ(p.sequence(), i);
    EXPECT_EQ(p.client_sequence(), pages[i].client_sequence());
    EXPECT_EQ(p.coordinates().layer(), pages[i].coordinates().layer());
    EXPECT_EQ(p.coordinates().kv_head(), pages[i].coordinates().kv_head());
    EXPECT_EQ(p.coordinates().token_start(), pages[i].coordinates().token_start());
  }
  EXPECT_EQ(r.responses.back().receipt().pages(), pages.size());
}

TEST_F(ServiceTest, ConcurrentStreamsEachKeepTheirOrder) {
  options_.worker_threads = 2;
  options_.max_inflight_pages_per_stream = 3;
  StartServer();
  const std::string digest = Register(SpecJson("multi", 16, 4, 4)).profile().digest();
  constexpr int kStreams = 4;
  std::vector<std::vector<v1::RawPage>> inputs(kStreams);
  std::vector<StreamResult<v1::CompressPagesResponse>> outputs(kStreams);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int i = 0; i < kStreams; ++i) {
    for (uint32_t l = 0; l < 4; ++l) {
      for (uint32_t s = 0; s < kTokens; s += 4) {
        std::vector<float> data(4 * kDim);
        for (float& v : data) v = normal(rng);
        inputs[i].push_back(MakePage(l, static_cast<uint32_t>(i), s, 4, data, inputs[i].size()));
      }
    }
    std::shuffle(inputs[i].begin(), inputs[i].end(), rng);
  }
  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  std::vector<std::thread> clients;
  for (int i = 0; i < kStreams; ++i) {
    clients.emplace_back([&, i] { outputs[i] = Compress(header, inputs[i]); });
  }
  for (auto& t : clients) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(outputs[i].status.ok()) << outputs[i].status.error_message();
    ASSERT_EQ(outputs[i].responses.size(), inputs[i].size() + 1);
    for (size_t j = 0; j < inputs[i].size(); ++j) {
      EXPECT_EQ(outputs[i].responses[j].page().sequence(), j);
      EXPECT_EQ(outputs[i].responses[j].page().client_sequence(), inputs[i][j].client_sequence());
      EXPECT_EQ(outputs[i].responses[j].page().coordinates().kv_head(), static_cast<uint32_t>(i));
    }
    EXPECT_EQ(outputs[i].responses.back().receipt().pages(), inputs[i].size());
  }
  WaitForNoOpenStreams();
}

TEST_F(ServiceTest, CancelMidStreamFreesTheStream) {
  options_.max_inflight_pages_per_stream = 2;
  StartServer();
  const std::string digest = Register(SpecJson("cancel")).profile().digest();
  const std::vector<float> page(16 * kDim, 0.25f);
  {
    grpc::ClientContext ctx;
    auto stream = stub_->CompressPages(&ctx);
    v1::CompressPagesRequest r;
    r.mutable_header()->set_profile_digest(digest);
    r.mutable_header()->set_input_dtype(v1::DTYPE_F32);
    ASSERT_TRUE(stream->Write(r));
    // Two pages fill the window; writing more before reading would block this thread (the
    // in-process transport has no buffer: the server reads again only after a write completes).
    for (uint32_t s = 0; s < 2; ++s) {
      v1::CompressPagesRequest q;
      *q.mutable_page() = MakePage(0, 0, s * 16, 16, page, s);
      ASSERT_TRUE(stream->Write(q));
    }
    v1::CompressPagesResponse resp;
    ASSERT_TRUE(stream->Read(&resp));  // the server is working on this stream
    EXPECT_EQ(svc_->open_streams(), 1u);
    ctx.TryCancel();
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The reactor is freed once OnDone ran and its tasks finished (bounded wait, not a timing check).
  WaitForNoOpenStreams();
  // Nothing was stored for the cancelled stream, and the server still serves.
  grpc::ClientContext ctx;
  v1::ListReceiptsResponse resp;
  ASSERT_TRUE(stub_->ListReceipts(&ctx, v1::ListReceiptsRequest(), &resp).ok());
  EXPECT_EQ(resp.receipts_size(), 0);
  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  EXPECT_TRUE(Compress(header, {MakePage(0, 0, 0, 16, page, 0)}).status.ok());
}

TEST_F(ServiceTest, ExpiredStreamIsFreed) {
  StartServer();
  const std::string digest = Register(SpecJson("expire")).profile().digest();
  const std::vector<float> page(16 * kDim, 0.25f);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    auto stream = stub_->CompressPages(&ctx);
    v1::CompressPagesRequest r;
    r.mutable_header()->set_profile_digest(digest);
    r.mutable_header()->set_input_dtype(v1::DTYPE_F32);
    ASSERT_TRUE(stream->Write(r));
    v1::CompressPagesRequest q;
    *q.mutable_page() = MakePage(0, 0, 0, 16, page, 0);
    ASSERT_TRUE(stream->Write(q));
    v1::CompressPagesResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    // The client never half-closes: the deadline ends the stream.
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  WaitForNoOpenStreams();
}

TEST_F(ServiceTest, ConcurrentStreamLimitIsResourceExhausted) {
  options_.max_concurrent_streams = 1;
  StartServer();
  const std::string digest = Register(SpecJson("limit")).profile().digest();
  const std::vector<float> page(16 * kDim, 0.25f);
  grpc::ClientContext ctx;
  auto stream = stub_->CompressPages(&ctx);
  v1::CompressPagesRequest r;
  r.mutable_header()->set_profile_digest(digest);
  r.mutable_header()->set_input_dtype(v1::DTYPE_F32);
  ASSERT_TRUE(stream->Write(r));
  v1::CompressPagesRequest q;
  *q.mutable_page() = MakePage(0, 0, 0, 16, page, 0);
  ASSERT_TRUE(stream->Write(q));
  v1::CompressPagesResponse resp;
  ASSERT_TRUE(stream->Read(&resp));  // stream 1 is open on the server
  v1::CompressStreamHeader header = r.header();
  auto second = Compress(header, {});
  EXPECT_EQ(second.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(second.status.error_message().find("max_concurrent_streams"), std::string::npos);
  stream->WritesDone();
  while (stream->Read(&resp)) {
  }
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ServiceTest, RestartRestoresProfilesAndReceipts) {
  StartServer();
  const std::vector<float> keys = ReadF32(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32");
  const auto reg = Register(SpecJson("persist"));
  const std::string digest = reg.profile().digest();
  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  auto c = Compress(header, FixturePages(keys));
  ASSERT_TRUE(c.status.ok());
  const v1::Receipt receipt = c.responses.back().receipt();
  std::vector<std::string> frames;
  for (size_t i = 0; i + 1 < c.responses.size(); ++i) frames.push_back(c.responses[i].page().frame());
  StopServer();

  StartServer();
  EXPECT_EQ(svc_->profile_count(), 1u);
  {
    grpc::ClientContext ctx;
    v1::GetProfileRequest req;
    req.set_digest(digest);
    v1::GetProfileResponse resp;
    ASSERT_TRUE(stub_->GetProfile(&ctx, req, &resp).ok());
    EXPECT_TRUE(resp.profile().build_stats().loaded_from_disk());
    EXPECT_EQ(resp.profile().codebook_digest(), reg.profile().codebook_digest());
  }
  {
    grpc::ClientContext ctx;
    v1::GetReceiptRequest req;
    req.set_receipt_id(receipt.receipt_id());
    v1::GetReceiptResponse resp;
    ASSERT_TRUE(stub_->GetReceipt(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.receipt().receipt_digest(), receipt.receipt_digest());
  }
  // Registering the same spec is recognised without a rebuild; old frames still decode.
  EXPECT_TRUE(Register(SpecJson("persist")).already_registered());
  auto d = Decompress(v1::DTYPE_F32, frames);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.responses.size(), frames.size() + 1);
  {  // ListReceipts: newest first, filtered by profile.
    grpc::ClientContext ctx;
    v1::ListReceiptsRequest req;
    req.set_profile_digest(digest);
    req.set_page_size(1);
    v1::ListReceiptsResponse resp;
    ASSERT_TRUE(stub_->ListReceipts(&ctx, req, &resp).ok());
    ASSERT_EQ(resp.receipts_size(), 1);
    EXPECT_EQ(resp.receipts(0).operation(), "decompress");
    EXPECT_FALSE(resp.next_page_token().empty());
  }
}

TEST_F(ServiceTest, ReceiptRetentionDropsOldest) {
  options_.receipt_retention = 2;
  StartServer();
  const std::string digest = Register(SpecJson("retain")).profile().digest();
  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  const std::vector<float> page(16 * kDim, 0.25f);
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(Compress(header, {MakePage(0, 0, 0, 16, page, 0)}).responses.back().receipt().receipt_id());
  grpc::ClientContext ctx;
  v1::GetReceiptRequest req;
  req.set_receipt_id(ids[0]);
  v1::GetReceiptResponse resp;
  EXPECT_EQ(stub_->GetReceipt(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  size_t files = 0;
  for (auto& e : fs::directory_iterator(fs::path(data_dir_) / "receipts")) files += e.path().extension() == ".json";
  EXPECT_EQ(files, 2u);
}

TEST_F(ServiceTest, UnwritableReceiptIsKeptInMemoryAndTheStreamSucceeds) {
  StartServer();
  const std::string digest = Register(SpecJson("disk")).profile().digest();
  // Replace receipts/ by a plain file: every receipt write now fails, even for root.
  fs::remove_all(fs::path(data_dir_) / "receipts");
  std::ofstream(fs::path(data_dir_) / "receipts") << "not a directory";
  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  const std::vector<float> page(16 * kDim, 0.25f);
  auto r = Compress(header, {MakePage(0, 0, 0, 16, page, 0)});
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const v1::Receipt receipt = r.responses.back().receipt();
  EXPECT_FALSE(receipt.persisted());
  grpc::ClientContext ctx;
  v1::GetReceiptRequest req;
  req.set_receipt_id(receipt.receipt_id());
  v1::GetReceiptResponse resp;
  ASSERT_TRUE(stub_->GetReceipt(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.receipt().receipt_digest(), receipt.receipt_digest());
}

TEST_F(ServiceTest, ReceiptsPaginateNewestFirst) {
  StartServer();
  const std::string a = Register(SpecJson("a")).profile().digest();
  const std::string b = Register(SpecJson("b", 32)).profile().digest();
  const std::vector<float> page(16 * kDim, 0.25f);
  std::vector<std::string> ids;
  for (const std::string& d : {a, b, a}) {
    v1::CompressStreamHeader header;
    header.set_profile_digest(d);
    header.set_input_dtype(v1::DTYPE_F32);
    ids.push_back(Compress(header, {MakePage(0, 0, 0, 16, page, 0)}).responses.back().receipt().receipt_id());
  }
  std::vector<std::string> listed;
  std::string token;
  do {
    grpc::ClientContext ctx;
    v1::ListReceiptsRequest req;
    req.set_page_size(2);
    req.set_page_token(token);
    v1::ListReceiptsResponse resp;
    ASSERT_TRUE(stub_->ListReceipts(&ctx, req, &resp).ok());
    for (const auto& r : resp.receipts()) listed.push_back(r.receipt_id());
    token = resp.next_page_token();
  } while (!token.empty() && listed.size() < 10);
  EXPECT_EQ(listed, (std::vector<std::string>{ids[2], ids[1], ids[0]}));
  grpc::ClientContext ctx;
  v1::ListReceiptsRequest req;
  req.set_profile_digest(a);
  v1::ListReceiptsResponse resp;
  ASSERT_TRUE(stub_->ListReceipts(&ctx, req, &resp).ok());
  ASSERT_EQ(resp.receipts_size(), 2);
  EXPECT_EQ(resp.receipts(0).receipt_id(), ids[2]);
}

TEST_F(ServiceTest, DecompressRejectsFramesOfUnknownOrOtherProfiles) {
  StartServer();
  const std::string a = Register(SpecJson("a")).profile().digest();
  const std::string b = Register(SpecJson("b", 32)).profile().digest();
  const std::vector<float> page(16 * kDim, 0.25f);
  v1::CompressStreamHeader header;
  header.set_profile_digest(a);
  header.set_input_dtype(v1::DTYPE_F32);
  auto c = Compress(header, {MakePage(0, 1, 16, 16, page, 0)});
  ASSERT_TRUE(c.status.ok());
  const std::string frame = c.responses[0].page().frame();
  auto other = Decompress(v1::DTYPE_F32, {frame}, b);
  EXPECT_EQ(other.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(other.status.error_message().find("page 0"), std::string::npos);
  auto unknown_header = Decompress(v1::DTYPE_F32, {frame}, "sha256:" + std::string(64, 'e'));
  EXPECT_EQ(unknown_header.status.error_code(), grpc::StatusCode::NOT_FOUND);
  auto no_dtype = Decompress(v1::DTYPE_UNSPECIFIED, {frame});
  EXPECT_EQ(no_dtype.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // A server that does not know the profile answers NOT_FOUND naming the page.
  StopServer();
  fs::remove_all(fs::path(data_dir_) / "profiles");
  StartServer();
  auto gone = Decompress(v1::DTYPE_F32, {frame});
  EXPECT_EQ(gone.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(gone.status.error_message().find("page 0"), std::string::npos);
}

// Regression (registry_fuzz): integer fields of a registry file holding a number the target type
// cannot represent were converted with a plain cast, undefined for a float beyond the range (UBSan
// aborted on "seed": 1.94e19). Each such file must be quarantined as DataLoss like any damage.
TEST_F(ServiceTest, OutOfRangeNumbersInRegistryFilesAreQuarantined) {
  StartServer();
  const std::string a = Register(SpecJson("range-a", 16)).profile().digest();
  const std::string b = Register(SpecJson("range-b", 32)).profile().digest();
  const std::string c = Register(SpecJson("range-c", 48)).profile().digest();
  StopServer();
  auto edit = [&](const std::string& digest, const std::function<void(nlohmann::json&)>& f) {
    const fs::path file = fs::path(data_dir_) / "profiles" / (digest.substr(7) + ".json");
    ASSERT_TRUE(fs::exists(file)) << file;
    std::ifstream in(file);
    nlohmann::json j = nlohmann::json::parse(in);
    in.close();
    f(j);
    std::ofstream(file) << j.dump();
  };
  edit(a, [](nlohmann::json& j) { j["codebook"]["report"]["seed"] = 1.9400714819323198e19; });  // float > 2^64
  edit(b, [](nlohmann::json& j) { j["registered_unix_seconds"] = 1e300; });
  edit(c, [](nlohmann::json& j) { j["codebook"]["report"]["restarts"] = -1; });
  StartServer();
  EXPECT_EQ(svc_->profile_count(), 0u);
  size_t quarantined = 0;
  for (auto& e : fs::directory_iterator(fs::path(data_dir_) / "quarantine")) {
    (void)e;
    ++quarantined;
  }
  EXPECT_EQ(quarantined, 3u);
  grpc::ClientContext ctx;
  v1::GetProfileRequest req;
  req.set_digest(a);
  v1::GetProfileResponse resp;
  EXPECT_EQ(stub_->GetProfile(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServiceTest, CorruptedRegistryFileIsQuarantinedAndServerStarts) {
  StartServer();
  const std::string good = Register(SpecJson("good", 16)).profile().digest();
  const std::string bad = Register(SpecJson("bad", 32)).profile().digest();
  v1::CompressStreamHeader header;
  header.set_profile_digest(good);
  header.set_input_dtype(v1::DTYPE_F32);
  const std::vector<float> page(16 * kDim, 0.25f);
  const std::string receipt_id =
      Compress(header, {MakePage(0, 0, 0, 16, page, 0)}).responses.back().receipt().receipt_id();
  StopServer();
  {  // Tamper with the receipt body: its checksum no longer matches.
    const fs::path rfile = fs::path(data_dir_) / "receipts" / (receipt_id + ".json");
    std::ifstream rin(rfile);
    nlohmann::json r = nlohmann::json::parse(rin);
    rin.close();
    std::string body = r["receipt"];
    body.replace(body.find("\"pages\""), 7, "\"Pages\"");
    r["receipt"] = body;
    std::ofstream(rfile) << r.dump();
  }
  // Tamper with one codeword of the "bad" profile: the file still parses, the digest must catch it.
  const fs::path file = fs::path(data_dir_) / "profiles" / (bad.substr(7) + ".json");
  ASSERT_TRUE(fs::exists(file));
  std::ifstream in(file);
  nlohmann::json j = nlohmann::json::parse(in);
  in.close();
  std::string hex = j["codebook"]["codewords_f32le_hex"];
  hex[1] = hex[1] == '0' ? '1' : '0';
  j["codebook"]["codewords_f32le_hex"] = hex;
  std::ofstream(file) << j.dump();
  // And a file that is not JSON at all.
  std::ofstream(fs::path(data_dir_) / "profiles" / (std::string(64, 'c') + ".json")) << "{not json";

  StartServer();
  EXPECT_EQ(svc_->profile_count(), 1u);
  grpc::ClientContext ctx;
  v1::GetProfileRequest req;
  req.set_digest(bad);
  v1::GetProfileResponse resp;
  EXPECT_EQ(stub_->GetProfile(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  size_t quarantined = 0;
  for (auto& e : fs::directory_iterator(fs::path(data_dir_) / "quarantine")) {
    (void)e;
    ++quarantined;
  }
  EXPECT_EQ(quarantined, 3u);
  EXPECT_FALSE(fs::exists(file));
  {
    grpc::ClientContext rctx;
    v1::GetReceiptRequest rreq;
    rreq.set_receipt_id(receipt_id);
    v1::GetReceiptResponse rresp;
    EXPECT_EQ(stub_->GetReceipt(&rctx, rreq, &rresp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  EXPECT_NE(metrics_.Serialize().find("quarantine"), std::string::npos);
  // The good profile serves, and the bad spec can be registered again (rebuilt, same digest).
  grpc::ClientContext ctx2;
  req.set_digest(good);
  EXPECT_TRUE(stub_->GetProfile(&ctx2, req, &resp).ok());
  EXPECT_EQ(Register(SpecJson("bad", 32)).profile().digest(), bad);
}

TEST_F(ServiceTest, EvaluateQualityStoresNothing) {
  StartServer();
  const std::vector<float> keys = ReadF32(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32");
  const std::vector<float> queries = ReadF32(std::string(FQ_TEST_DATA_DIR) + "/L1_q.f32");
  const std::string digest = Register(SpecJson("eval")).profile().digest();
  v1::EvaluateQualityRequest req;
  req.add_profile_digests(digest);
  req.add_candidate_spec_jsons(SpecJson("candidate-n256", 256));
  const auto k = HeadSlice(keys, 0, 0, kTokens);
  const auto q = HeadSlice(queries, 0, 0, 8);
  req.mutable_keys()->Assign(k.begin(), k.end());
  req.mutable_queries()->Assign(q.begin(), q.end());
  grpc::ClientContext ctx;
  v1::EvaluateQualityResponse resp;
  grpc::Status s = stub_->EvaluateQuality(&ctx, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(resp.reports_size(), 2);
  EXPECT_EQ(resp.reports(0).profile_digest(), digest);
  for (const auto& r : resp.reports()) {
    EXPECT_TRUE(r.metrics().has_key_logit_mse());
    EXPECT_TRUE(std::isfinite(r.metrics().attention_tv()));
    EXPECT_TRUE(r.within_budget());  // no budget set
    std::printf("%s: cosine %.4f logit_mse %.5f tv %.4f ratio %.2f\n", r.profile_id().c_str(),
                r.metrics().cosine_similarity(), r.metrics().key_logit_mse(), r.metrics().attention_tv(),
                r.compression_ratio());
  }
  // A candidate with a budget it cannot meet is reported as violating it (nothing falls back).
  {
    grpc::ClientContext cb;
    v1::EvaluateQualityRequest breq = req;
    breq.clear_profile_digests();
    breq.clear_candidate_spec_jsons();
    breq.add_candidate_spec_jsons(
        SpecJson("tight", 16, 16, 1, R"(,"quality_budget":{"max_attention_tv":0.000001,"fallback_on_violation":"keep_raw"})"));
    v1::EvaluateQualityResponse bresp;
    grpc::Status bs = stub_->EvaluateQuality(&cb, breq, &bresp);
    ASSERT_TRUE(bs.ok()) << bs.error_message();
    ASSERT_EQ(bresp.reports_size(), 1);
    EXPECT_FALSE(bresp.reports(0).within_budget());
    ASSERT_EQ(bresp.reports(0).violations_size(), 1);
    EXPECT_NE(bresp.reports(0).violations(0).find("attention_tv"), std::string::npos);
  }
  // More codewords, better reconstruction.
  EXPECT_LT(resp.reports(1).metrics().reconstruction_mse(), resp.reports(0).metrics().reconstruction_mse());
  EXPECT_EQ(svc_->profile_count(), 1u);
  {
    grpc::ClientContext c2;
    v1::EvaluateQualityRequest none;
    EXPECT_EQ(stub_->EvaluateQuality(&c2, none, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext c3;
    v1::EvaluateQualityRequest unknown;
    unknown.add_profile_digests("sha256:" + std::string(64, 'd'));
    unknown.mutable_keys()->Assign(k.begin(), k.end());
    EXPECT_EQ(stub_->EvaluateQuality(&c3, unknown, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
}

TEST_F(ServiceTest, PreloadDirRegistersSpecs) {
  const fs::path dir = fs::path(data_dir_) / "configmap";
  fs::create_directories(dir);
  std::ofstream(dir / "a.json") << SpecJson("preload-a");
  std::ofstream(dir / "b.json") << SpecJson("preload-b", 32);
  std::ofstream(dir / "ignored.txt") << "not a spec";
  StartServer();
  ASSERT_TRUE(svc_->PreloadDir(dir.string()).ok());
  EXPECT_EQ(svc_->profile_count(), 2u);
  EXPECT_TRUE(Register(SpecJson("preload-a")).already_registered());
  std::ofstream(dir / "c.json") << "{broken";
  EXPECT_EQ(svc_->PreloadDir(dir.string()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(svc_->profile_count(), 2u);
}

TEST_F(ServiceTest, DrainRefusesNewWorkAndAdminHookGuardsRegistration) {
  options_.authorize_admin = [](const grpc::ServerContextBase& ctx) -> absl::Status {
    auto it = ctx.client_metadata().find("x-admin");
    if (it == ctx.client_metadata().end()) return absl::UnauthenticatedError("admin credential required");
    return absl::OkStatus();
  };
  StartServer();
  {
    grpc::ClientContext ctx;
    v1::RegisterProfileRequest req;
    req.set_spec_json(SpecJson("admin"));
    v1::RegisterProfileResponse resp;
    EXPECT_EQ(stub_->RegisterProfile(&ctx, req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  grpc::ClientContext ctx;
  ctx.AddMetadata("x-admin", "yes");
  v1::RegisterProfileRequest req;
  req.set_spec_json(SpecJson("admin"));
  v1::RegisterProfileResponse resp;
  ASSERT_TRUE(stub_->RegisterProfile(&ctx, req, &resp).ok());

  svc_->StartDrain();
  grpc::ClientContext ctx2;
  ctx2.AddMetadata("x-admin", "yes");
  req.set_spec_json(SpecJson("admin2", 32));
  EXPECT_EQ(stub_->RegisterProfile(&ctx2, req, &resp).error_code(), grpc::StatusCode::UNAVAILABLE);
  v1::CompressStreamHeader header;
  header.set_profile_digest(resp.profile().digest());
  header.set_input_dtype(v1::DTYPE_F32);
  EXPECT_EQ(Compress(header, {}).status.error_code(), grpc::StatusCode::UNAVAILABLE);
}

// Fleet start-up: several nodes register one spec at once. The registration that comes first
// builds; the others wait for that build (holding no thread) and get its digest; one build in all.
TEST_F(ServiceTest, ConcurrentIdenticalRegistrationsBuildOnce) {
  options_.build_workers = 1;
  StartServer();
  // A slow build occupies the only build worker, so the build of "fleet" stays queued while all
  // six calls arrive (the assertions below hold whatever the timing).
  AsyncRegistration blocker;
  RegisterAsync(SlowSpecJson("blocker"), &blocker);
  ASSERT_TRUE(WaitUntil([&] { return svc_->registration_builds_started() == 1; }));
  constexpr int kCalls = 6;
  std::vector<AsyncRegistration> calls(kCalls);
  for (auto& c : calls) RegisterAsync(SlowSpecJson("fleet"), &c);
  // The blocker's call plus six waiting for the one in-flight build of "fleet".
  const bool all_waited = WaitUntil([&] { return svc_->build_waiters() == 1 + kCalls; });
  if (all_waited) {
    EXPECT_EQ(svc_->builds_in_flight(), 2u);
    EXPECT_NE(metrics_.Serialize().find("fibquant_builds_in_flight 2\n"), std::string::npos);
  }
  blocker.thread.join();
  ASSERT_TRUE(blocker.status.ok()) << blocker.status.error_message();
  int inserted = 0;
  for (auto& c : calls) {
    c.thread.join();
    ASSERT_TRUE(c.status.ok()) << c.status.error_message();
    EXPECT_EQ(c.resp.profile().digest(), calls[0].resp.profile().digest());
    EXPECT_FALSE(c.resp.profile().profile_json().empty());
    if (!c.resp.already_registered()) ++inserted;
  }
  EXPECT_TRUE(all_waited) << "the six calls did not all join the build (timing); the counts below still hold";
  EXPECT_EQ(inserted, 1);
  EXPECT_EQ(svc_->registration_builds_started(), 2u);  // blocker + one build of "fleet"
  EXPECT_EQ(svc_->profile_count(), 2u);
  EXPECT_EQ(svc_->builds_in_flight(), 0u);
  EXPECT_EQ(svc_->build_waiters(), 0u);
  const std::string text = metrics_.Serialize();
  EXPECT_NE(text.find("fibquant_builds_in_flight 0\n"), std::string::npos);
  EXPECT_NE(text.find("fibquant_build_queue_depth 0\n"), std::string::npos);
  // Later registrations find the stored profile: no build.
  EXPECT_TRUE(Register(SlowSpecJson("fleet")).already_registered());
  EXPECT_EQ(svc_->registration_builds_started(), 2u);
}

// A build that fails (here: the data dir cannot store the profile) fails every registration that
// waited for it, and is forgotten: the next registration builds again.
TEST_F(ServiceTest, FailedBuildIsReportedToEveryWaiterAndRetried) {
  options_.build_workers = 1;
  StartServer();
  const fs::path profiles = fs::path(data_dir_) / "profiles";
  fs::remove_all(profiles);
  std::ofstream(profiles) << "not a directory";  // every profile write fails, even for root
  AsyncRegistration blocker;
  RegisterAsync(SlowSpecJson("blocker"), &blocker);
  ASSERT_TRUE(WaitUntil([&] { return svc_->registration_builds_started() == 1; }));
  constexpr int kCalls = 4;
  std::vector<AsyncRegistration> calls(kCalls);
  for (auto& c : calls) RegisterAsync(SpecJson("retry"), &c);
  const bool all_waited = WaitUntil([&] { return svc_->build_waiters() == 1 + kCalls; });
  blocker.thread.join();
  EXPECT_FALSE(blocker.status.ok());
  for (auto& c : calls) {
    c.thread.join();
    EXPECT_FALSE(c.status.ok());
    EXPECT_EQ(c.status.error_code(), calls[0].status.error_code());
    EXPECT_EQ(c.status.error_message(), calls[0].status.error_message());
  }
  EXPECT_NE(calls[0].status.error_message().find("profiles"), std::string::npos)
      << calls[0].status.error_message();
  EXPECT_TRUE(all_waited) << "the four calls did not all join the build (timing)";
  if (all_waited) {
    EXPECT_EQ(svc_->registration_builds_started(), 2u);  // blocker + one "retry" build
  }
  EXPECT_EQ(svc_->profile_count(), 0u);
  EXPECT_EQ(svc_->builds_in_flight(), 0u);

  // The failure is not remembered: once the disk is fixed, the next registration builds.
  fs::remove(profiles);
  fs::create_directories(profiles);
  const uint64_t before = svc_->registration_builds_started();
  auto ok = Register(SpecJson("retry"));
  EXPECT_FALSE(ok.already_registered());
  EXPECT_EQ(svc_->registration_builds_started(), before + 1);
  EXPECT_TRUE(Register(SpecJson("retry")).already_registered());
  EXPECT_EQ(svc_->registration_builds_started(), before + 1);
}

// Builds have their own pool: with one worker thread and one build worker, a stream of a
// registered profile completes while a long build runs.
TEST_F(ServiceTest, StreamCompletesWhileALongBuildRuns) {
  options_.worker_threads = 1;
  options_.build_workers = 1;
  StartServer();
  const std::vector<float> keys = ReadF32(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32");
  const std::string digest = Register(SpecJson("pages")).profile().digest();
  AsyncRegistration slow;
  RegisterAsync(SlowSpecJson("slow"), &slow);
  ASSERT_TRUE(WaitUntil([&] { return svc_->registration_builds_started() == 2; }));
  v1::CompressStreamHeader header;
  header.set_profile_digest(digest);
  header.set_input_dtype(v1::DTYPE_F32);
  const std::vector<v1::RawPage> pages = FixturePages(keys);
  auto r = Compress(header, pages, true, std::chrono::seconds(120));  // deadline: a hang bound only
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_EQ(r.responses.size(), pages.size() + 1);
  EXPECT_TRUE(r.responses.back().has_receipt());
  slow.thread.join();
  EXPECT_TRUE(slow.status.ok()) << slow.status.error_message();
}

// Bounds: a full build queue is RESOURCE_EXHAUSTED naming the flags, and so is a registration
// beyond worker_queue_capacity waiters of one build.
TEST_F(ServiceTest, BuildQueueAndWaitersAreBounded) {
  options_.build_workers = 1;
  options_.worker_queue_capacity = 1;
  StartServer();
  AsyncRegistration running, queued;
  RegisterAsync(SlowSpecJson("running"), &running);
  ASSERT_TRUE(WaitUntil([&] { return svc_->registration_builds_started() == 1; }));
  RegisterAsync(SpecJson("queued"), &queued);
  ASSERT_TRUE(WaitUntil([&] {
    return metrics_.Serialize().find("fibquant_build_queue_depth 1\n") != std::string::npos;
  }));
  {
    grpc::ClientContext ctx;
    v1::RegisterProfileRequest req;
    req.set_spec_json(SpecJson("third"));
    v1::RegisterProfileResponse resp;
    grpc::Status s = stub_->RegisterProfile(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_NE(s.error_message().find("--build-workers"), std::string::npos) << s.error_message();
    EXPECT_NE(s.error_message().find("--worker-queue-capacity"), std::string::npos) << s.error_message();
  }
  if (svc_->registration_builds_started() == 1) {  // "queued" still waits: it has its one waiter
    grpc::ClientContext ctx;
    v1::RegisterProfileRequest req;
    req.set_spec_json(SpecJson("queued"));
    v1::RegisterProfileResponse resp;
    grpc::Status s = stub_->RegisterProfile(&ctx, req, &resp);
    if (!s.ok()) {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
      EXPECT_NE(s.error_message().find("worker_queue_capacity"), std::string::npos) << s.error_message();
    }
  }
  running.thread.join();
  queued.thread.join();
  EXPECT_TRUE(running.status.ok()) << running.status.error_message();
  EXPECT_TRUE(queued.status.ok()) << queued.status.error_message();
  EXPECT_EQ(svc_->builds_in_flight(), 0u);
}

}  // namespace
}  // namespace fibquant::server
