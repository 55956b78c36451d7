// Profile recommendation (docs/format/kv.md, "Profile recommendation"): calibrate on the first part
// of a sample, measure candidate profiles on the held-out rest, rank them, mark the best one that
// meets the quality budget and the minimum ratio. The measured profiles are ready to register (their
// spec JSON targets the caller's serving shape; the calibration artifact comes with them).
//
// Cost is bounded by the request: at most kMaxRecommendCandidates candidates, each built with the
// given codebook training limits; a deadline and a cancel flag are checked between candidates and
// pages (Cancelled / DeadlineExceeded). Ownership: the KV engineer. Thread safety: a pure function
// of its inputs; the cancel flag may be set from another thread.
#ifndef FIBQUANT_CORE_KV_RECOMMEND_H_
#define FIBQUANT_CORE_KV_RECOMMEND_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/kv_calib.h"
#include "core/kv_calibration.h"
#include "core/kv_profile.h"

namespace fibquant {

inline constexpr size_t kMaxRecommendCandidates = 64;

struct KvRecommendCandidate {
  uint32_t block_dim = 0, codebook_size = 0;
  KvCentering centering = KvCentering::kNone;
  bool calibrated = false;  // channel_transform "calibration" with the request's artifact
  bool renormalize = false;
  friend bool operator==(const KvRecommendCandidate&, const KvRecommendCandidate&) = default;
};

// The default grid: (k, N) in {(8,256), (4,256), (2,16), (2,64), (4,4096), (2,256), (2,1024)}, each
// oblivious and calibrated, calibrated + renormalize at (4,256), (2,64), (4,4096), (2,256), plus page
// centering at (4,256) and (2,256): 20 candidates.
std::vector<KvRecommendCandidate> DefaultRecommendCandidates();

struct KvRecommendRequest {
  KvTensorShape sample_shape;            // role, heads, head_dim, tokens of the sample
  absl::Span<const float> values;        // the sample, canonical layout, f32
  // Optional [batch, layers, query_heads, tokens, head_dim]: keys use them for calibration and the
  // metrics, values (with `keys`) for the attention weights of the metrics.
  absl::Span<const float> queries;
  absl::Span<const float> keys;          // values: optional keys of the sample (canonical layout)
  std::optional<KvTensorShape> target_shape;  // the serving shape the profiles are for (default: sample)
  KvQualityBudget budget;                // per held-out page (max over pages)
  double min_ratio = 0;                  // candidates below it do not qualify
  double calibration_fraction = 0.5;     // first tokens calibrate, the rest evaluate; in (0, 1)
  uint32_t tokens_per_page = 128;        // clamped to the held-out tokens
  std::string profile_id_prefix = "recommended";
  uint64_t seed = 20260512;
  uint32_t training_samples = 1u << 15;  // codebook training per candidate
  uint32_t lloyd_restarts = 2, lloyd_iterations = 15;
  uint32_t max_queries = 256;            // held-out queries per page used for the key metrics
  KvCalibrationOptions calibration;
  std::vector<KvRecommendCandidate> candidates;  // empty: DefaultRecommendCandidates()
  int threads = 1;                               // codebook build threads
  std::optional<std::chrono::steady_clock::time_point> deadline;
  std::function<bool()> cancelled;  // polled between candidates (e.g. the RPC's IsCancelled)
  // Called with each candidate's profile before its codebook is built (e.g. a server's build-cost
  // limit); an error fails the recommendation with that status, prefixed with the candidate id.
  std::function<absl::Status(const KvCompressionProfile&)> check_profile;
};

struct KvRecommendedProfile {
  KvRecommendCandidate candidate;
  std::string spec_json;  // FromSpecJson form for the target shape, ready to register
  std::string profile_id;
  KvCandidateMeasurement measurement;  // on the held-out pages (compression_ratio, bits, metrics)
  bool qualifies = false;              // meets the budget and min_ratio
  std::string reason;                  // why not ("" when it qualifies)
  double build_seconds = 0;
};

struct KvRecommendation {
  KvCalibration calibration;                  // computed on the calibration tokens
  uint32_t calibration_tokens = 0, evaluation_tokens = 0;
  std::vector<KvRecommendedProfile> ranked;   // qualifying first (highest ratio first), then the rest
  std::optional<size_t> best;                 // index into ranked (0) when any candidate qualifies
  std::string summary;                        // one line for people (also when nothing qualifies)
};

// InvalidArgument for a bad request (sizes, fraction, budget metric the role cannot measure, a
// candidate profile that does not validate); Cancelled / DeadlineExceeded as above. A budget no
// candidate meets is not an error: `best` is empty and `summary` says which metric failed.
[[nodiscard]] absl::StatusOr<KvRecommendation> RecommendKvProfile(const KvRecommendRequest& request);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_RECOMMEND_H_
