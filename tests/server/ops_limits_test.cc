// Message-size and malformed-message refusals against the real fibquant-server binary (127.0.0.1,
// port chosen with :0): a request above --max-message-bytes (unary and inside a stream) is
// RESOURCE_EXHAUSTED, bytes that are not a protobuf message are refused by gRPC's parser, a page above
// --max-page-bytes ends its stream with RESOURCE_EXHAUSTED, and after each refusal the same server
// still serves a normal registration and stream (issue 7, "oversized and malformed messages").
#include <signal.h>

#include <chrono>
#include <future>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

namespace v1 = ::fibquant::v1;
using ::testing::HasSubstr;
using testing::ServerProcess;
using testing::TempDir;

constexpr int kMaxMessage = 256 * 1024;
constexpr int kMaxPage = 32 * 1024;

// head_dim 64, f32, 16-token pages: 4 KiB per page.
constexpr char kSpec[] = R"({
  "profile_id": "ops-limits",
  "shape": {"role": "key", "attention_kind": "mha", "batch": 1, "layers": 1, "kv_heads": 1,
            "query_heads": 1, "tokens": 4096, "head_dim": 64, "dtype": "f32",
            "rope_state": "pre_rope"},
  "axis_policy": "per_token",
  "tokens_per_page": 16,
  "fibquant": {"block_dim": 2, "codebook_size": 16, "seed": 7}
})";

std::chrono::system_clock::time_point In(int seconds) {
  return std::chrono::system_clock::now() + std::chrono::seconds(seconds);
}

class OpsLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_.Start({"--listen=127.0.0.1:0", "--metrics-listen=", "--workers=2",
                   "--data-dir=" + (dir_.path() / "data").string(), "--drain-seconds=5",
                   absl::StrCat("--max-message-bytes=", kMaxMessage),
                   absl::StrCat("--max-page-bytes=", kMaxPage)},
                  dir_.path());
    std::optional<int> port = server_.WaitForPort();
    ASSERT_TRUE(port.has_value()) << server_.Log();
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", *port), grpc::InsecureChannelCredentials());
    stub_ = v1::KvCompressionService::NewStub(channel_);
  }

  void TearDown() override {
    stub_.reset();
    channel_.reset();
    server_.Signal(SIGTERM);
    EXPECT_EQ(server_.WaitForExit(), 0) << server_.Log();
  }

  grpc::Status Register(const std::string& spec, v1::RegisterProfileResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(60));
    v1::RegisterProfileRequest req;
    req.set_spec_json(spec);
    return stub_->RegisterProfile(&ctx, req, resp);
  }

  // One CompressPages stream: header, then `pages` (token_start 16*i, `bytes` bytes each);
  // returns the final status and the number of pages answered.
  std::pair<grpc::Status, int> Compress(const std::string& digest, const std::vector<size_t>& page_bytes) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(60));
    auto stream = stub_->CompressPages(&ctx);
    v1::CompressPagesRequest h;
    h.mutable_header()->set_profile_digest(digest);
    h.mutable_header()->set_input_dtype(v1::DTYPE_F32);
    bool ok = stream->Write(h);
    for (size_t i = 0; ok && i < page_bytes.size(); ++i) {
      v1::CompressPagesRequest p;
      p.mutable_page()->mutable_coordinates()->set_token_start(static_cast<uint32_t>(16 * i));
      p.mutable_page()->mutable_coordinates()->set_token_count(
          static_cast<uint32_t>(page_bytes[i] / (64 * sizeof(float))));
      p.mutable_page()->set_data(std::string(page_bytes[i], '\0'));
      ok = stream->Write(p);
    }
    if (ok) stream->WritesDone();
    int answered = 0;
    v1::CompressPagesResponse r;
    while (stream->Read(&r)) answered += r.has_page() ? 1 : 0;
    return {stream->Finish(), answered};
  }

  // Still serving after a refusal: health SERVING, a registration and a one-page stream work.
  void ExpectStillServing(const std::string& digest, const char* after) {
    auto health = testing::CheckHealth(channel_, "fibquant.v1.KvCompressionService");
    EXPECT_TRUE(health.status.ok()) << after << ": " << health.status.error_message();
    EXPECT_EQ(health.serving_status, 1) << after;
    v1::RegisterProfileResponse resp;
    grpc::Status s = Register(kSpec, &resp);
    EXPECT_TRUE(s.ok()) << after << ": " << s.error_message();
    auto [cs, answered] = Compress(digest, {16 * 64 * sizeof(float)});
    EXPECT_TRUE(cs.ok()) << after << ": " << cs.error_code() << " " << cs.error_message();
    EXPECT_EQ(answered, 1) << after;
  }

  TempDir dir_;
  ServerProcess server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvCompressionService::Stub> stub_;
};

TEST_F(OpsLimitsTest, OversizedAndMalformedMessagesAreRefusedAndTheServerKeepsServing) {
  v1::RegisterProfileResponse resp;
  grpc::Status s = Register(kSpec, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const std::string digest = resp.profile().digest();

  // A unary request above --max-message-bytes: gRPC refuses it before our handler runs.
  s = Register(std::string(kMaxMessage + 1024, ' ') + kSpec, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  ExpectStillServing(digest, "oversized unary request");

  // A stream message above --max-message-bytes (a 512 KiB page).
  auto [big_msg, big_answered] = Compress(digest, {16 * 64 * sizeof(float), 512 * 1024});
  EXPECT_EQ(big_msg.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << big_msg.error_message();
  ExpectStillServing(digest, "oversized stream message");

  // A page under the message limit but above --max-page-bytes (64 KiB > 32 KiB): our own check.
  auto [big_page, page_answered] = Compress(digest, {16 * 64 * sizeof(float), 64 * 1024});
  EXPECT_EQ(big_page.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << big_page.error_message();
  EXPECT_THAT(big_page.error_message(), HasSubstr("max_page_bytes"));
  EXPECT_LE(page_answered, 1);
  ExpectStillServing(digest, "page above max_page_bytes");

  // Bytes that are not a RegisterProfileRequest (field 1 with a length past the end), sent through a
  // generic stub; the same call with the valid serialization is the control.
  for (const bool valid : {true, false}) {
    grpc::GenericStub generic(channel_);
    v1::RegisterProfileRequest good;
    good.set_spec_json(kSpec);
    const std::string bytes =
        valid ? good.SerializeAsString() : std::string("\x0a\xff\xff\xff\x0f garbage", 14);
    grpc::Slice slice(bytes);
    grpc::ByteBuffer request(&slice, 1);
    grpc::ByteBuffer response;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(30));
    std::promise<grpc::Status> done;
    generic.UnaryCall(&ctx, "/fibquant.v1.KvCompressionService/RegisterProfile", grpc::StubOptions(),
                      &request, &response, [&done](grpc::Status st) { done.set_value(std::move(st)); });
    grpc::Status st = done.get_future().get();
    // Unparsable request bytes never reach our handler: gRPC 1.51's callback server answers
    // UNIMPLEMENTED (its code for a request it cannot deserialize), with no message.
    EXPECT_EQ(st.error_code(), valid ? grpc::StatusCode::OK : grpc::StatusCode::UNIMPLEMENTED)
        << (valid ? "valid" : "malformed") << ": " << st.error_message();
  }
  ExpectStillServing(digest, "malformed request bytes");
}

}  // namespace
}  // namespace fibquant::server
