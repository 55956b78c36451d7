// Service-level tests of operator-facing behaviour on an in-process server (no ports):
// EvaluateQuality of f16/bf16 profiles (f32 samples converted), the quality budget enforced by
// CompressPages (keep_raw stores over-budget pages raw, fail_closed fails the stream),
// quality_budget.top_k used alike by CompressPages and EvaluateQuality, and the decode receipt
// (ratio independent of the output dtype; mixed-profile streams list every profile and bind the
// decoded output).
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/half.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/metrics.h"
#include "server/service.h"

namespace fibquant::server {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::fibquant::v1;
using ::testing::HasSubstr;

constexpr uint32_t kDim = 128;

// A key profile of one head, 64 tokens, head_dim 128, pages of 16 tokens; `extra` is appended to
// the spec object (budget, fallback, ...).
std::string Spec(const std::string& id, const std::string& dtype, const std::string& extra = "") {
  return absl::StrCat(R"({"profile_id":")", id, R"(","shape":{"role":"key","attention_kind":"mha","batch":1,)",
                      R"("layers":1,"kv_heads":1,"query_heads":1,"tokens":64,"head_dim":128,"dtype":")", dtype,
                      R"(","rope_state":"pre_rope"},"axis_policy":"per_token","tokens_per_page":16,)",
                      R"("fibquant":{"block_dim":4,"codebook_size":16,"seed":7,"training_samples":512,)",
                      R"("lloyd_restarts":1,"lloyd_iterations":3})", extra, "}");
}

// Head 0 of a [tokens, 4, 128] f32 fixture, `tokens` rows.
std::vector<float> Head0(const std::string& file, uint32_t tokens) {
  std::ifstream in(std::string(FQ_TEST_DATA_DIR) + "/" + file, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();
  std::vector<float> all(bytes.size() / sizeof(float));
  std::memcpy(all.data(), bytes.data(), all.size() * sizeof(float));
  std::vector<float> out;
  for (uint32_t t = 0; t < tokens; ++t) {
    out.insert(out.end(), all.begin() + (size_t{t} * 4) * kDim, all.begin() + (size_t{t} * 4 + 1) * kDim);
  }
  return out;
}

std::string AsDType(const std::vector<float>& v, DType dtype) {
  std::string out(v.size() * DTypeSize(dtype), '\0');
  FromFloat(dtype, v.data(), v.size(), reinterpret_cast<uint8_t*>(out.data()));
  return out;
}

class OpsServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "fq_ops_service_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    data_dir_ = tmpl;
    ServiceOptions options;
    options.data_dir = data_dir_;
    options.worker_threads = 2;
    options.build_threads = 1;
    options.quality_sample_rate = 1.0;  // every page sampled: the metrics test counts them
    metrics_.WatchDataDir(data_dir_);
    auto svc = KvCompressionServiceImpl::Create(options, &metrics_);
    ASSERT_TRUE(svc.ok()) << svc.status();
    svc_ = *std::move(svc);
    grpc::ServerBuilder builder;
    builder.RegisterService(svc_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::KvCompressionService::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
    keys_ = Head0("L1_k.f32", 64);
    queries_ = Head0("L1_q.f32", 8);
  }
  void TearDown() override {
    stub_.reset();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    server_->Wait();
    server_.reset();
    svc_.reset();
    std::error_code ec;
    fs::remove_all(data_dir_, ec);
  }

  std::string Register(const std::string& spec) {
    grpc::ClientContext ctx;
    v1::RegisterProfileRequest req;
    req.set_spec_json(spec);
    v1::RegisterProfileResponse resp;
    grpc::Status s = stub_->RegisterProfile(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.profile().digest();
  }

  struct Compressed {
    grpc::Status status;
    std::vector<std::string> frames;
    v1::Receipt receipt;
  };
  Compressed Compress(const std::string& digest, DType dtype, const std::vector<float>& queries = {}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    auto stream = stub_->CompressPages(&ctx);
    std::thread writer([&] {
      v1::CompressPagesRequest h;
      h.mutable_header()->set_profile_digest(digest);
      h.mutable_header()->set_input_dtype(dtype == DType::kF32 ? v1::DTYPE_F32
                                          : dtype == DType::kF16 ? v1::DTYPE_F16 : v1::DTYPE_BF16);
      h.mutable_header()->mutable_queries()->Assign(queries.begin(), queries.end());
      if (!stream->Write(h)) return;
      for (uint32_t t = 0; t < 64; t += 16) {
        v1::CompressPagesRequest p;
        p.mutable_page()->mutable_coordinates()->set_token_start(t);
        p.mutable_page()->mutable_coordinates()->set_token_count(16);
        p.mutable_page()->set_data(AsDType(std::vector<float>(keys_.begin() + size_t{t} * kDim,
                                                              keys_.begin() + size_t{t + 16} * kDim), dtype));
        if (!stream->Write(p)) break;
      }
      stream->WritesDone();
    });
    Compressed out;
    v1::CompressPagesResponse resp;
    while (stream->Read(&resp)) {
      if (resp.has_page()) out.frames.push_back(resp.page().frame());
      if (resp.has_receipt()) out.receipt = resp.receipt();
    }
    writer.join();
    out.status = stream->Finish();
    return out;
  }

  v1::Receipt Decompress(const std::vector<std::string>& frames, v1::DType dtype) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    auto stream = stub_->DecompressPages(&ctx);
    std::thread writer([&] {
      v1::DecompressPagesRequest h;
      h.mutable_header()->set_output_dtype(dtype);
      if (!stream->Write(h)) return;
      for (const auto& f : frames) {
        v1::DecompressPagesRequest r;
        r.mutable_frame()->set_frame(f);
        if (!stream->Write(r)) break;
      }
      stream->WritesDone();
    });
    v1::Receipt receipt;
    v1::DecompressPagesResponse resp;
    while (stream->Read(&resp)) {
      if (resp.has_receipt()) receipt = resp.receipt();
    }
    writer.join();
    grpc::Status s = stream->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
    return receipt;
  }

  grpc::Status Evaluate(const std::string& digest, v1::EvaluateQualityResponse* resp, uint32_t top_k = 0) {
    grpc::ClientContext ctx;
    v1::EvaluateQualityRequest req;
    req.add_profile_digests(digest);
    req.mutable_keys()->Assign(keys_.begin(), keys_.end());
    req.mutable_queries()->Assign(queries_.begin(), queries_.end());
    req.set_top_k(top_k);
    return stub_->EvaluateQuality(&ctx, req, resp);
  }

  std::string data_dir_;
  Metrics metrics_;
  std::unique_ptr<KvCompressionServiceImpl> svc_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::KvCompressionService::Stub> stub_;
  std::vector<float> keys_, queries_;
};

TEST_F(OpsServiceTest, EvaluateQualityEvaluatesF16AndBf16ProfilesFromAnF32Sample) {
  for (const char* dtype : {"bf16", "f16", "f32"}) {
    SCOPED_TRACE(dtype);
    const std::string digest = Register(Spec(absl::StrCat("eval-", dtype), dtype));
    v1::EvaluateQualityResponse resp;
    grpc::Status s = Evaluate(digest, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(resp.reports_size(), 1);
    EXPECT_EQ(resp.reports(0).profile_digest(), digest);
    EXPECT_GT(resp.reports(0).metrics().cosine_similarity(), 0.5);
    EXPECT_TRUE(std::isfinite(resp.reports(0).metrics().attention_tv()));
  }
}

TEST_F(OpsServiceTest, CompressPagesEnforcesKeepRawAndFailClosedBudgets) {
  // A budget no page can meet (attention TV below 1e-12).
  const std::string keep = Register(Spec("budget-keep", "f32",
      R"(,"quality_budget":{"max_attention_tv":1e-12,"fallback_on_violation":"keep_raw"})"));
  Compressed kept = Compress(keep, DType::kF32, queries_);
  ASSERT_TRUE(kept.status.ok()) << kept.status.error_message();
  EXPECT_EQ(kept.receipt.pages(), 4u);
  EXPECT_EQ(kept.receipt.compressed_vectors(), 0u) << "every page is over budget: stored raw";
  EXPECT_EQ(kept.receipt.raw_vectors(), 64u);
  EXPECT_THAT(std::vector<std::string>(kept.receipt.fallback_reasons().begin(),
                                       kept.receipt.fallback_reasons().end()),
              ::testing::Contains(HasSubstr("budget")));

  const std::string closed = Register(Spec("budget-closed", "f32",
      R"(,"quality_budget":{"max_attention_tv":1e-12,"fallback_on_violation":"fail_closed"})"));
  Compressed failed = Compress(closed, DType::kF32, queries_);
  EXPECT_EQ(failed.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << failed.status.error_message();
  EXPECT_THAT(failed.status.error_message(), HasSubstr("attention_tv"));

  // A budget every page meets: nothing falls back.
  const std::string loose = Register(Spec("budget-loose", "f32",
      R"(,"quality_budget":{"max_attention_tv":1.0,"fallback_on_violation":"fail_closed"})"));
  Compressed fine = Compress(loose, DType::kF32, queries_);
  ASSERT_TRUE(fine.status.ok()) << fine.status.error_message();
  EXPECT_EQ(fine.receipt.raw_vectors(), 0u);
}

TEST_F(OpsServiceTest, BudgetTopKIsTheSameForCompressPagesAndEvaluateQuality) {
  // Strict top-k agreement at k = 2: the verdict of EvaluateQuality and the fallbacks of
  // CompressPages on the same data must agree, because both use the profile's k.
  const std::string digest = Register(Spec("topk", "f32",
      R"(,"quality_budget":{"max_topk_disagreement":0.0,"top_k":2,"fallback_on_violation":"keep_raw"})"));
  v1::EvaluateQualityResponse eval;
  grpc::Status s = Evaluate(digest, &eval);
  ASSERT_TRUE(s.ok()) << s.error_message();
  Compressed c = Compress(digest, DType::kF32, queries_);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  EXPECT_EQ(eval.reports(0).within_budget(), c.receipt.raw_vectors() == 0)
      << "eval: " << eval.reports(0).within_budget() << ", compress raw vectors " << c.receipt.raw_vectors();
  // Asking EvaluateQuality for another k than the budget's is refused, naming both.
  v1::EvaluateQualityResponse other;
  s = Evaluate(digest, &other, 8);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("top_k 8 differs from the profile's quality_budget.top_k 2"));
  // The profile records it (and it is part of the digest: a spec without top_k differs).
  const std::string without = Register(Spec("topk", "f32",
      R"(,"quality_budget":{"max_topk_disagreement":0.0,"fallback_on_violation":"keep_raw"})"));
  EXPECT_NE(without, digest);
}

TEST_F(OpsServiceTest, DecodeReceiptRatioIgnoresTheOutputDTypeAndMixedStreamsListEveryProfile) {
  const std::string bf16 = Register(Spec("ratio-bf16", "bf16"));
  Compressed c = Compress(bf16, DType::kBF16);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  const v1::Receipt as_f32 = Decompress(c.frames, v1::DTYPE_F32);
  const v1::Receipt as_bf16 = Decompress(c.frames, v1::DTYPE_BF16);
  EXPECT_EQ(as_f32.output_bytes(), 2 * as_bf16.output_bytes());
  EXPECT_DOUBLE_EQ(as_f32.compression_ratio(), as_bf16.compression_ratio());
  EXPECT_DOUBLE_EQ(as_f32.compression_ratio(), c.receipt.compression_ratio());

  const std::string f32 = Register(Spec("mixed-f32", "f32"));
  Compressed c2 = Compress(f32, DType::kF32);
  ASSERT_TRUE(c2.status.ok()) << c2.status.error_message();
  std::vector<std::string> mixed = c.frames;
  mixed.insert(mixed.end(), c2.frames.begin(), c2.frames.end());
  const v1::Receipt r = Decompress(mixed, v1::DTYPE_F32);
  const auto j = nlohmann::json::parse(r.receipt_json());
  EXPECT_EQ(j.at("profile_digests"), (std::vector<std::string>{bf16, f32}));
  const std::string out_digest = j.at("output_digest").get<std::string>();
  EXPECT_EQ(out_digest.rfind("sha256:", 0), 0u);
  // The output digest follows the decoded bytes: another dtype, another digest (same frames).
  const v1::Receipt r16 = Decompress(mixed, v1::DTYPE_BF16);
  EXPECT_NE(nlohmann::json::parse(r16.receipt_json()).at("output_digest"), out_digest);
  // ... and the same request again gives the same one.
  const v1::Receipt again = Decompress(mixed, v1::DTYPE_F32);
  EXPECT_EQ(nlohmann::json::parse(again.receipt_json()).at("output_digest"), out_digest);
  EXPECT_NE(r.receipt_digest(), r16.receipt_digest());
}

// Metrics an operator expects: process_*, build info, per-page latency of both streams, stream
// buckets up to the CLI's 600 s deadline, zero-valued counters before their first event, queue
// capacities, receipts stored, data-dir bytes, sampled quality per profile.
TEST_F(OpsServiceTest, MetricsOperatorsExpect) {
  const std::string before = metrics_.Serialize();
  for (const char* zero : {"fibquant_fallbacks_total{reason=\"encode_failure\"} 0",
                           "fibquant_fallbacks_total{reason=\"quality_budget\"} 0",
                           "fibquant_registry_files_quarantined_total 0",
                           "fibquant_receipts_total{result=\"memory_only\"} 0",
                           "fibquant_page_duration_seconds_count{op=\"decompress\"} 0"}) {
    EXPECT_THAT(before, HasSubstr(zero));
  }
  const std::string digest = Register(Spec("metrics", "f32"));
  Compressed c = Compress(digest, DType::kF32, queries_);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  (void)Decompress(c.frames, v1::DTYPE_F32);
  const std::string text = metrics_.Serialize();
  for (const char* present : {"process_cpu_seconds_total ", "process_resident_memory_bytes ", "process_open_fds ",
                              "process_start_time_seconds ", "process_max_fds ", "process_virtual_memory_bytes ",
                              "fibquant_build_info{commit=\"", "version=\"0.1.0\"} 1",
                              "fibquant_page_duration_seconds_count{op=\"compress\"} 4",
                              "fibquant_page_duration_seconds_count{op=\"decompress\"} 4",
                              "fibquant_rpc_duration_seconds_bucket{method=\"CompressPages\",le=\"600\"} 1",
                              "fibquant_receipts_total{result=\"stored\"} 2",
                              "fibquant_worker_queue_capacity ", "fibquant_build_queue_capacity ",
                              "fibquant_data_dir_bytes "}) {
    EXPECT_THAT(text, HasSubstr(present));
  }
  const std::string label = digest.substr(7, 16);
  for (const char* metric : {"mse", "cosine_distance", "attention_tv"}) {
    EXPECT_THAT(text, HasSubstr(absl::StrCat("fibquant_sampled_page_distortion_count{metric=\"", metric,
                                             "\",profile=\"", label, "\"} 4")));
  }
  // Sampling never leaks into a receipt: a stream that asked for no metrics (no queries, no budget,
  // no page metrics) has no quality_mean although every page was sampled.
  Compressed plain = Compress(digest, DType::kF32);
  ASSERT_TRUE(plain.status.ok()) << plain.status.error_message();
  EXPECT_TRUE(nlohmann::json::parse(plain.receipt.receipt_json()).at("quality_mean").is_null());
  EXPECT_THAT(metrics_.Serialize(), HasSubstr(absl::StrCat("fibquant_sampled_page_distortion_count{metric=\"mse\",profile=\"",
                                                           label, "\"} 8")));
  // Values that must be real: RSS and the data dir are not zero, the start time is recent.
  auto value_of = [&](const std::string& name) {
    const size_t at = text.find("\n" + name + " ");
    return at == std::string::npos ? -1.0 : std::strtod(text.c_str() + at + name.size() + 2, nullptr);
  };
  EXPECT_GT(value_of("process_resident_memory_bytes"), 1e6);
  EXPECT_GT(value_of("fibquant_data_dir_bytes"), 1000);
  EXPECT_GT(value_of("process_open_fds"), 2);
  const double start = value_of("process_start_time_seconds");
  const double now = static_cast<double>(std::time(nullptr));
  EXPECT_GT(start, now - 3600 * 24);
  EXPECT_LE(start, now + 5);
}

}  // namespace
}  // namespace fibquant::server
