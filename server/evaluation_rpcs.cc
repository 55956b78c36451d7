// EvaluateQuality of KvCompressionServiceImpl: compresses a sample with registered or candidate
// profiles (candidates built on the build pool) and reports quality and budget verdicts.
#include "server/service.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "core/codebook.h"
#include "core/codec.h"
#include "core/digest.h"
#include "core/half.h"
#include "core/kv_codec.h"
#include "core/kv_frame.h"
#include "core/kv_profile.h"
#include "core/kv_receipt.h"
#include "core/status_macros.h"
#include "server/metrics.h"
#include "server/registry.h"
#include "server/status_util.h"
#include "server/worker_pool.h"
#include <nlohmann/json.hpp>
#include "server/service_internal.h"

namespace fibquant::server {
namespace {
namespace v1 = ::fibquant::v1;
namespace fs = std::filesystem;
using nlohmann::json;
using namespace ::fibquant::server::internal;  // NOLINT(build/namespaces): this service's own internals

// Compresses a sample (one (0, 0, 0) sequence) with `codec` page by page and reports quality.
[[nodiscard]] absl::StatusOr<v1::QualityReport> EvaluateSample(const std::shared_ptr<const KvCodec>& codec,
                                                               const v1::EvaluateQualityRequest& req) {
  const KvCompressionProfile& p = codec->profile();
  const uint32_t d = p.shape.head_dim;
  const bool key = p.shape.role == KvRole::kKey;
  const auto& data = key ? req.keys() : req.values();
  const std::string what = key ? "keys" : "values";
  const std::string ctx = absl::StrCat("profile ", p.profile_id, ": ");
  if (data.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, what, " are required for a ", what, " profile"));
  }
  if (data.size() % d != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(ctx, what, " hold ", data.size(), " values, not a multiple of head_dim ", d));
  }
  if (req.queries().size() % d != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(ctx, "queries hold ", req.queries().size(), " values, not a multiple of head_dim ", d));
  }
  if (!key && !req.keys().empty() && req.keys().size() != req.values().size()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, "keys and values must have the same length; got ",
                                                   req.keys().size(), " and ", req.values().size()));
  }
  const uint32_t tokens = static_cast<uint32_t>(data.size() / d);
  const uint32_t tpp = p.page_geometry.tokens_per_page;
  KvReceiptBuilder builder(codec);
  KvCompressOptions opts;
  opts.compute_metrics = true;
  opts.enforce_budget = false;  // measure only: the verdict is reported, nothing falls back
  // The verdict uses the profile's recorded k (quality_budget.top_k, default 8), as CompressPages
  // does. A request top_k only changes the reported metric, and may not differ from the k a
  // top-k budget is defined with.
  const uint32_t profile_k = p.quality_budget.top_k.value_or(kDefaultTopK);
  if (req.top_k() != 0 && req.top_k() != profile_k && p.quality_budget.max_topk_disagreement.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(
        ctx, "top_k ", req.top_k(), " differs from the profile's quality_budget.top_k ", profile_k,
        ", which its max_topk_disagreement verdict is defined with (leave top_k 0)"));
  }
  opts.top_k = req.top_k() == 0 ? profile_k : req.top_k();
  // The sample is f32; a f16/bf16 profile compresses pages of its own dtype, so each page is
  // converted first (round to nearest even: what `fibquant compress` does to an f32 file).
  const DType dtype = p.shape.dtype;
  std::vector<uint8_t> converted;
  for (uint32_t start = 0; start < tokens && start < p.shape.tokens; start += tpp) {
    const uint32_t count = std::min(tpp, p.shape.tokens - start);
    if (start + count > tokens) break;
    KvPageInput in;
    in.coords = KvPageCoords{0, 0, 0, start, count};
    in.dtype = dtype;
    const float* rows = data.data() + size_t{start} * d;
    if (dtype == DType::kF32) {
      in.data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(rows), size_t{count} * d * sizeof(float));
    } else {
      converted.resize(size_t{count} * d * DTypeSize(dtype));
      FromFloat(dtype, rows, size_t{count} * d, converted.data());
      in.data = absl::Span<const uint8_t>(converted.data(), converted.size());
    }
    in.queries = absl::Span<const float>(req.queries().data(), req.queries().size());
    if (!key && !req.keys().empty() && !req.queries().empty()) {
      in.keys = absl::Span<const float>(req.keys().data() + size_t{start} * d, size_t{count} * d);
    }
    auto page = codec->CompressPage(in, opts);
    if (!page.ok()) return Prefixed(page.status(), ctx);
    FQ_RETURN_IF_ERROR(builder.Add(*page));
  }
  if (builder.pages() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, "the sample holds ", tokens,
                                                   " tokens; the first page of the profile needs ",
                                                   std::min(tpp, p.shape.tokens)));
  }
  FQ_ASSIGN_OR_RETURN(KvReceipt receipt, builder.Finish());
  v1::QualityReport report;
  report.set_profile_digest(codec->profile_digest());
  report.set_profile_id(p.profile_id);
  if (receipt.quality_mean.has_value()) FillQualityMetrics(*receipt.quality_mean, report.mutable_metrics());
  report.set_within_budget(receipt.budget_passed);
  for (const KvBudgetVerdict& v : receipt.budget) {
    if (!v.passed) report.add_violations(absl::StrCat(v.metric, " ", v.worst_value, " > ", v.limit));
  }
  report.set_wire_bits_per_coord(p.fib_profile ? p.fib_profile->wire_bits_per_coord : 32.0);
  report.set_compression_ratio(receipt.compression_ratio);
  report.set_report_json(receipt.ToJson());
  return report;
}
}  // namespace

absl::StatusOr<KvCompressionProfile> KvCompressionServiceImpl::CheckUnauthenticatedBuild(
    KvCompressionProfile p) const {
  const uint64_t limit = std::min(options_.max_unauthenticated_build_cost, options_.max_profile_build_cost);
  if (absl::Status c = CheckBuildCost(p, limit); !c.ok()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        c.message(), " (max_unauthenticated_build_cost: EvaluateQuality without the admin token; "
        "--max-unauthenticated-build-cost)"));
  }
  return p;
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::EvaluateQuality(grpc::CallbackServerContext* ctx,
                                                                    const v1::EvaluateQualityRequest* req,
                                                                    v1::EvaluateQualityResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  const UnaryFinisher finish(metrics_, reactor, "EvaluateQuality");
  std::vector<std::shared_ptr<const KvCodec>> codecs;
  std::vector<KvCompressionProfile> candidates;
  // EvaluateQuality needs no token; when registration does, a caller without it is held to a
  // tighter build cost and builds on a pool of its own, so it cannot delay an admin's
  // RegisterProfile (issue 14 item 4: such builds made a tiny registration wait 59 s).
  const bool admin = !options_.authorize_admin || options_.authorize_admin(*ctx).ok();
  absl::Status s = [&]() -> absl::Status {
    for (const auto& [name, size] : {std::pair<const char*, int>{"keys", req->keys_size()},
                                     {"values", req->values_size()},
                                     {"queries", req->queries_size()}}) {
      if (static_cast<uint64_t>(size) > options_.max_eval_values) {
        return absl::ResourceExhaustedError(absl::StrCat(name, " hold ", size, " values; max_eval_values is ",
                                                         options_.max_eval_values));
      }
    }
    const size_t total = static_cast<size_t>(req->profile_digests_size()) + req->candidates_size() +
                         req->candidate_spec_jsons_size();
    if (total == 0) {
      return absl::InvalidArgumentError("give at least one of profile_digests, candidates, candidate_spec_jsons");
    }
    if (total > options_.max_eval_profiles) {
      return absl::ResourceExhaustedError(absl::StrCat(total, " profiles to evaluate; max_eval_profiles is ",
                                                       options_.max_eval_profiles));
    }
    for (const auto& d : req->profile_digests()) {
      FQ_ASSIGN_OR_RETURN(auto e, registry_->Lookup(d));
      codecs.push_back(e->codec);
    }
    for (int i = 0; i < req->candidates_size(); ++i) {
      auto p = ParseSpec(&req->candidates(i), nullptr);
      if (p.ok() && !admin) p = CheckUnauthenticatedBuild(*std::move(p));
      if (!p.ok()) return Prefixed(p.status(), absl::StrCat("candidates[", i, "]: "));
      candidates.push_back(*std::move(p));
    }
    for (int i = 0; i < req->candidate_spec_jsons_size(); ++i) {
      auto p = ParseSpec(nullptr, &req->candidate_spec_jsons(i));
      if (p.ok() && !admin) p = CheckUnauthenticatedBuild(*std::move(p));
      if (!p.ok()) return Prefixed(p.status(), absl::StrCat("candidate_spec_jsons[", i, "]: "));
      candidates.push_back(*std::move(p));
    }
    return absl::OkStatus();
  }();
  if (!s.ok()) {
    finish(s);
    return reactor;
  }
  // Candidates are codebook builds: they run on the build pool, never ahead of stream pages.
  WorkerPool* pool = candidates.empty() ? pool_.get() : admin ? build_pool_.get() : eval_build_pool_.get();
  absl::Status submitted = pool->Submit([this, ctx, req, resp, finish, codecs = std::move(codecs),
                                          candidates = std::move(candidates)](absl::Status pool_status) mutable {
    if (!pool_status.ok()) {
      finish(absl::UnavailableError("server is shutting down"));
      return;
    }
    absl::Status st = [&]() -> absl::Status {
      for (auto& c : candidates) {
        if (ctx->IsCancelled()) return absl::CancelledError("EvaluateQuality cancelled");
        if (auto existing = FindSpec(c)) {  // a registered spec: reuse its codebook
          codecs.push_back(existing->codec);
          continue;
        }
        // The caller is the only one waiting for this build: it stops when the caller goes away
        // (or the drain ends) instead of holding the build pool for nobody.
        const CancelToken cancel(&builds_cancel_, [ctx] { return ctx->IsCancelled(); });
        FQ_ASSIGN_OR_RETURN(auto calibration, CalibrationFor(c));
        FQ_ASSIGN_OR_RETURN(auto codec, KvCodec::Build(std::move(c), options_.build_threads, &cancel,
                                                       std::move(calibration)));
        codecs.push_back(std::move(codec));
      }
      for (const auto& codec : codecs) {
        if (ctx->IsCancelled()) return absl::CancelledError("EvaluateQuality cancelled");
        FQ_ASSIGN_OR_RETURN(*resp->add_reports(), EvaluateSample(codec, *req));
      }
      return absl::OkStatus();
    }();
    finish(st);
  });
  if (!submitted.ok()) finish(submitted);
  return reactor;
}

}  // namespace fibquant::server
