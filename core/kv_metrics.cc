#include "core/kv_metrics.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/portable_math.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

constexpr double kKlFloor = 1e-12;

// Softmax exponent, specified in docs/format/kv.md ("Quality metrics"): for x <= 0 (the softmax
// only exponentiates logit - max), k = floor(x/ln2 + 1/2), r = (x - k*ln2_hi) - k*ln2_lo,
// e^r by Horner over the binary64 values nearest to 1/n! (n = 13..0), scaled by 2^k. Plain IEEE
// operations only, so identical on every CPU; multiplications instead of PortableExp's divisions
// make it ~4x cheaper, and metrics evaluate thousands per page.
constexpr double kExpCoef[14] = {
    0x1.0000000000000p+0,  0x1.0000000000000p+0,  0x1.0000000000000p-1,  0x1.5555555555555p-3,
    0x1.5555555555555p-5,  0x1.1111111111111p-7,  0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-13,
    0x1.a01a01a01a01ap-16, 0x1.71de3a556c734p-19, 0x1.27e4fb7789f5cp-22, 0x1.ae64567f544e4p-26,
    0x1.1eed8eff8d898p-29, 0x1.6124613a86d09p-33};
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // the same split as PortableExp
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kInvLn2 = 1.44269504088896338700e+00;

double SoftmaxExp(double x) {
  if (x < -745.1332191019412) return 0.0;
  const double k = std::floor(x * kInvLn2 + 0.5);
  const double r = (x - k * kLn2Hi) - k * kLn2Lo;
  double p = kExpCoef[13];
  for (int n = 12; n >= 0; --n) p = kExpCoef[n] + r * p;
  return std::ldexp(p, static_cast<int>(k));
}

absl::Status CheckFinite(const float* x, size_t n, const char* what) {
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) {
      return absl::InvalidArgumentError(absl::StrCat("quality: ", what, "[", i, "] is not finite"));
    }
  }
  return absl::OkStatus();
}

void Reconstruction(const float* x, const float* y, size_t n, KvQualityMetrics* m) {
  double se = 0, dot = 0, nx = 0, ny = 0;
  for (size_t i = 0; i < n; ++i) {
    const double a = x[i], b = y[i];
    se += (a - b) * (a - b);
    dot += a * b;
    nx += a * a;
    ny += b * b;
  }
  m->reconstruction_mse = se / static_cast<double>(n);
  if (nx == 0 && ny == 0) {
    m->cosine_similarity = 1.0;
  } else if (nx == 0 || ny == 0) {
    m->cosine_similarity = 0.0;
  } else {
    m->cosine_similarity = dot / (std::sqrt(nx) * std::sqrt(ny));
  }
}

// Keys transposed to [dim, tokens] f64, so the logit sums below run over tokens in the inner loop
// (vectorizable) while each logit still accumulates its products in channel order 0..d-1: the same
// additions in the same order as a plain dot product, hence the same bits.
void TransposeKeys(const float* keys, size_t tokens, size_t dim, std::vector<double>* kt) {
  kt->resize(tokens * dim);
  for (size_t t = 0; t < tokens; ++t) {
    for (size_t c = 0; c < dim; ++c) (*kt)[c * tokens + t] = static_cast<double>(keys[t * dim + c]);
  }
}

// out[t] = (sum_c q[c] * k_t[c]) / sqrt(d), products exact in f64, sums in channel order.
void Logits(const float* q, const std::vector<double>& kt, size_t tokens, size_t dim, double inv_sqrt_d,
            double* out) {
  std::fill(out, out + tokens, 0.0);
  for (size_t c = 0; c < dim; ++c) {
    const double qc = static_cast<double>(q[c]);
    const double* row = kt.data() + c * tokens;
    for (size_t t = 0; t < tokens; ++t) out[t] += qc * row[t];
  }
  for (size_t t = 0; t < tokens; ++t) out[t] *= inv_sqrt_d;
}

// p = softmax(logits). If log_norm is non-null it receives max + ln(sum), so that
// ln p_i = logits[i] - *log_norm without a logarithm per element.
absl::Status Softmax(const double* logits, size_t n, double* p, double* log_norm = nullptr) {
  double mx = logits[0];
  for (size_t i = 1; i < n; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (size_t i = 0; i < n; ++i) {
    p[i] = SoftmaxExp(logits[i] - mx);
    sum += p[i];
  }
  if (!(sum > 0) || !std::isfinite(sum)) return absl::InvalidArgumentError("quality: softmax sum is not positive and finite");
  for (size_t i = 0; i < n; ++i) p[i] /= sum;
  if (log_norm != nullptr) *log_norm = mx + PortableLog(sum);
  return absl::OkStatus();
}

// Indices of the k largest values, descending, ties by lower index (values are finite).
std::vector<uint32_t> TopK(const double* v, size_t n, size_t k) {
  std::vector<uint32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0u);
  std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(),
                    [&](uint32_t a, uint32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

}  // namespace

std::string_view KvQuerySourceName(KvQuerySource v) {
  switch (v) {
    case KvQuerySource::kNone: return "none";
    case KvQuerySource::kCaller: return "caller_queries";
    case KvQuerySource::kProxySelfKeys: return "proxy_self_keys";
    case KvQuerySource::kProxySelfValues: return "proxy_self_values";
  }
  return "unknown";
}

absl::StatusOr<KvQualityEvaluator> KvQualityEvaluator::Create(KvRole role, const float* original, size_t tokens,
                                                             size_t dim, const float* queries, size_t n_queries,
                                                             const float* keys, uint32_t top_k) {
  if (tokens == 0 || dim == 0) return absl::InvalidArgumentError("quality: tokens and dim must be >= 1");
  if (original == nullptr) return absl::InvalidArgumentError("quality: the original page is required");
  FQ_RETURN_IF_ERROR(CheckFinite(original, tokens * dim, "original"));
  KvQualityEvaluator e;
  e.role_ = role;
  e.original_ = original;
  e.tokens_ = tokens;
  e.dim_ = dim;
  e.inv_sqrt_d_ = 1.0 / std::sqrt(static_cast<double>(dim));
  const float* q = queries;
  const float* kk = original;
  size_t nq = n_queries;
  const bool caller = nq > 0 && q != nullptr && (role == KvRole::kKey || keys != nullptr);
  if (caller) {
    FQ_RETURN_IF_ERROR(CheckFinite(q, nq * dim, "queries"));
    if (role == KvRole::kValue) {
      FQ_RETURN_IF_ERROR(CheckFinite(keys, tokens * dim, "keys"));
      kk = keys;
    }
    e.source_ = KvQuerySource::kCaller;
  } else {
    q = original;
    nq = std::min<size_t>(tokens, kMaxProxyQueries);
    e.source_ = role == KvRole::kKey ? KvQuerySource::kProxySelfKeys : KvQuerySource::kProxySelfValues;
  }
  e.queries_ = q;
  e.nq_ = nq;
  e.probs_.resize(nq * tokens);
  if (role == KvRole::kKey) {
    e.k_ = std::clamp<size_t>(top_k, 1, tokens);
    e.logits_.resize(nq * tokens);
    e.log_norm_.resize(nq);
    e.topk_.resize(nq);
  } else {
    e.agg_.assign(nq * dim, 0.0);
  }
  std::vector<double> kt;
  TransposeKeys(kk, tokens, dim, &kt);
  for (size_t i = 0; i < nq; ++i) {
    double* l = role == KvRole::kKey ? &e.logits_[i * tokens] : nullptr;
    std::vector<double> tmp;
    if (l == nullptr) {
      tmp.resize(tokens);
      l = tmp.data();
    }
    Logits(q + i * dim, kt, tokens, dim, e.inv_sqrt_d_, l);
    double* p = &e.probs_[i * tokens];
    FQ_RETURN_IF_ERROR(Softmax(l, tokens, p, role == KvRole::kKey ? &e.log_norm_[i] : nullptr));
    if (role == KvRole::kKey) {
      e.topk_[i] = TopK(l, tokens, e.k_);
    } else {
      double* o = &e.agg_[i * dim];
      for (size_t t = 0; t < tokens; ++t) {
        const float* v = original + t * dim;
        for (size_t c = 0; c < dim; ++c) o[c] += p[t] * static_cast<double>(v[c]);
      }
    }
  }
  return e;
}

absl::StatusOr<KvQualityMetrics> KvQualityEvaluator::Evaluate(const float* recon) const {
  if (recon == nullptr) return absl::InvalidArgumentError("quality: the reconstruction is required");
  FQ_RETURN_IF_ERROR(CheckFinite(recon, tokens_ * dim_, "reconstruction"));
  const size_t T = tokens_, D = dim_;
  KvQualityMetrics m;
  m.tokens = T;
  m.queries = static_cast<uint32_t>(nq_);
  m.query_source = source_;
  Reconstruction(original_, recon, T * D, &m);
  const double n = static_cast<double>(nq_);
  if (role_ == KvRole::kKey) {
    std::vector<double> lh(T), ph(T), kt;
    TransposeKeys(recon, T, D, &kt);
    double logit_mse = 0, tv = 0, kl = 0, dis = 0;
    for (size_t i = 0; i < nq_; ++i) {
      const double* l = &logits_[i * T];
      const double* p = &probs_[i * T];
      Logits(queries_ + i * D, kt, T, D, inv_sqrt_d_, lh.data());
      double log_norm_h = 0;
      FQ_RETURN_IF_ERROR(Softmax(lh.data(), T, ph.data(), &log_norm_h));
      const double log_norm = log_norm_[i];
      double se = 0, a = 0, kk = 0;
      for (size_t t = 0; t < T; ++t) {
        se += (l[t] - lh[t]) * (l[t] - lh[t]);
        a += std::fabs(p[t] - ph[t]);
        if (p[t] >= kKlFloor && ph[t] >= kKlFloor) {
          // ln(p/p^) from the logits: one logarithm per query instead of one per token.
          kk += p[t] * ((l[t] - log_norm) - (lh[t] - log_norm_h));
        } else {
          const double pc = std::max(p[t], kKlFloor), hc = std::max(ph[t], kKlFloor);
          kk += pc * PortableLog(pc / hc);
        }
      }
      logit_mse += se / static_cast<double>(T);
      tv += 0.5 * a;
      kl += kk;
      const std::vector<uint32_t>& ta = topk_[i];
      const std::vector<uint32_t> tb = TopK(lh.data(), T, k_);
      size_t inter = 0;
      for (size_t x = 0, y = 0; x < k_ && y < k_;) {
        if (ta[x] == tb[y]) {
          ++inter, ++x, ++y;
        } else if (ta[x] < tb[y]) {
          ++x;
        } else {
          ++y;
        }
      }
      dis += 1.0 - static_cast<double>(inter) / static_cast<double>(k_);
    }
    m.key_logit_mse = logit_mse / n;
    m.attention_tv = tv / n;
    m.attention_kl = kl / n;
    m.topk_disagreement = dis / n;
    return m;
  }
  std::vector<double> oh(D);
  double se = 0;
  for (size_t i = 0; i < nq_; ++i) {
    const double* p = &probs_[i * T];
    const double* o = &agg_[i * D];
    std::fill(oh.begin(), oh.end(), 0.0);
    for (size_t t = 0; t < T; ++t) {
      const float* vh = recon + t * D;
      for (size_t c = 0; c < D; ++c) oh[c] += p[t] * static_cast<double>(vh[c]);
    }
    for (size_t c = 0; c < D; ++c) se += (o[c] - oh[c]) * (o[c] - oh[c]);
  }
  m.value_aggregation_mse = se / (n * static_cast<double>(D));
  return m;
}

absl::StatusOr<KvQualityMetrics> EvaluateKeyQuality(const float* keys, const float* keys_hat, size_t tokens,
                                                    size_t dim, const float* queries, size_t n_queries,
                                                    uint32_t top_k) {
  FQ_ASSIGN_OR_RETURN(KvQualityEvaluator e,
                      KvQualityEvaluator::Create(KvRole::kKey, keys, tokens, dim, queries, n_queries, nullptr, top_k));
  return e.Evaluate(keys_hat);
}

absl::StatusOr<KvQualityMetrics> EvaluateValueQuality(const float* values, const float* values_hat, size_t tokens,
                                                      size_t dim, const float* queries, size_t n_queries,
                                                      const float* keys) {
  FQ_ASSIGN_OR_RETURN(KvQualityEvaluator e, KvQualityEvaluator::Create(KvRole::kValue, values, tokens, dim, queries,
                                                                       n_queries, keys, kDefaultTopK));
  return e.Evaluate(values_hat);
}

absl::StatusOr<KvQualityMetrics> EvaluateQuality(KvRole role, const float* original, const float* reconstructed,
                                                 size_t tokens, size_t dim, const float* queries, size_t n_queries,
                                                 const float* keys, uint32_t top_k) {
  if (role == KvRole::kKey) {
    return EvaluateKeyQuality(original, reconstructed, tokens, dim, queries, n_queries, top_k);
  }
  return EvaluateValueQuality(original, reconstructed, tokens, dim, queries, n_queries, keys);
}

namespace {

void AddOpt(std::optional<double>* acc, const std::optional<double>& v, double w, bool first) {
  if (first) {
    if (v) *acc = *v * w;
    return;
  }
  if (!v || !*acc) {
    acc->reset();
    return;
  }
  **acc += *v * w;
}
void MaxOpt(std::optional<double>* acc, const std::optional<double>& v, bool first) {
  if (first) {
    *acc = v;
    return;
  }
  if (!v || !*acc) {
    acc->reset();
    return;
  }
  **acc = std::max(**acc, *v);
}
void DivOpt(std::optional<double>* v, double d) {
  if (*v) **v /= d;
}

}  // namespace

void KvQualityAccumulator::Add(const KvQualityMetrics& m) {
  const bool first = pages_ == 0;
  const double w = static_cast<double>(m.tokens);
  if (first) {
    sum_ = KvQualityMetrics{};
    max_ = m;
    sum_.query_source = m.query_source;
    sum_.reconstruction_mse = m.reconstruction_mse * w;
    sum_.cosine_similarity = m.cosine_similarity * w;
  } else {
    if (m.query_source != sum_.query_source) mixed_sources_ = true;
    sum_.reconstruction_mse += m.reconstruction_mse * w;
    sum_.cosine_similarity += m.cosine_similarity * w;
    max_.reconstruction_mse = std::max(max_.reconstruction_mse, m.reconstruction_mse);
    max_.cosine_similarity = std::min(max_.cosine_similarity, m.cosine_similarity);
    max_.queries = std::max(max_.queries, m.queries);
  }
  sum_.tokens += m.tokens;
  sum_.queries += m.queries;
  AddOpt(&sum_.key_logit_mse, m.key_logit_mse, w, first);
  AddOpt(&sum_.attention_tv, m.attention_tv, w, first);
  AddOpt(&sum_.attention_kl, m.attention_kl, w, first);
  AddOpt(&sum_.topk_disagreement, m.topk_disagreement, w, first);
  AddOpt(&sum_.value_aggregation_mse, m.value_aggregation_mse, w, first);
  if (!first) {
    MaxOpt(&max_.key_logit_mse, m.key_logit_mse, false);
    MaxOpt(&max_.attention_tv, m.attention_tv, false);
    MaxOpt(&max_.attention_kl, m.attention_kl, false);
    MaxOpt(&max_.topk_disagreement, m.topk_disagreement, false);
    MaxOpt(&max_.value_aggregation_mse, m.value_aggregation_mse, false);
  }
  ++pages_;
}

KvQualityMetrics KvQualityAccumulator::Mean() const {
  KvQualityMetrics m = sum_;
  if (pages_ == 0 || sum_.tokens == 0) return m;
  const double w = static_cast<double>(sum_.tokens);
  m.reconstruction_mse /= w;
  m.cosine_similarity /= w;
  DivOpt(&m.key_logit_mse, w);
  DivOpt(&m.attention_tv, w);
  DivOpt(&m.attention_kl, w);
  DivOpt(&m.topk_disagreement, w);
  DivOpt(&m.value_aggregation_mse, w);
  if (mixed_sources_) m.query_source = KvQuerySource::kCaller;
  return m;
}

KvQualityMetrics KvQualityAccumulator::Max() const {
  KvQualityMetrics m = max_;
  m.tokens = sum_.tokens;
  if (mixed_sources_) m.query_source = KvQuerySource::kCaller;
  return m;
}

}  // namespace fibquant
