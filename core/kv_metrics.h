// Attention-quality metrics of a compressed KV page (docs/format/kv.md, "Quality metrics"): how much
// a reconstruction changes attention logits, probabilities, top-k sets and value aggregation, plus
// an accumulator that aggregates pages per (layer, kv_head) and overall.
//
// Arithmetic: f64 accumulation in a fixed order, softmax exp and KL log via PortableExp/PortableLog,
// so metrics (which receipts digest) are bit-identical on every x86-64 CPU for the same inputs.
// Ownership: the KV engineer. Thread safety: pure functions; the accumulator is a single-threaded value.
#ifndef FIBQUANT_CORE_KV_METRICS_H_
#define FIBQUANT_CORE_KV_METRICS_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/kv_shape.h"

namespace fibquant {

// Where the attention queries of a metric came from.
enum class KvQuerySource : uint8_t {
  kNone = 0,              // "none": metrics not computed
  kCaller = 1,            // "caller_queries": queries (and, for value pages, keys) given by the caller
  kProxySelfKeys = 2,     // "proxy_self_keys": key page; the page's original keys are the queries
  kProxySelfValues = 3,   // "proxy_self_values": value page; attention softmax(V V^T / sqrt(d))
                          //  from the original values (as queries and keys) weights both aggregations
};
std::string_view KvQuerySourceName(KvQuerySource v);

// Maximum queries used per page; proxies use the first min(token_count, kMaxProxyQueries) tokens.
inline constexpr uint32_t kMaxProxyQueries = 64;
inline constexpr uint32_t kDefaultTopK = 8;

struct KvQualityMetrics {
  uint64_t tokens = 0;      // weight in aggregation
  uint32_t queries = 0;
  KvQuerySource query_source = KvQuerySource::kNone;
  double reconstruction_mse = 0;  // mean over all elements of (x - x^)^2
  double cosine_similarity = 0;   // cos of the flattened page (1 if both are zero)
  // Key pages (averaged over queries):
  std::optional<double> key_logit_mse;        // mean_t (l_t - l^_t)^2, l = q.k/sqrt(d)
  std::optional<double> attention_tv;         // 1/2 sum_t |p_t - p^_t|
  std::optional<double> attention_kl;         // sum_t p'_t ln(p'_t/p^'_t), both clamped at 1e-12
                                              // (ln p from the logits when both >= 1e-12)
  std::optional<double> topk_disagreement;    // 1 - |TopK(l) ∩ TopK(l^)| / k'
  // Value pages: mean over queries and dims of (sum_t p_t v_t - sum_t p_t v^_t)^2.
  std::optional<double> value_aggregation_mse;
  friend bool operator==(const KvQualityMetrics&, const KvQualityMetrics&) = default;
};

// Key page: keys / keys_hat are [tokens, dim]; queries [n_queries, dim] (n_queries = 0: proxy
// self keys). InvalidArgument for empty inputs, non-finite values or a zero dim.
[[nodiscard]] absl::StatusOr<KvQualityMetrics> EvaluateKeyQuality(const float* keys, const float* keys_hat,
                                                                  size_t tokens, size_t dim,
                                                                  const float* queries, size_t n_queries,
                                                                  uint32_t top_k = kDefaultTopK);
// Value page: values / values_hat are [tokens, dim]; with queries [n_queries, dim] AND keys
// [tokens, dim] the attention is softmax(q.k/sqrt(d)) (caller); otherwise the self-values proxy.
[[nodiscard]] absl::StatusOr<KvQualityMetrics> EvaluateValueQuality(const float* values,
                                                                    const float* values_hat, size_t tokens,
                                                                    size_t dim, const float* queries,
                                                                    size_t n_queries, const float* keys);
// Dispatch on role.
[[nodiscard]] absl::StatusOr<KvQualityMetrics> EvaluateQuality(KvRole role, const float* original,
                                                               const float* reconstructed, size_t tokens,
                                                               size_t dim, const float* queries,
                                                               size_t n_queries, const float* keys,
                                                               uint32_t top_k = kDefaultTopK);

// The original side of a page's metrics computed once (queries, original logits, attention,
// top-k sets, value aggregations), so many reconstructions of the same page can be measured cheaply
// (the quality-budget fallback search measures several). Evaluate() gives bit-identical results to
// the free functions above. Thread safety: immutable after Create; Evaluate is const.
class KvQualityEvaluator {
 public:
  [[nodiscard]] static absl::StatusOr<KvQualityEvaluator> Create(KvRole role, const float* original, size_t tokens,
                                                                 size_t dim, const float* queries, size_t n_queries,
                                                                 const float* keys, uint32_t top_k = kDefaultTopK);
  [[nodiscard]] absl::StatusOr<KvQualityMetrics> Evaluate(const float* reconstructed) const;

 private:
  KvQualityEvaluator() = default;
  KvRole role_ = KvRole::kKey;
  const float* original_ = nullptr;
  const float* queries_ = nullptr;  // key pages: the queries (caller or proxy)
  size_t tokens_ = 0, dim_ = 0, nq_ = 0, k_ = 0;
  KvQuerySource source_ = KvQuerySource::kNone;
  double inv_sqrt_d_ = 0;
  std::vector<double> logits_;              // key: [nq, T]
  std::vector<double> log_norm_;            // key: per query, max + ln(sum of exp) of the softmax
  std::vector<double> probs_;               // key and value: [nq, T]
  std::vector<std::vector<uint32_t>> topk_;  // key: per query, sorted indices
  std::vector<double> agg_;                 // value: [nq, dim]
};

// Token-weighted means and maxima of page metrics. A metric is present in the result iff it was
// present in every added page. query_source is the common source, or kCaller if mixed with caller.
class KvQualityAccumulator {
 public:
  void Add(const KvQualityMetrics& m);
  uint64_t pages() const { return pages_; }
  KvQualityMetrics Mean() const;
  KvQualityMetrics Max() const;  // per-metric maxima (cosine: the minimum), tokens = total

 private:
  uint64_t pages_ = 0;
  KvQualityMetrics sum_;
  KvQualityMetrics max_;
  bool mixed_sources_ = false;
};

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_METRICS_H_
