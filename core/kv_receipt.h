// Compression receipts (docs/format/kv.md, "Receipt"): one per compressed stream of pages, binding
// the profile digests, the source and frame digests, counts, bytes, quality (overall and per
// (layer, kv_head)) and the budget verdicts into one deterministic `sha256:` digest.
//
// Pages are added in stream order; the digest depends on that order and on nothing else (the
// optional recorded time sits outside the digest). Ownership: the KV engineer.
// Thread safety: KvReceiptBuilder is a single-threaded value; KvReceipt is a plain value.
#ifndef FIBQUANT_CORE_KV_RECEIPT_H_
#define FIBQUANT_CORE_KV_RECEIPT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/kv_codec.h"

namespace fibquant {

inline constexpr std::string_view kKvReceiptSchema = "fq_kv_receipt_v1";

struct KvBudgetVerdict {
  std::string metric;
  double limit = 0;
  double worst_value = 0;               // max over pages of the final value
  uint64_t pages_over_before_fallback = 0;
  uint64_t pages_failing = 0;           // final value > limit (0 unless enforcement was off)
  uint64_t pages_measured = 0;          // pages that carried this check
  bool passed = true;                   // pages_failing == 0 and every page measured
  friend bool operator==(const KvBudgetVerdict&, const KvBudgetVerdict&) = default;
};

struct KvLayerHeadQuality {
  uint32_t layer = 0;
  uint32_t kv_head = 0;
  uint64_t pages = 0;
  KvQualityMetrics mean;
  friend bool operator==(const KvLayerHeadQuality&, const KvLayerHeadQuality&) = default;
};

struct KvReceipt {
  std::string schema_version = std::string(kKvReceiptSchema);
  std::string profile_id;
  std::string profile_digest;
  std::string shape_digest;
  std::string fib_profile_digest;
  std::string codebook_digest;
  std::string rotation_digest;
  KvAxisPolicy axis_policy = KvAxisPolicy::kPerToken;
  std::string source_digest;  // over the page source digests in stream order
  std::string frames_digest;  // over the frame digests in stream order
  uint64_t pages = 0;
  uint64_t vectors = 0;
  uint64_t vectors_compressed = 0;
  uint64_t raw_protected = 0;
  uint64_t raw_policy = 0;
  uint64_t raw_encode_fallback = 0;
  uint64_t raw_quality_fallback = 0;
  uint64_t pages_with_quality_fallback = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  double compression_ratio = 0;  // bytes_in / bytes_out (input dtype)
  std::optional<KvQualityMetrics> quality_mean;  // absent when no page had metrics
  std::optional<KvQualityMetrics> quality_max;
  std::vector<KvLayerHeadQuality> layer_head;    // sorted by (layer, kv_head)
  std::vector<KvBudgetVerdict> budget;           // one per budgeted metric
  bool budget_passed = true;
  std::vector<std::string> raw_reasons;          // distinct, first-seen order
  std::string digest;                            // "sha256:" over CanonicalBytes()
  std::optional<int64_t> recorded_unix_seconds;  // not digested

  std::string CanonicalBytes() const;  // domain "fq_kv_receipt_v1"; excludes digest and time
  std::string ToJson(int indent = 2) const;
};

class KvReceiptBuilder {
 public:
  explicit KvReceiptBuilder(std::shared_ptr<const KvCodec> codec);
  // InvalidArgument if the page's frame is not of this codec's profile.
  absl::Status Add(const CompressedPage& page);
  uint64_t pages() const { return receipt_.pages; }
  [[nodiscard]] absl::StatusOr<KvReceipt> Finish(std::optional<int64_t> recorded_unix_seconds = std::nullopt);

 private:
  std::shared_ptr<const KvCodec> codec_;
  KvReceipt receipt_;
  std::string source_concat_;  // raw 32-byte page source digests in order
  std::string frames_concat_;
  KvQualityAccumulator overall_;
  std::map<std::pair<uint32_t, uint32_t>, KvQualityAccumulator> per_head_;
};

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_RECEIPT_H_
