// KvCompressionServiceImpl: calibration artifacts (RegisterCalibration, GetCalibration) and
// RecommendProfile (core/kv_recommend.h on the build pool). docs/API.md and docs/OPERATIONS.md
// ("Calibrate and register a recommended profile") describe them for users.
#include "server/service.h"

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/kv_calib.h"
#include "core/kv_recommend.h"
#include "core/status_macros.h"
#include "server/metrics.h"
#include "server/registry.h"
#include "server/service_internal.h"
#include "server/status_util.h"
#include "server/worker_pool.h"

namespace fibquant::server {
namespace {
namespace v1 = ::fibquant::v1;
using internal::CheckBuildCost;
using internal::Clock;
using internal::FillQualityMetrics;
using internal::SecondsSince;
using internal::UnaryFinisher;
using internal::UnaryNow;

KvQualityBudget BudgetFromProto(const v1::QualityBudget& b) {
  KvQualityBudget out;
  if (b.has_max_logit_mse()) out.max_logit_mse = b.max_logit_mse();
  if (b.has_max_attention_tv()) out.max_attention_tv = b.max_attention_tv();
  if (b.has_max_topk_disagreement()) out.max_topk_disagreement = b.max_topk_disagreement();
  if (b.has_max_value_aggregation_mse()) out.max_value_aggregation_mse = b.max_value_aggregation_mse();
  return out;
}

// Everything RecommendProfile needs after validation (owned copies: the task outlives nothing).
struct RecommendJob {
  KvTensorShape shape;
  std::optional<KvTensorShape> target;
  std::vector<float> values, queries, keys;
  KvRecommendRequest request;  // spans filled in on the worker
};

absl::StatusOr<RecommendJob> ParseRecommend(const v1::RecommendProfileRequest& req, uint64_t max_values) {
  for (const auto& [name, size] : {std::pair<const char*, int>{"keys", req.keys_size()},
                                   {"values", req.values_size()},
                                   {"queries", req.queries_size()}}) {
    if (static_cast<uint64_t>(size) > max_values) {
      return absl::ResourceExhaustedError(absl::StrCat(name, " hold ", size, " values; max_eval_values is ", max_values));
    }
  }
  RecommendJob job;
  const std::string role = req.role().empty() ? "key" : req.role();
  FQ_ASSIGN_OR_RETURN(job.shape.role, ParseKvRole(role));
  const bool key = job.shape.role == KvRole::kKey;
  const uint32_t d = req.head_dim();
  if (d == 0) return absl::InvalidArgumentError("head_dim must be > 0");
  const auto& main = key ? req.keys() : req.values();
  if (main.empty() || main.size() % d != 0) {
    return absl::InvalidArgumentError(absl::StrCat(key ? "keys" : "values", " must be [tokens, head_dim] with tokens > 0; got ",
                                                   main.size(), " values for head_dim ", d));
  }
  const uint32_t tokens = static_cast<uint32_t>(main.size() / d);
  job.shape.attention_kind = KvAttentionKind::kMha;
  job.shape.batch = job.shape.layers = job.shape.kv_heads = job.shape.query_heads = 1;
  job.shape.tokens = tokens;
  job.shape.head_dim = d;
  job.shape.dtype = DType::kF32;
  job.shape.rope_state = key ? KvRopeState::kPostRope : KvRopeState::kNotApplicable;
  FQ_RETURN_IF_ERROR(job.shape.Validate());
  job.values.assign(main.begin(), main.end());
  if (!req.queries().empty()) {
    if (static_cast<uint64_t>(req.queries_size()) != uint64_t{tokens} * d) {
      return absl::InvalidArgumentError(absl::StrCat("queries must be [tokens, head_dim] = ", uint64_t{tokens} * d,
                                                     " values (one per token position); got ", req.queries_size()));
    }
    job.queries.assign(req.queries().begin(), req.queries().end());
  }
  if (!key && !req.keys().empty()) {
    if (req.keys_size() != req.values_size()) return absl::InvalidArgumentError("keys must have the values' size");
    job.keys.assign(req.keys().begin(), req.keys().end());
  }
  if (!req.target_shape_json().empty()) {
    nlohmann::json j = nlohmann::json::parse(req.target_shape_json(), nullptr, false);
    if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("target_shape_json: not a JSON object");
    if (!j.contains("schema_version")) j["schema_version"] = std::string(kKvShapeSchema);
    auto t = KvTensorShape::FromJson(j.dump());
    if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat("target_shape_json: ", t.status().message()));
    if (t->layers != 1 || t->kv_heads != 1) {
      return absl::InvalidArgumentError("target_shape_json: one calibration per head: layers and kv_heads must be 1");
    }
    job.target = *t;
  }
  KvRecommendRequest& r = job.request;
  r.sample_shape = job.shape;
  r.target_shape = job.target;
  r.budget = BudgetFromProto(req.budget());
  r.min_ratio = req.min_ratio();
  if (req.calibration_fraction() != 0) r.calibration_fraction = req.calibration_fraction();
  if (req.tokens_per_page() != 0) r.tokens_per_page = req.tokens_per_page();
  if (!req.profile_id_prefix().empty()) r.profile_id_prefix = req.profile_id_prefix();
  if (req.max_codebook_size() != 0) {
    for (const KvRecommendCandidate& c : DefaultRecommendCandidates()) {
      if (c.codebook_size <= req.max_codebook_size()) r.candidates.push_back(c);
    }
    if (r.candidates.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("max_codebook_size ", req.max_codebook_size(),
                                                     " leaves no candidate (the smallest codebook is 16)"));
    }
  }
  return job;
}

}  // namespace

grpc::ServerUnaryReactor* KvCompressionServiceImpl::RegisterCalibration(grpc::CallbackServerContext* ctx,
                                                                        const v1::RegisterCalibrationRequest* req,
                                                                        v1::RegisterCalibrationResponse* resp) {
  return UnaryNow(metrics_, ctx, "RegisterCalibration", [&]() -> absl::Status {
    if (options_.authorize_admin) FQ_RETURN_IF_ERROR(options_.authorize_admin(*ctx));
    if (draining_.load()) return absl::UnavailableError("server is draining; registrations are refused");
    if (req->calibration_json().size() > (64u << 20)) {
      return absl::ResourceExhaustedError("calibration_json is larger than 64 MiB");
    }
    FQ_ASSIGN_OR_RETURN(KvCalibration c, KvCalibration::FromJson(req->calibration_json()));
    bool inserted = false;
    FQ_ASSIGN_OR_RETURN(auto stored, registry_->InsertCalibration(std::move(c), &inserted));
    resp->set_calibration_digest(stored->digest);
    resp->set_created(inserted);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::GetCalibration(grpc::CallbackServerContext* ctx,
                                                                   const v1::GetCalibrationRequest* req,
                                                                   v1::GetCalibrationResponse* resp) {
  return UnaryNow(metrics_, ctx, "GetCalibration", [&]() -> absl::Status {
    FQ_ASSIGN_OR_RETURN(auto c, registry_->LookupCalibration(req->calibration_digest()));
    resp->set_calibration_json(c->ToJson());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::RecommendProfile(grpc::CallbackServerContext* ctx,
                                                                     const v1::RecommendProfileRequest* req,
                                                                     v1::RecommendProfileResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  const UnaryFinisher finish(metrics_, reactor, "RecommendProfile");
  if (req->store_calibration() && options_.authorize_admin) {
    if (absl::Status auth = options_.authorize_admin(*ctx); !auth.ok()) {
      finish(auth);
      return reactor;
    }
  }
  if (draining_.load()) {
    finish(absl::UnavailableError("server is draining; recommendations (codebook builds) are refused"));
    return reactor;
  }
  auto parsed = ParseRecommend(*req, options_.max_eval_values);
  if (!parsed.ok()) {
    finish(parsed.status());
    return reactor;
  }
  auto job = std::make_shared<RecommendJob>(*std::move(parsed));
  const bool store = req->store_calibration();
  // Candidate codebooks are builds: the build pool (its queue bounds admission), never ahead of pages.
  absl::Status submitted = build_pool_->Submit([this, ctx, resp, finish, job, store](absl::Status pool_status) {
    if (!pool_status.ok()) {
      finish(absl::UnavailableError("server is shutting down"));
      return;
    }
    const auto t0 = Clock::now();
    absl::Status st = [&]() -> absl::Status {
      KvRecommendRequest& r = job->request;
      r.values = job->values;
      r.queries = job->queries;
      r.keys = job->keys;
      r.threads = options_.build_threads;
      r.cancelled = [ctx] { return ctx->IsCancelled(); };
      const uint64_t limit = options_.max_profile_build_cost;
      r.check_profile = [limit](const KvCompressionProfile& p) { return CheckBuildCost(p, limit); };
      FQ_ASSIGN_OR_RETURN(KvRecommendation rec, RecommendKvProfile(r));
      for (const KvRecommendedProfile& p : rec.ranked) {
        v1::RecommendedProfile* o = resp->add_candidates();
        o->set_profile_id(p.profile_id);
        o->set_spec_json(p.spec_json);
        o->set_compression_ratio(p.measurement.compression_ratio);
        o->set_bits_per_value(p.measurement.bits_per_value);
        FillQualityMetrics(p.measurement.mean, o->mutable_mean());
        FillQualityMetrics(p.measurement.max, o->mutable_max());
        o->set_meets_budget(p.measurement.meets_budget);
        o->set_qualifies(p.qualifies);
        o->set_reason(p.reason);
        o->set_block_dim(p.candidate.block_dim);
        o->set_codebook_size(p.candidate.codebook_size);
        o->set_calibrated(p.candidate.calibrated);
        o->set_centering(std::string(KvCenteringName(p.candidate.centering)));
        o->set_renormalize(p.candidate.renormalize);
      }
      resp->set_best_index(rec.best ? static_cast<int32_t>(*rec.best) : -1);
      resp->set_summary(rec.summary);
      resp->set_calibration_digest(rec.calibration.digest);
      resp->set_calibration_json(rec.calibration.ToJson());
      resp->set_calibration_tokens(rec.calibration_tokens);
      resp->set_evaluation_tokens(rec.evaluation_tokens);
      if (store) {
        bool inserted = false;
        FQ_RETURN_IF_ERROR(registry_->InsertCalibration(std::move(rec.calibration), &inserted).status());
        resp->set_calibration_stored(true);
      }
      resp->set_seconds(SecondsSince(t0));
      return absl::OkStatus();
    }();
    finish(st);
  });
  if (!submitted.ok()) finish(submitted);
  return reactor;
}

}  // namespace fibquant::server
