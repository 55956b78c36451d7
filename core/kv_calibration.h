// Calibration (docs/format/kv.md, "Calibration"): a summary of sample K or V data (norms, outliers,
// channel outliers, recommended axis and protected tokens) and a profile selector that measures a
// list of candidate codecs on the sample and picks the smallest-rate one meeting a quality budget.
// Ownership: the KV engineer. Thread safety: pure functions over immutable inputs.
#ifndef FIBQUANT_CORE_KV_CALIBRATION_H_
#define FIBQUANT_CORE_KV_CALIBRATION_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/kv_codec.h"

namespace fibquant {

inline constexpr std::string_view kKvCalibrationSchema = "fq_kv_calibration_summary_v1";

struct KvCalibrationSummary {
  std::string schema_version = std::string(kKvCalibrationSchema);
  std::string shape_digest;
  std::string source_digest;  // SHA-256 of the f32 sample bytes (domain "fq_kv_calibration_source_v1")
  KvRole role = KvRole::kKey;
  uint64_t vector_count = 0;
  double mean_norm = 0;
  double max_norm = 0;
  double outlier_norm_threshold = 0;
  uint64_t outlier_count = 0;          // token vectors with norm > threshold
  double channel_outlier_ratio = 0;    // max channel abs-max / median channel abs-max
  KvAxisPolicy recommended_axis = KvAxisPolicy::kPerToken;
  uint32_t recommended_first_tokens_raw = 0;
  uint32_t recommended_last_tokens_raw = 0;
  std::string digest;
  std::string CanonicalBytes() const;
  std::string ToJson(int indent = 2) const;
};

// `values` is the whole shape in canonical layout, f32. InvalidArgument for a size mismatch or
// non-finite value.
[[nodiscard]] absl::StatusOr<KvCalibrationSummary> CalibrateKv(const KvTensorShape& shape,
                                                               absl::Span<const float> values,
                                                               double outlier_norm_threshold);

struct KvCandidateMeasurement {
  std::string profile_id;
  std::string profile_digest;
  double bits_per_value = 0;     // 8 * bytes_out / elements
  double compression_ratio = 0;  // bytes_in / bytes_out (f32 sample treated as the shape dtype)
  KvQualityMetrics mean;
  KvQualityMetrics max;
  bool meets_budget = false;
  std::string failing_metric;    // first budget metric over its limit ("" when it meets)
  double failing_value = 0;
};

struct KvProfileSelection {
  std::optional<size_t> chosen;  // index into candidates; absent if none meets the budget
  std::vector<KvCandidateMeasurement> measurements;  // one per candidate, in input order
};

// Compresses every page of the sample with every candidate (budget not enforced, metrics on) and
// checks the per-page maxima against `budget`; picks the lowest bits_per_value that meets it (ties:
// lowest index). Candidates must share `shape` (InvalidArgument otherwise). `queries` optional
// [n, head_dim] f32 used for every page; `keys` optional (value candidates) in canonical layout.
[[nodiscard]] absl::StatusOr<KvProfileSelection> SelectKvProfile(
    const std::vector<std::shared_ptr<const KvCodec>>& candidates, const KvTensorShape& shape,
    absl::Span<const float> values, absl::Span<const float> queries, absl::Span<const float> keys,
    const KvQualityBudget& budget);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_CALIBRATION_H_
