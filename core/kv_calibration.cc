#include "core/kv_calibration.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/digest.h"
#include "core/kv_internal.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

using kv_internal::S;

absl::Status CheckValues(const KvTensorShape& shape, absl::Span<const float> values, const char* what) {
  FQ_RETURN_IF_ERROR(shape.Validate());
  if (values.size() != shape.element_count()) {
    return absl::InvalidArgumentError(absl::StrCat("calibration: ", what, " must have ", shape.element_count(),
                                                   " f32 elements (the shape); got ", values.size()));
  }
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      return absl::InvalidArgumentError(absl::StrCat("calibration: ", what, "[", i, "] is not finite"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string KvCalibrationSummary::CanonicalBytes() const {
  CanonicalWriter w(kKvCalibrationSchema);
  w.Str(schema_version);
  w.Str(shape_digest);
  w.Str(source_digest);
  w.Str(KvRoleName(role));
  w.U64(vector_count);
  w.F64(mean_norm);
  w.F64(max_norm);
  w.F64(outlier_norm_threshold);
  w.U64(outlier_count);
  w.F64(channel_outlier_ratio);
  w.Str(KvAxisPolicyName(recommended_axis));
  w.U32(recommended_first_tokens_raw);
  w.U32(recommended_last_tokens_raw);
  return w.bytes();
}

std::string KvCalibrationSummary::ToJson(int indent) const {
  nlohmann::ordered_json j;
  j["schema_version"] = schema_version;
  j["shape_digest"] = shape_digest;
  j["source_digest"] = source_digest;
  j["role"] = S(KvRoleName(role));
  j["vector_count"] = vector_count;
  j["mean_norm"] = mean_norm;
  j["max_norm"] = max_norm;
  j["outlier_norm_threshold"] = outlier_norm_threshold;
  j["outlier_count"] = outlier_count;
  j["channel_outlier_ratio"] = channel_outlier_ratio;
  j["recommended_axis"] = S(KvAxisPolicyName(recommended_axis));
  j["recommended_first_tokens_raw"] = recommended_first_tokens_raw;
  j["recommended_last_tokens_raw"] = recommended_last_tokens_raw;
  j["digest"] = digest;
  return j.dump(indent);
}

absl::StatusOr<KvCalibrationSummary> CalibrateKv(const KvTensorShape& shape, absl::Span<const float> values,
                                                 double outlier_norm_threshold) {
  FQ_RETURN_IF_ERROR(CheckValues(shape, values, "values"));
  if (!std::isfinite(outlier_norm_threshold) || outlier_norm_threshold < 0) {
    return absl::InvalidArgumentError(absl::StrCat("calibration: outlier_norm_threshold must be finite and >= 0; got ",
                                                   outlier_norm_threshold));
  }
  KvCalibrationSummary s;
  FQ_ASSIGN_OR_RETURN(s.shape_digest, shape.Digest());
  {
    CanonicalWriter w("fq_kv_calibration_source_v1");
    w.U64(values.size());
    Sha256Hasher h;
    h.Update(w.bytes());
    std::vector<uint8_t> le(values.size() * 4);
    FromFloat(DType::kF32, values.data(), values.size(), le.data());
    h.Update(le.data(), le.size());
    s.source_digest = h.Finish();
  }
  s.role = shape.role;
  s.outlier_norm_threshold = outlier_norm_threshold;
  const uint32_t D = shape.head_dim;
  const uint64_t n = shape.vector_count();
  s.vector_count = n;
  std::vector<double> absmax(D, 0.0);
  double sum = 0;
  for (uint64_t v = 0; v < n; ++v) {
    const float* x = values.data() + v * D;
    double sq = 0;
    for (uint32_t c = 0; c < D; ++c) {
      sq += double{x[c]} * double{x[c]};
      absmax[c] = std::max(absmax[c], std::fabs(double{x[c]}));
    }
    const double norm = std::sqrt(sq);
    sum += norm;
    s.max_norm = std::max(s.max_norm, norm);
    if (norm > outlier_norm_threshold) ++s.outlier_count;
  }
  s.mean_norm = sum / static_cast<double>(n);
  std::vector<double> sorted = absmax;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[(D - 1) / 2];
  const double mx = sorted.back();
  if (median > 0) {
    s.channel_outlier_ratio = mx / median;
  } else {
    s.channel_outlier_ratio = mx > 0 ? std::numeric_limits<double>::max() : 1.0;
  }
  // KIVI: keys carry fixed outlier channels (quantize per channel), values do not (per token).
  s.recommended_axis = shape.role == KvRole::kKey ? KvAxisPolicy::kPerChannel : KvAxisPolicy::kPerToken;
  s.recommended_first_tokens_raw = 0;
  s.recommended_last_tokens_raw = std::min<uint32_t>(1, shape.tokens);
  s.digest = Sha256Digest(s.CanonicalBytes());
  return s;
}

absl::StatusOr<KvProfileSelection> SelectKvProfile(const std::vector<std::shared_ptr<const KvCodec>>& candidates,
                                                   const KvTensorShape& shape, absl::Span<const float> values,
                                                   absl::Span<const float> queries, absl::Span<const float> keys,
                                                   const KvQualityBudget& budget) {
  if (candidates.empty()) return absl::InvalidArgumentError("SelectKvProfile: no candidates");
  FQ_RETURN_IF_ERROR(CheckValues(shape, values, "values"));
  if (!keys.empty()) {
    if (shape.role != KvRole::kValue) return absl::InvalidArgumentError("SelectKvProfile: keys only for value shapes");
    FQ_RETURN_IF_ERROR(CheckValues(shape, keys, "keys"));
  }
  if (queries.size() % shape.head_dim != 0) {
    return absl::InvalidArgumentError("SelectKvProfile: queries must be [n, head_dim] f32");
  }
  const bool key = shape.role == KvRole::kKey;
  if (key && budget.max_value_aggregation_mse) {
    return absl::InvalidArgumentError("SelectKvProfile: max_value_aggregation_mse is not measured on key pages");
  }
  if (!key && (budget.max_logit_mse || budget.max_attention_tv || budget.max_topk_disagreement)) {
    return absl::InvalidArgumentError("SelectKvProfile: logit/attention budgets are not measured on value pages");
  }
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (!candidates[i] || !(candidates[i]->profile().shape == shape)) {
      return absl::InvalidArgumentError(absl::StrCat("SelectKvProfile: candidate ", i, " is not for this shape"));
    }
  }
  KvProfileSelection sel;
  const uint32_t D = shape.head_dim;
  const size_t esize = DTypeSize(shape.dtype);
  for (const auto& codec : candidates) {
    KvCandidateMeasurement m;
    m.profile_id = codec->profile().profile_id;
    m.profile_digest = codec->profile_digest();
    KvQualityAccumulator acc;
    uint64_t bytes_in = 0, bytes_out = 0;
    const uint32_t tpp = codec->profile().page_geometry.tokens_per_page;
    std::vector<uint8_t> data;
    KvCompressOptions opt;
    opt.enforce_budget = false;
    opt.compute_metrics = true;
    for (uint32_t b = 0; b < shape.batch; ++b) {
      for (uint32_t l = 0; l < shape.layers; ++l) {
        for (uint32_t h = 0; h < shape.kv_heads; ++h) {
          for (uint32_t t0 = 0; t0 < shape.tokens; t0 += tpp) {
            KvPageInput in;
            in.coords = {b, l, h, t0, std::min(tpp, shape.tokens - t0)};
            const uint64_t off = shape.VectorOffset(b, l, h, t0);
            const size_t elems = size_t{in.coords.token_count} * D;
            data.resize(elems * esize);
            FromFloat(shape.dtype, values.data() + off, elems, data.data());
            in.dtype = shape.dtype;
            in.data = data;
            in.queries = queries;
            if (!keys.empty()) in.keys = keys.subspan(off, elems);
            FQ_ASSIGN_OR_RETURN(CompressedPage page, codec->CompressPage(in, opt));
            bytes_in += page.input_bytes;
            bytes_out += page.frame.size();
            if (page.metrics) acc.Add(*page.metrics);
          }
        }
      }
    }
    m.bits_per_value = 8.0 * static_cast<double>(bytes_out) / static_cast<double>(shape.element_count());
    m.compression_ratio = static_cast<double>(bytes_in) / static_cast<double>(bytes_out);
    m.mean = acc.Mean();
    m.max = acc.Max();
    m.meets_budget = true;
    auto check = [&](const char* name, const std::optional<double>& limit, const std::optional<double>& v) {
      if (!limit || !m.meets_budget) return;
      const double val = v.value_or(std::numeric_limits<double>::infinity());
      if (!(val <= *limit)) {
        m.meets_budget = false;
        m.failing_metric = name;
        m.failing_value = val;
      }
    };
    check("logit_mse", budget.max_logit_mse, m.max.key_logit_mse);
    check("attention_tv", budget.max_attention_tv, m.max.attention_tv);
    check("topk_disagreement", budget.max_topk_disagreement, m.max.topk_disagreement);
    check("value_aggregation_mse", budget.max_value_aggregation_mse, m.max.value_aggregation_mse);
    sel.measurements.push_back(std::move(m));
  }
  for (size_t i = 0; i < sel.measurements.size(); ++i) {
    const auto& m = sel.measurements[i];
    if (!m.meets_budget) continue;
    if (!sel.chosen || m.bits_per_value < sel.measurements[*sel.chosen].bits_per_value) sel.chosen = i;
  }
  return sel;
}

}  // namespace fibquant
