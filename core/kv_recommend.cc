#include "core/kv_recommend.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/codebook.h"
#include "core/kv_codec.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

absl::Status Interrupted(const KvRecommendRequest& r) {
  if (r.cancelled && r.cancelled()) return absl::CancelledError("recommendation cancelled");
  if (r.deadline && std::chrono::steady_clock::now() > *r.deadline) {
    return absl::DeadlineExceededError("recommendation deadline exceeded");
  }
  return absl::OkStatus();
}

// Tokens [t0, t0 + n) of every (batch, layer, head) of a canonical tensor with `heads` heads.
std::vector<float> SliceTokens(absl::Span<const float> x, uint32_t batch, uint32_t layers, uint32_t heads,
                               uint32_t tokens, uint32_t dim, uint32_t t0, uint32_t n) {
  std::vector<float> out;
  out.reserve(size_t{batch} * layers * heads * n * dim);
  for (uint64_t g = 0; g < uint64_t{batch} * layers * heads; ++g) {
    const float* src = x.data() + (g * tokens + t0) * dim;
    out.insert(out.end(), src, src + size_t{n} * dim);
  }
  return out;
}

std::string CandidateId(const std::string& prefix, const KvRecommendCandidate& c) {
  std::string id = absl::StrCat(prefix, ".k", c.block_dim, "n", c.codebook_size);
  if (c.calibrated) absl::StrAppend(&id, ".cal");
  if (c.renormalize) absl::StrAppend(&id, ".renorm");
  if (c.centering == KvCentering::kPage) absl::StrAppend(&id, ".pagemean");
  return id;
}

nlohmann::json SpecFor(const KvRecommendRequest& r, const KvRecommendCandidate& c, const KvTensorShape& shape,
                       const std::string& id, const std::string& calibration_digest) {
  nlohmann::json j;
  j["profile_id"] = id;
  j["shape"] = nlohmann::json::parse(shape.ToJson(-1));
  j["axis_policy"] = "per_token";
  j["tokens_per_page"] = std::min(r.tokens_per_page, shape.tokens);
  j["fibquant"] = {{"block_dim", c.block_dim},
                   {"codebook_size", c.codebook_size},
                   {"seed", r.seed},
                   {"training_samples", r.training_samples},
                   {"lloyd_restarts", r.lloyd_restarts},
                   {"lloyd_iterations", r.lloyd_iterations}};
  if (c.centering != KvCentering::kNone) j["centering"] = std::string(KvCenteringName(c.centering));
  if (c.renormalize) j["renormalize"] = true;
  if (c.calibrated) {
    j["channel_transform"] = "calibration";
    j["calibration_digest"] = calibration_digest;
  }
  return j;
}

}  // namespace

std::vector<KvRecommendCandidate> DefaultRecommendCandidates() {
  std::vector<KvRecommendCandidate> v;
  for (auto [k, n] : std::vector<std::pair<uint32_t, uint32_t>>{
           {8, 256}, {4, 256}, {2, 16}, {2, 64}, {4, 4096}, {2, 256}, {2, 1024}}) {
    v.push_back({k, n, KvCentering::kNone, false});
    v.push_back({k, n, KvCentering::kNone, true});
    if ((k == 4 && (n == 256 || n == 4096)) || (k == 2 && (n == 64 || n == 256))) {
      v.push_back({k, n, KvCentering::kNone, true, true});
    }
  }
  v.push_back({4, 256, KvCentering::kPage, false});
  v.push_back({2, 256, KvCentering::kPage, false});
  return v;
}

absl::StatusOr<KvRecommendation> RecommendKvProfile(const KvRecommendRequest& r) {
  const KvTensorShape& s = r.sample_shape;
  FQ_RETURN_IF_ERROR(s.Validate());
  const uint32_t D = s.head_dim;
  if (r.values.size() != s.element_count()) {
    return absl::InvalidArgumentError(absl::StrCat("recommend: the sample must have ", s.element_count(),
                                                   " f32 values (its shape); got ", r.values.size()));
  }
  if (!(r.calibration_fraction > 0 && r.calibration_fraction < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("recommend: calibration_fraction must be in (0, 1); got ",
                                                   r.calibration_fraction));
  }
  if (s.tokens < 2) return absl::InvalidArgumentError("recommend: the sample needs at least 2 tokens");
  const uint64_t qsize = uint64_t{s.batch} * s.layers * s.query_heads * s.tokens * D;
  if (!r.queries.empty() && r.queries.size() != qsize) {
    return absl::InvalidArgumentError(absl::StrCat("recommend: queries must be [batch, layers, query_heads, ",
                                                   "tokens, head_dim] = ", qsize, " values"));
  }
  if (!r.keys.empty() && (s.role != KvRole::kValue || r.keys.size() != s.element_count())) {
    return absl::InvalidArgumentError("recommend: keys are for value samples and must have the sample's shape");
  }
  if (!std::isfinite(r.min_ratio) || r.min_ratio < 0) {
    return absl::InvalidArgumentError("recommend: min_ratio must be finite and >= 0");
  }
  if (r.tokens_per_page == 0) return absl::InvalidArgumentError("recommend: tokens_per_page must be > 0");
  const std::vector<KvRecommendCandidate> cands = r.candidates.empty() ? DefaultRecommendCandidates() : r.candidates;
  if (cands.size() > kMaxRecommendCandidates) {
    return absl::InvalidArgumentError(absl::StrCat("recommend: at most ", kMaxRecommendCandidates,
                                                   " candidates; got ", cands.size()));
  }
  KvTensorShape target = r.target_shape.value_or(s);
  FQ_RETURN_IF_ERROR(target.Validate());
  if (target.role != s.role || target.layers != s.layers || target.kv_heads != s.kv_heads || target.head_dim != D) {
    return absl::InvalidArgumentError(
        "recommend: target_shape must have the sample's role, layers, kv_heads and head_dim");
  }

  KvRecommendation out;
  const uint32_t tc = std::clamp<uint32_t>(static_cast<uint32_t>(s.tokens * r.calibration_fraction), 1, s.tokens - 1);
  const uint32_t te = s.tokens - tc;
  out.calibration_tokens = tc;
  out.evaluation_tokens = te;
  KvTensorShape cal_shape = s, eval_shape = s;
  cal_shape.tokens = tc;
  eval_shape.tokens = te;
  // Pages are measured in the serving dtype (f32 sample rounded to it), so the ratio and the
  // metrics are those the target profile will see.
  eval_shape.dtype = target.dtype;
  const std::vector<float> cal_x = SliceTokens(r.values, s.batch, s.layers, s.kv_heads, s.tokens, D, 0, tc);
  const std::vector<float> eval_x = SliceTokens(r.values, s.batch, s.layers, s.kv_heads, s.tokens, D, tc, te);
  std::vector<float> cal_q, eval_q, eval_k;
  if (!r.queries.empty()) {
    cal_q = SliceTokens(r.queries, s.batch, s.layers, s.query_heads, s.tokens, D, 0, tc);
    // Held-out queries for the key metrics: every head's held-out queries, strided down to max_queries.
    const std::vector<float> all = SliceTokens(r.queries, s.batch, s.layers, s.query_heads, s.tokens, D, tc, te);
    const size_t n = all.size() / D, keep = std::min<size_t>(n, std::max<uint32_t>(r.max_queries, 1));
    for (size_t i = 0; i < keep; ++i) {
      const size_t src = i * n / keep;
      eval_q.insert(eval_q.end(), all.begin() + static_cast<std::ptrdiff_t>(src * D),
                    all.begin() + static_cast<std::ptrdiff_t>((src + 1) * D));
    }
  }
  if (!r.keys.empty()) eval_k = SliceTokens(r.keys, s.batch, s.layers, s.kv_heads, s.tokens, D, tc, te);
  // Value calibrations weight channels equally (the output error is not query-weighted); value
  // samples use their queries (with keys) for the held-out metrics only.
  FQ_ASSIGN_OR_RETURN(out.calibration,
                      ComputeKvCalibration(cal_shape, cal_x, s.role == KvRole::kKey ? absl::Span<const float>(cal_q)
                                                                                     : absl::Span<const float>(),
                                           r.calibration));
  auto cal = std::make_shared<const KvCalibration>(out.calibration);

  std::map<std::pair<uint32_t, uint32_t>, std::shared_ptr<const Quantizer>> quantizers;
  for (const KvRecommendCandidate& c : cands) {
    FQ_RETURN_IF_ERROR(Interrupted(r));
    KvRecommendedProfile rp;
    rp.candidate = c;
    rp.profile_id = CandidateId(r.profile_id_prefix, c);
    const nlohmann::json eval_spec = SpecFor(r, c, eval_shape, rp.profile_id, cal->digest);
    auto ep = KvCompressionProfile::FromSpecJson(eval_spec.dump());
    if (!ep.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("recommend: candidate ", rp.profile_id, ": ", ep.status().message()));
    }
    if (r.check_profile) {
      absl::Status st = r.check_profile(*ep);
      if (!st.ok()) return absl::Status(st.code(), absl::StrCat("candidate ", rp.profile_id, ": ", st.message()));
    }
    const nlohmann::json target_spec = SpecFor(r, c, target, rp.profile_id, cal->digest);
    {
      auto tp = KvCompressionProfile::FromSpecJson(target_spec.dump());
      if (!tp.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("recommend: candidate ", rp.profile_id, " for the target shape: ",
                                                       tp.status().message()));
      }
    }
    rp.spec_json = target_spec.dump(2);
    auto& q = quantizers[{c.block_dim, c.codebook_size}];
    if (!q) {
      const auto t0 = std::chrono::steady_clock::now();
      FQ_ASSIGN_OR_RETURN(Codebook cb, Codebook::Build(*ep->fib_profile, r.threads));
      FQ_ASSIGN_OR_RETURN(q, Quantizer::Create(std::move(cb)));
      rp.build_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      FQ_RETURN_IF_ERROR(Interrupted(r));
    }
    FQ_ASSIGN_OR_RETURN(std::shared_ptr<const KvCodec> codec, KvCodec::Create(*ep, q, c.calibrated ? cal : nullptr));
    FQ_ASSIGN_OR_RETURN(KvProfileSelection sel,
                        SelectKvProfile({codec}, eval_shape, eval_x, eval_q, eval_k, r.budget));
    rp.measurement = sel.measurements[0];
    rp.measurement.profile_digest.clear();  // the digest of the evaluation-shape profile: not the one to register
    rp.qualifies = rp.measurement.meets_budget && rp.measurement.compression_ratio >= r.min_ratio;
    if (!rp.measurement.meets_budget) {
      rp.reason = absl::StrFormat("%s %.6g over the budget", rp.measurement.failing_metric, rp.measurement.failing_value);
    } else if (!rp.qualifies) {
      rp.reason = absl::StrFormat("ratio %.3f below min_ratio %.3f", rp.measurement.compression_ratio, r.min_ratio);
    }
    out.ranked.push_back(std::move(rp));
  }
  std::stable_sort(out.ranked.begin(), out.ranked.end(), [](const KvRecommendedProfile& a, const KvRecommendedProfile& b) {
    if (a.qualifies != b.qualifies) return a.qualifies;
    if (a.measurement.compression_ratio != b.measurement.compression_ratio) {
      return a.measurement.compression_ratio > b.measurement.compression_ratio;
    }
    return a.measurement.mean.reconstruction_mse < b.measurement.mean.reconstruction_mse;
  });
  if (!out.ranked.empty() && out.ranked[0].qualifies) {
    out.best = 0;
    out.summary = absl::StrFormat("best: %s at %.2fx (vs %s input, frame overhead included) meets the budget",
                                  out.ranked[0].profile_id, out.ranked[0].measurement.compression_ratio,
                                  std::string(DTypeName(target.dtype)));
  } else {
    out.summary = absl::StrCat("no candidate meets the budget", r.min_ratio > 0 ? " and min_ratio" : "", " (",
                               out.ranked.size(), " measured on ", te, " held-out tokens)");
    if (!out.ranked.empty()) {
      // The highest-ratio candidate that meets the budget, else the one closest to it.
      const KvRecommendedProfile* closest = nullptr;
      for (const auto& c : out.ranked) {
        if (c.measurement.meets_budget) {
          closest = &c;
          break;
        }
      }
      if (closest) {
        absl::StrAppend(&out.summary, absl::StrFormat("; the best within the budget, %s, reaches only %.2fx",
                                                      closest->profile_id, closest->measurement.compression_ratio));
      } else {
        absl::StrAppend(&out.summary, "; lowest-rate candidate fails with ", out.ranked.back().reason,
                        "; highest-quality measured: ");
        const KvRecommendedProfile* bestq = &out.ranked[0];
        for (const auto& c : out.ranked) {
          if (c.measurement.mean.reconstruction_mse < bestq->measurement.mean.reconstruction_mse) bestq = &c;
        }
        absl::StrAppend(&out.summary, bestq->profile_id, " (", bestq->reason, ")");
      }
    }
  }
  return out;
}

}  // namespace fibquant
