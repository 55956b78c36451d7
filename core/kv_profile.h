// KV compression profile (docs/format/kv.md, "KV compression profile"): everything that decides how
// one role (keys or values) of one KV tensor is compressed — shape, embedded FibQuant profile and its
// codebook/rotation digests, axis policy, page geometry, protected regions, fallback, quality budget.
//
// Two JSON forms: a short *spec* for people (FromSpecJson: FibQuant parameters without digests; the
// codebook/rotation digests are filled in when a KvCodec is built) and the full form (ToJson/FromJson,
// every field, round-trips exactly). Only a resolved profile (digests present) has a digest.
// Ownership: the KV engineer. Thread safety: plain value; immutable use is thread-safe.
#ifndef FIBQUANT_CORE_KV_PROFILE_H_
#define FIBQUANT_CORE_KV_PROFILE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/kv_shape.h"
#include "core/profile.h"

namespace fibquant {

inline constexpr std::string_view kKvProfileSchema = "fq_kv_compression_profile_v1";
inline constexpr std::string_view kMissingCalibration = "missing:calibration";
inline constexpr size_t kMaxKvProfileIdLength = 256;
inline constexpr size_t kMaxKvProtectedListLength = 65536;

enum class KvFallbackMode : uint8_t { kKeepRaw = 0, kFailClosed = 1 };  // "keep_raw", "fail_closed"
std::string_view KvFallbackModeName(KvFallbackMode v);
[[nodiscard]] absl::StatusOr<KvFallbackMode> ParseKvFallbackMode(std::string_view s);

// Vector (l, h, t) is protected (stored raw) iff t < first_tokens_raw, or
// t + last_tokens_raw >= shape.tokens, or l in raw_layers, or h in raw_heads. Batch is ignored.
struct KvProtectedPolicy {
  uint32_t first_tokens_raw = 0;
  uint32_t last_tokens_raw = 0;
  std::vector<uint32_t> raw_layers;  // strictly increasing (canonical), each < shape.layers
  std::vector<uint32_t> raw_heads;   // strictly increasing, each < shape.kv_heads
  bool IsProtected(const KvTensorShape& shape, uint32_t layer, uint32_t head, uint32_t token) const;
  bool ProtectsHead(uint32_t layer, uint32_t head) const;
  friend bool operator==(const KvProtectedPolicy&, const KvProtectedPolicy&) = default;
};

// What happens when a vector cannot be encoded (zero / non-finite / out-of-fp16-range norm):
// keep_raw stores it raw (needs raw_fallback_available), fail_closed fails the page.
struct KvFallbackPolicy {
  KvFallbackMode mode = KvFallbackMode::kKeepRaw;
  bool raw_fallback_available = true;
  friend bool operator==(const KvFallbackPolicy&, const KvFallbackPolicy&) = default;
};

// Per-page limits; a page passes a metric when value <= limit (exactly at the limit passes).
// Key profiles measure logit/attention metrics; value profiles measure value aggregation
// (docs/format/kv.md, "Quality metrics"); a limit the role cannot measure is InvalidArgument.
struct KvQualityBudget {
  std::optional<double> max_logit_mse;
  std::optional<double> max_attention_tv;
  std::optional<double> max_topk_disagreement;
  std::optional<double> max_value_aggregation_mse;
  KvFallbackMode fallback_on_violation = KvFallbackMode::kKeepRaw;
  // k of the top-k attention agreement (max_topk_disagreement) for every verdict on this profile:
  // CompressPages and EvaluateQuality both use it, so the two never judge one profile with
  // different settings. Unset: 8 (kDefaultTopK). Digested only when set, so profiles without it
  // keep their digests. In [1, 4096].
  std::optional<uint32_t> top_k;
  bool has_any_metric() const {
    return max_logit_mse || max_attention_tv || max_topk_disagreement || max_value_aggregation_mse;
  }
  friend bool operator==(const KvQualityBudget&, const KvQualityBudget&) = default;
};

// Centering (docs/format/kv.md, "Centering and calibration"): "none", or "page" = subtract the
// page's channel mean (over its coded token vectors, after any calibration transform) before
// normalisation and store it in the frame (flag bit 1, frame version 2). Token axis only.
enum class KvCentering : uint8_t { kNone = 0, kPage = 1 };
std::string_view KvCenteringName(KvCentering v);
[[nodiscard]] absl::StatusOr<KvCentering> ParseKvCentering(std::string_view s);
// "none", or "calibration" = apply the calibration artifact named by calibration_digest
// (core/kv_calib.h: static channel mean and scale) to every coded token vector. Token axis only.
enum class KvChannelTransform : uint8_t { kNone = 0, kCalibration = 1 };
std::string_view KvChannelTransformName(KvChannelTransform v);
[[nodiscard]] absl::StatusOr<KvChannelTransform> ParseKvChannelTransform(std::string_view s);

struct KvCompressionProfile {
  std::string schema_version = std::string(kKvProfileSchema);
  std::string profile_id;
  KvTensorShape shape;
  std::string shape_digest;
  // Absent iff axis_policy == raw. ambient_dim == head_dim (token axis) or tokens_per_page
  // (channel axis).
  std::optional<Profile> fib_profile;
  std::string fib_profile_digest;  // "" iff no fib_profile
  std::string codebook_digest;     // "" = unresolved (spec form); never set for raw
  std::string rotation_digest;     // "" = unresolved
  KvRole role_policy = KvRole::kKey;
  KvAxisPolicy axis_policy = KvAxisPolicy::kPerToken;
  KvPageGeometry page_geometry;
  KvProtectedPolicy protected_policy;
  KvFallbackPolicy fallback_policy;
  KvQualityBudget quality_budget;
  std::string calibration_digest = std::string(kMissingCalibration);
  // Both optional in JSON and only digested when not "none", so older profiles keep their digests.
  KvCentering centering = KvCentering::kNone;
  KvChannelTransform channel_transform = KvChannelTransform::kNone;
  // Rescale each decoded direction to unit norm before applying the stored norm (token axis only;
  // docs/format/kv.md §11). Optional in JSON ("renormalize"), digested only when true.
  bool renormalize = false;

  KvVectorAxis vector_axis() const { return ResolveVectorAxis(axis_policy, shape.role); }
  bool resolved() const { return axis_policy == KvAxisPolicy::kRaw || !codebook_digest.empty(); }

  // Every rule of docs/format/kv.md "Validation" in order (shape, ids, role, fib profile and its
  // recomputed digest, ambient_dim vs axis, digest syntax, geometry and
  // encoded_vector_bytes == code_bytes, protected regions in range, fallback (keep_raw needs
  // raw_fallback_available and reserved_vector_bytes >= raw_vector_bytes), budget finite, >= 0
  // and measurable for the role, calibration digest syntax). Unresolved profiles are valid.
  absl::Status Validate() const;
  // Validate() plus the rotation digest recomputed from the fib profile (builds the rotation).
  absl::Status ValidateDeep() const;

  // Canonical bytes (domain "fq_kv_compression_profile_v1") and "sha256:" digest. Resolved, valid
  // profiles only (FailedPrecondition for an unresolved one).
  [[nodiscard]] absl::StatusOr<std::string> CanonicalBytes() const;
  [[nodiscard]] absl::StatusOr<std::string> Digest() const;

  std::string ToJson(int indent = 2) const;
  // Full form: every field required, unknown fields rejected, digests compared with recomputed
  // ones (InvalidArgument naming the field on mismatch), then Validate().
  [[nodiscard]] static absl::StatusOr<KvCompressionProfile> FromJson(std::string_view json);
  // Short form for people (docs/format/kv.md "Spec JSON"): profile_id, shape, axis_policy,
  // tokens_per_page, and either "fibquant" {block_dim, codebook_size, seed, optional
  // rotation_algorithm, training_samples, lloyd_restarts, lloyd_iterations} or a full
  // "fib_profile"; optional protected, fallback, quality_budget, reserved_vector_bytes,
  // calibration_digest. Returns a validated, unresolved profile.
  [[nodiscard]] static absl::StatusOr<KvCompressionProfile> FromSpecJson(std::string_view json);

  friend bool operator==(const KvCompressionProfile&, const KvCompressionProfile&) = default;
};

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_PROFILE_H_
