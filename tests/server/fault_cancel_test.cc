// Fault tests over an in-process channel (issue 7): many CompressPages/DecompressPages streams,
// several at once, each ended by client cancellation or deadline expiry at a random point (before
// the header, mid-window, after some responses). Afterwards every stream is freed: open_streams(),
// fibquant_streams_in_flight and fibquant_worker_queue_depth return to zero (bounded wait), nothing
// is left queued, and the service still answers a normal stream.
#include <grpcpp/grpcpp.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/metrics.h"
#include "server/service.h"

namespace fibquant::server {
namespace {

namespace v1 = ::fibquant::v1;

constexpr int kStreams = 48;      // bounded count
constexpr int kConcurrent = 4;    // streams at once
constexpr uint32_t kDim = 64, kTokens = 64, kTpp = 16;

std::string Spec() {
  return absl::StrCat(R"({"profile_id":"fault.cancel","shape":{"role":"key","attention_kind":"mha","batch":1,)",
                      R"("layers":1,"kv_heads":2,"query_heads":2,"tokens":)", kTokens, R"(,"head_dim":)", kDim,
                      R"(,"dtype":"f32","rope_state":"post_rope"},"axis_policy":"per_token","tokens_per_page":)",
                      kTpp, R"(,"fibquant":{"block_dim":4,"codebook_size":16,"seed":9,"training_samples":600,)",
                      R"("lloyd_restarts":1,"lloyd_iterations":3}})");
}

// Value of an unlabelled gauge in the Prometheus text format; -1 if absent.
double Gauge(const std::string& text, const std::string& name) {
  std::smatch m;
  const std::regex re("(^|\\n)" + name + " ([-0-9.e+]+)");
  return std::regex_search(text, m, re) ? std::stod(m[2]) : -1;
}

v1::RawPage Page(uint32_t head, uint32_t start, uint64_t seq) {
  std::vector<float> x(size_t{kTpp} * kDim);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7 + start + head) % 29) / 9.0f - 1.5f;
  v1::RawPage p;
  p.mutable_coordinates()->set_kv_head(head);
  p.mutable_coordinates()->set_token_start(start);
  p.mutable_coordinates()->set_token_count(kTpp);
  p.set_data(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float));
  p.set_client_sequence(seq);
  return p;
}

class FaultCancelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServiceOptions o;
    o.worker_threads = 2;
    o.build_threads = 1;
    o.max_inflight_pages_per_stream = 2;
    auto svc = KvCompressionServiceImpl::Create(o, &metrics_);
    ASSERT_TRUE(svc.ok()) << svc.status();
    svc_ = *std::move(svc);
    grpc::ServerBuilder b;
    b.RegisterService(svc_.get());
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::KvCompressionService::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
    grpc::ClientContext ctx;
    v1::RegisterProfileRequest req;
    req.set_spec_json(Spec());
    v1::RegisterProfileResponse resp;
    grpc::Status s = stub_->RegisterProfile(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    digest_ = resp.profile().digest();
  }
  void TearDown() override {
    stub_.reset();
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
      server_->Wait();
    }
    svc_.reset();
  }

  // All (head, token_start) pages of the profile, compressed once (for decompress streams).
  std::vector<std::string> Frames() {
    grpc::ClientContext ctx;
    auto stream = stub_->CompressPages(&ctx);
    v1::CompressPagesRequest h;
    h.mutable_header()->set_profile_digest(digest_);
    h.mutable_header()->set_input_dtype(v1::DTYPE_F32);
    std::thread w([&] {
      if (!stream->Write(h)) return;
      uint64_t seq = 0;
      for (uint32_t head = 0; head < 2; ++head) {
        for (uint32_t s = 0; s < kTokens; s += kTpp) {
          v1::CompressPagesRequest p;
          *p.mutable_page() = Page(head, s, seq++);
          if (!stream->Write(p)) return;
        }
      }
      stream->WritesDone();
    });
    std::vector<std::string> frames;
    v1::CompressPagesResponse r;
    while (stream->Read(&r)) {
      if (r.has_page()) frames.push_back(r.page().frame());
    }
    w.join();
    EXPECT_TRUE(stream->Finish().ok());
    return frames;
  }

  // One stream ended by the client: mode 0 = TryCancel after `reads` responses, 1 = a short
  // deadline while the client keeps the stream open. Returns the final status code.
  grpc::StatusCode OneStream(bool compress, int mode, int reads, int deadline_ms,
                             const std::vector<std::string>& frames) {
    grpc::ClientContext ctx;
    if (mode == 1) ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    std::atomic<bool> stop{false};
    grpc::Status st;
    if (compress) {
      auto stream = stub_->CompressPages(&ctx);
      std::thread w([&] {
        v1::CompressPagesRequest h;
        h.mutable_header()->set_profile_digest(digest_);
        h.mutable_header()->set_input_dtype(v1::DTYPE_F32);
        if (!stream->Write(h)) return;
        for (uint64_t i = 0; i < 64 && !stop; ++i) {
          v1::CompressPagesRequest p;
          *p.mutable_page() = Page(static_cast<uint32_t>(i % 2), static_cast<uint32_t>((i / 2) % 4) * kTpp, i);
          if (!stream->Write(p)) return;
        }
      });
      v1::CompressPagesResponse r;
      for (int n = 0; (mode == 1 || n < reads) && stream->Read(&r); ++n) {
      }
      if (mode == 0) ctx.TryCancel();
      stop = true;
      w.join();
      st = stream->Finish();
    } else {
      auto stream = stub_->DecompressPages(&ctx);
      std::thread w([&] {
        v1::DecompressPagesRequest h;
        h.mutable_header()->set_output_dtype(v1::DTYPE_F32);
        if (!stream->Write(h)) return;
        for (uint64_t i = 0; i < 64 && !stop; ++i) {
          v1::DecompressPagesRequest f;
          f.mutable_frame()->set_frame(frames[i % frames.size()]);
          f.mutable_frame()->set_client_sequence(i);
          if (!stream->Write(f)) return;
        }
      });
      v1::DecompressPagesResponse r;
      for (int n = 0; (mode == 1 || n < reads) && stream->Read(&r); ++n) {
      }
      if (mode == 0) ctx.TryCancel();
      stop = true;
      w.join();
      st = stream->Finish();
    }
    return st.error_code();
  }

  Metrics metrics_;
  std::unique_ptr<KvCompressionServiceImpl> svc_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::KvCompressionService::Stub> stub_;
  std::string digest_;
};

TEST_F(FaultCancelTest, CancelledAndExpiredStreamsFreeTheirWork) {
  const std::vector<std::string> frames = Frames();
  ASSERT_EQ(frames.size(), 8u);
  std::mt19937 rng(7);
  struct Plan {
    bool compress;
    int mode, reads, deadline_ms;
  };
  std::vector<Plan> plans;
  for (int i = 0; i < kStreams; ++i) {
    plans.push_back({(rng() & 1) != 0, static_cast<int>(rng() % 2), static_cast<int>(rng() % 6),
                     20 + static_cast<int>(rng() % 200)});
  }
  std::atomic<int> next{0}, cancelled{0}, expired{0}, other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kConcurrent; ++t) {
    threads.emplace_back([&] {
      for (int i = next++; i < kStreams; i = next++) {
        const Plan& p = plans[i];
        const grpc::StatusCode c = OneStream(p.compress, p.mode, p.reads, p.deadline_ms, frames);
        if (c == grpc::StatusCode::CANCELLED) {
          ++cancelled;
        } else if (c == grpc::StatusCode::DEADLINE_EXCEEDED) {
          ++expired;
        } else {
          ++other;
          ADD_FAILURE() << "stream " << i << " ended with code " << c;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(cancelled + expired, kStreams);
  EXPECT_GT(cancelled.load(), 0);
  EXPECT_GT(expired.load(), 0);
  // Bounded wait: the reactors free themselves once OnDone ran and their tasks finished.
  std::string text;
  for (int i = 0; i < 1000; ++i) {
    text = metrics_.Serialize();
    if (svc_->open_streams() == 0 && Gauge(text, "fibquant_streams_in_flight") == 0 &&
        Gauge(text, "fibquant_worker_queue_depth") == 0) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(svc_->open_streams(), 0u);
  EXPECT_EQ(Gauge(text, "fibquant_streams_in_flight"), 0) << text;
  EXPECT_EQ(Gauge(text, "fibquant_worker_queue_depth"), 0) << text;
  // Nothing stored for the ended streams, and a normal stream still works.
  EXPECT_EQ(Frames().size(), 8u);
  RecordProperty("cancelled", cancelled.load());
  RecordProperty("expired", expired.load());
}

}  // namespace
}  // namespace fibquant::server
