// Calibration artifact (docs/format/kv.md, "Calibration artifact"): per-(layer, kv_head) channel
// statistics of sample keys or values (and the queries that read them), and the channel transform
// the codec applies before normalisation:
//
//   y = t ⊙ (x − μ)        encode y with FibQuant;     x̂ = ŷ ⊘ t + μ
//
// μ is the static channel mean (keys: softmax-invariant for any query, because q·μ shifts every
// logit of a query by the same amount; values: added back exactly). t is a per-channel scale: with a
// rotation-invariant quantizer the error in y-space is isotropic with energy ∝ E||y||², so the logit
// error E[(q·(k − k̂))²] is ∝ (Σ t_i² σ_i²)(Σ w_i / t_i²) with σ_i² the centred channel variance and
// w_i = E[q_i²]; Cauchy-Schwarz gives the minimum at t_i² = sqrt(w_i) / σ_i ("query_whiten"; values
// use w_i = 1). Scales are normalised to RMS 1 (norm range unchanged on isotropic data).
//
// The artifact is content-addressed: digest = SHA-256 of its canonical bytes (domain
// "fq_kv_calibration_v1"), which a KV profile names in calibration_digest. Everything digested is
// computed with IEEE +, −, ×, ÷ and sqrt in f64 in a fixed order, so replicas agree bit for bit.
// Ownership: the KV engineer. Thread safety: plain value; immutable use is thread-safe.
#ifndef FIBQUANT_CORE_KV_CALIB_H_
#define FIBQUANT_CORE_KV_CALIB_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/kv_shape.h"

namespace fibquant {

inline constexpr std::string_view kKvCalibrationArtifactSchema = "fq_kv_calibration_v1";
// Limit on (layers * kv_heads * head_dim) of one artifact: 16 Mi channels (64 MiB per f32 table).
inline constexpr uint64_t kMaxKvCalibrationChannels = 1ull << 24;

// "none" (t = 1), "query_whiten" (default, see above), "whiten" (per-channel standardisation,
// t_i = 1/σ_i), "query" (query weighting only, t_i = sqrt(w_i)). Before RMS normalisation.
enum class KvCalibScaling : uint8_t { kNone = 0, kQueryWhiten = 1, kWhiten = 2, kQuery = 3 };
std::string_view KvCalibScalingName(KvCalibScaling s);
[[nodiscard]] absl::StatusOr<KvCalibScaling> ParseKvCalibScaling(std::string_view s);

struct KvCalibrationOptions {
  bool center = true;
  KvCalibScaling scaling = KvCalibScaling::kQueryWhiten;
  // A channel is listed as an outlier when its RMS (uncentred) exceeds this multiple of the
  // median channel RMS of its head.
  double outlier_rms_ratio = 4.0;
  friend bool operator==(const KvCalibrationOptions&, const KvCalibrationOptions&) = default;
};

struct KvCalibration {
  std::string schema_version = std::string(kKvCalibrationArtifactSchema);
  KvRole role = KvRole::kKey;
  uint32_t layers = 0, kv_heads = 0, head_dim = 0;
  KvCalibrationOptions options;
  uint64_t sample_vectors = 0;   // per (layer, head) group: vectors seen
  uint64_t sample_queries = 0;   // per (layer, kv_head) group: query vectors seen (0: none)
  // Tables of layers * kv_heads * head_dim f32, index (l * kv_heads + h) * head_dim + c.
  std::vector<float> mean;                 // subtracted before normalisation (zeros when !center)
  std::vector<float> scale;                // t, > 0 (ones for scaling none)
  std::vector<float> channel_sd;           // centred standard deviation
  std::vector<float> query_second_moment;  // E[q_c²] over the group's query heads; empty: no queries
  std::vector<uint32_t> outlier_channels;  // flat table indices, increasing
  std::string digest;                      // "sha256:..." of CanonicalBytes()

  size_t table_size() const { return size_t{layers} * kv_heads * head_dim; }
  // Structural rules: schema, counts > 0, table sizes, finite values, scale > 0, sd >= 0,
  // outlier indices increasing and in range, channels <= kMaxKvCalibrationChannels.
  absl::Status Validate() const;
  std::string CanonicalBytes() const;
  std::string ComputeDigest() const;
  std::string ToJson(int indent = 2) const;
  // Every field required (digest included and recomputed: InvalidArgument on mismatch).
  [[nodiscard]] static absl::StatusOr<KvCalibration> FromJson(std::string_view json);

  // y = t ⊙ (x − μ) for head (layer, kv_head); x̂ = y ⊘ t + μ. head_dim elements each.
  void Forward(uint32_t layer, uint32_t kv_head, const float* x, float* y) const;
  void Inverse(uint32_t layer, uint32_t kv_head, const float* y, float* x) const;
  // Whether this artifact fits a shape (role, layers, kv_heads, head_dim equal).
  absl::Status CheckShape(const KvTensorShape& shape) const;
  friend bool operator==(const KvCalibration&, const KvCalibration&) = default;
};

// Computes an artifact from `values` (the shape, canonical layout [batch, layers, kv_heads, tokens,
// head_dim], f32) and optional `queries` ([batch, layers, query_heads, nq, head_dim] f32, any nq;
// key shapes only; query head g reads kv head g / (query_heads / kv_heads)). Scaling modes that need
// queries fall back to w = 1 without them. InvalidArgument for size mismatches or non-finite input.
[[nodiscard]] absl::StatusOr<KvCalibration> ComputeKvCalibration(const KvTensorShape& shape,
                                                                 absl::Span<const float> values,
                                                                 absl::Span<const float> queries,
                                                                 const KvCalibrationOptions& options);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_CALIB_H_
