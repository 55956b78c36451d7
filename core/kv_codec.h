// The compiled KV codec: a validated, resolved KvCompressionProfile plus its shared FibQuant
// Quantizer. Compresses one page = one (batch, layer, kv_head) token span `[token_count, head_dim]`
// into a binary frame (core/kv_frame.h), measures quality, enforces the budget, and decodes frames
// (whole page, or one vector in O(1)).
//
// Building the codebook is the expensive part: servers build a Quantizer on their own pool (or take
// it from a cache keyed by codebook digest) and pass it to Create(). Thread safety: a KvCodec is
// immutable after creation; every method is const and may run concurrently from many threads.
// Ownership: the KV engineer.
#ifndef FIBQUANT_CORE_KV_CODEC_H_
#define FIBQUANT_CORE_KV_CODEC_H_

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/codec.h"
#include "core/kv_calib.h"
#include "core/kv_frame.h"
#include "core/kv_metrics.h"
#include "core/kv_profile.h"

namespace fibquant {

struct KvPageInput {
  KvPageCoords coords;
  DType dtype = DType::kF32;            // of `data`
  absl::Span<const uint8_t> data;       // [token_count, head_dim] elements of dtype, little-endian
  absl::Span<const float> queries;      // optional [n_queries, head_dim] f32 (attention metrics)
  // Value pages only, optional: the page's keys [token_count, head_dim] f32; with queries the
  // value-aggregation metric uses softmax(q.k/sqrt(d)) instead of the self-values proxy.
  absl::Span<const float> keys;
};

struct KvCompressOptions {
  bool compute_metrics = true;  // forced on when the profile has a quality budget and enforce_budget
  bool enforce_budget = true;   // false: measure and report only (used by calibration)
  CodecPath path = CodecPath::kFast;
  uint32_t top_k = kDefaultTopK;
};

// Outcome of one budget metric on one page.
struct KvBudgetCheck {
  std::string metric;  // "logit_mse", "attention_tv", "topk_disagreement", "value_aggregation_mse"
  double limit = 0;
  double value = 0;           // final (after any fallback)
  double value_before = 0;    // before fallback
  bool passed = true;         // final value <= limit
  friend bool operator==(const KvBudgetCheck&, const KvBudgetCheck&) = default;
};

struct CompressedPage {
  KvPageCoords coords;
  DType input_dtype = DType::kF32;
  std::string frame;
  KvPageCounts counts;
  uint64_t input_bytes = 0;
  std::optional<KvQualityMetrics> metrics;                  // of what the frame stores
  std::optional<KvQualityMetrics> metrics_before_fallback;  // set when budget fallback ran
  std::vector<KvBudgetCheck> budget_checks;                 // one per budgeted metric
  std::vector<std::string> raw_reasons;                     // distinct, first-seen order
  std::array<uint8_t, 32> source_digest{};  // SHA-256 of the page input (docs/format/kv.md)
  std::array<uint8_t, 32> frame_digest{};   // SHA-256 of `frame`
};

struct DecodedPage {
  KvPageCoords coords;
  DType dtype = DType::kF32;
  std::vector<uint8_t> data;  // [token_count, head_dim] of dtype, whatever the frame's axis
  KvPageCounts counts;
};

class KvCodec {
 public:
  // `quantizer` must be null for the raw axis policy, else match the profile: fib profile equal,
  // codebook/rotation digests equal when the profile has them (InvalidArgument naming the field),
  // else filled in from the quantizer (resolving a spec profile). Then ValidateDeep-equivalent.
  // `calibration` is required iff channel_transform is "calibration": its digest must equal the
  // profile's calibration_digest and it must fit the shape (InvalidArgument otherwise).
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const KvCodec>> Create(
      KvCompressionProfile profile, std::shared_ptr<const Quantizer> quantizer,
      std::shared_ptr<const KvCalibration> calibration = nullptr);
  // Builds the codebook (Codebook::Build with `threads`) and calls Create.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const KvCodec>> Build(
      KvCompressionProfile profile, int threads = 0, const CancelToken* cancel = nullptr,
      std::shared_ptr<const KvCalibration> calibration = nullptr);

  const KvCompressionProfile& profile() const { return profile_; }
  const std::string& profile_digest() const { return digest_; }
  const std::array<uint8_t, 32>& profile_digest_raw() const { return digest_raw_; }
  const std::shared_ptr<const Quantizer>& quantizer() const { return quantizer_; }
  const std::shared_ptr<const KvCalibration>& calibration() const { return calibration_; }
  KvVectorAxis vector_axis() const { return profile_.vector_axis(); }

  // Coordinates on the page grid of the shape: batch/layer/kv_head in range, token_start a
  // multiple of tokens_per_page, token_count == min(tokens_per_page, tokens - token_start).
  // OutOfRange for an index outside the shape, InvalidArgument for an off-grid span.
  absl::Status CheckCoords(const KvPageCoords& c) const;

  // Compress one page. InvalidArgument for an input dtype other than the shape's, a bad data,
  // query or key size, off-grid coordinates or a non-finite element (OutOfRange for coordinates
  // outside the shape); under fallback fail_closed a vector that cannot be encoded fails the page
  // with the codec's status; FailedPrecondition "quality budget violated: <metric>
  // <value> > <limit> on page (b, l, h, tokens [s, e))" when the budget fails under fail_closed.
  [[nodiscard]] absl::StatusOr<CompressedPage> CompressPage(const KvPageInput& input,
                                                            const KvCompressOptions& options = {}) const;

  // Verifies the frame completely (ParseKvFrame, profile digest (InvalidArgument: frame of another
  // profile), code stride, coordinates and page grid, axis, vector_len, protected vectors raw and
  // counted, code contents) and decodes it to [token_count, head_dim] of `out`. DataLoss for a
  // corrupt frame.
  [[nodiscard]] absl::StatusOr<DecodedPage> DecodeFrame(absl::Span<const uint8_t> frame, DType out,
                                                        CodecPath path = CodecPath::kFast) const;
  // The same decode with the page's bytes written into *data (resized to token_count * head_dim *
  // DTypeSize(out); the returned page's `data` is empty): a server decodes straight into the
  // response's bytes field instead of copying the page there. Byte-identical to DecodeFrame; on an
  // error *data is unspecified.
  [[nodiscard]] absl::StatusOr<DecodedPage> DecodeFrameInto(absl::Span<const uint8_t> frame, DType out,
                                                            std::string* data,
                                                            CodecPath path = CodecPath::kFast) const;
  // Decodes vector `index` only (a token [head_dim] on the token axis, a channel [token_count] on
  // the channel axis) after the same frame checks (header, checksum, counts, protection); the
  // decode itself reads only that vector's code or raw bytes (rank = bitmap popcount).
  // OutOfRange when index >= vector_count.
  [[nodiscard]] absl::StatusOr<std::vector<uint8_t>> DecodeVector(absl::Span<const uint8_t> frame,
                                                                  uint32_t index, DType out,
                                                                  CodecPath path = CodecPath::kFast) const;

 private:
  KvCodec() = default;
  absl::StatusOr<KvFrameView> VerifyFrame(absl::Span<const uint8_t> frame) const;
  // The frame's mean section as floats (empty when not centred).
  std::vector<float> FrameMean(const KvFrameView& v) const;
  // DecodeFrame's body after VerifyFrame: writes the page into dst (token_count * head_dim
  // elements of `out`).
  absl::Status DecodeVerified(const KvFrameView& v, DType out, uint8_t* dst, CodecPath path) const;
  // Decoded token vectors y [count, head_dim] back to data space: rescaled to their stored norm
  // (renormalize; `codes` are their codes, code_bytes each), + page mean, then the calibration's
  // inverse transform (each only when the profile has it).
  void UndoTransform(const KvPageCoords& coords, const float* page_mean, const uint8_t* codes, float* y,
                     size_t count) const;
  KvCompressionProfile profile_;
  std::string digest_;
  std::array<uint8_t, 32> digest_raw_{};
  std::shared_ptr<const Quantizer> quantizer_;
  std::shared_ptr<const KvCalibration> calibration_;  // set iff channel_transform == calibration
};

// SHA-256 of one page input's canonical bytes (domain "fq_kv_source_page_v1").
std::array<uint8_t, 32> KvPageSourceDigest(const KvPageCoords& coords, DType dtype,
                                           absl::Span<const uint8_t> data);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_CODEC_H_
