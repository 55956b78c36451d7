#include "core/kv_codec.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/codebook.h"
#include "core/digest.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

using VecReason = uint8_t;
constexpr VecReason kCoded = 0, kProtected = 1, kPolicy = 2, kEncodeFallback = 3, kQualityFallback = 4;

std::string PageName(const KvPageCoords& c) {
  return absl::StrCat("page (batch ", c.batch, ", layer ", c.layer, ", kv_head ", c.kv_head, ", tokens [",
                      c.token_start, ", ", uint64_t{c.token_start} + c.token_count, "))");
}

void AddReason(std::vector<std::string>* reasons, const std::string& r) {
  if (std::find(reasons->begin(), reasons->end(), r) == reasons->end()) reasons->push_back(r);
}

// Stores v into element i of `out`, saturating finite values that overflow the 16-bit formats.
void StoreSaturating(DType dtype, float v, uint8_t* out, size_t i) {
  if (dtype == DType::kF16 && std::isfinite(v)) {
    v = std::clamp(v, -65504.0f, 65504.0f);
    StoreElement(dtype, v, out, i);
    return;
  }
  if (dtype == DType::kBF16 && std::isfinite(v)) {
    uint16_t b = FloatToBf16(v);
    if ((b & 0x7F80u) == 0x7F80u) b = static_cast<uint16_t>((b & 0x8000u) | 0x7F7Fu);
    out[2 * i] = static_cast<uint8_t>(b & 0xFF);
    out[2 * i + 1] = static_cast<uint8_t>(b >> 8);
    return;
  }
  StoreElement(dtype, v, out, i);
}

struct BudgetOutcome {
  std::vector<KvBudgetCheck> checks;
  const KvBudgetCheck* first_failure = nullptr;
};

void CheckBudget(const KvQualityBudget& b, const KvQualityMetrics& m, std::vector<KvBudgetCheck>* checks) {
  checks->clear();
  auto add = [&](const char* name, const std::optional<double>& limit, const std::optional<double>& value) {
    if (!limit) return;
    KvBudgetCheck c;
    c.metric = name;
    c.limit = *limit;
    c.value = value.value_or(0);
    c.value_before = c.value;
    c.passed = c.value <= c.limit;
    checks->push_back(c);
  };
  add("logit_mse", b.max_logit_mse, m.key_logit_mse);
  add("attention_tv", b.max_attention_tv, m.attention_tv);
  add("topk_disagreement", b.max_topk_disagreement, m.topk_disagreement);
  add("value_aggregation_mse", b.max_value_aggregation_mse, m.value_aggregation_mse);
}

bool AllPass(const std::vector<KvBudgetCheck>& checks) {
  for (const auto& c : checks) {
    if (!c.passed) return false;
  }
  return true;
}

}  // namespace

std::array<uint8_t, 32> KvPageSourceDigest(const KvPageCoords& c, DType dtype, absl::Span<const uint8_t> data) {
  CanonicalWriter w("fq_kv_source_page_v1");
  w.U32(c.batch);
  w.U32(c.layer);
  w.U32(c.kv_head);
  w.U32(c.token_start);
  w.U32(c.token_count);
  w.Str(DTypeName(dtype));
  w.U64(data.size());
  Sha256Hasher h;
  h.Update(w.bytes());
  h.Update(data.data(), data.size());
  return h.FinishRaw();
}

absl::StatusOr<std::shared_ptr<const KvCodec>> KvCodec::Create(KvCompressionProfile profile,
                                                               std::shared_ptr<const Quantizer> quantizer,
                                                               std::shared_ptr<const KvCalibration> calibration) {
  if (profile.axis_policy == KvAxisPolicy::kRaw) {
    if (quantizer) return absl::InvalidArgumentError("KvCodec: axis_policy raw takes no quantizer");
  } else {
    if (!quantizer) {
      return absl::InvalidArgumentError(absl::StrCat("KvCodec: axis_policy ", std::string(KvAxisPolicyName(profile.axis_policy)),
                                                     " needs a quantizer"));
    }
    if (!profile.fib_profile) return absl::InvalidArgumentError("kv_profile.fib_profile is required");
    if (!(quantizer->profile() == *profile.fib_profile)) {
      return absl::InvalidArgumentError("KvCodec: kv_profile.fib_profile differs from the quantizer's profile");
    }
    const std::string& cb = quantizer->codebook().digest();
    const std::string& rot = quantizer->codebook().rotation_digest();
    if (profile.codebook_digest.empty() && profile.rotation_digest.empty()) {
      profile.codebook_digest = cb;
      profile.rotation_digest = rot;
    } else {
      if (profile.codebook_digest != cb) {
        return absl::InvalidArgumentError(absl::StrCat("kv_profile.codebook_digest mismatch: profile \"",
                                                       profile.codebook_digest, "\", quantizer ", cb));
      }
      if (profile.rotation_digest != rot) {
        return absl::InvalidArgumentError(absl::StrCat("kv_profile.rotation_digest mismatch: profile \"",
                                                       profile.rotation_digest, "\", quantizer ", rot));
      }
    }
    if (quantizer->code_bytes() != profile.page_geometry.encoded_vector_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("page_geometry.encoded_vector_bytes ",
                                                     profile.page_geometry.encoded_vector_bytes,
                                                     " != quantizer code_bytes ", quantizer->code_bytes()));
    }
  }
  FQ_RETURN_IF_ERROR(profile.Validate());
  if (profile.channel_transform == KvChannelTransform::kCalibration) {
    if (!calibration) {
      return absl::InvalidArgumentError(absl::StrCat("KvCodec: channel_transform calibration needs the calibration ",
                                                     profile.calibration_digest));
    }
    if (calibration->digest != profile.calibration_digest) {
      return absl::InvalidArgumentError(absl::StrCat("kv_profile.calibration_digest ", profile.calibration_digest,
                                                     " differs from the calibration's digest ", calibration->digest));
    }
    FQ_RETURN_IF_ERROR(calibration->CheckShape(profile.shape));
  } else {
    calibration = nullptr;  // not used by this profile
  }
  std::shared_ptr<KvCodec> c(new KvCodec());
  FQ_ASSIGN_OR_RETURN(c->digest_, profile.Digest());
  if (!ParseDigest(c->digest_, &c->digest_raw_)) return absl::InternalError("KvCodec: digest does not parse");
  c->profile_ = std::move(profile);
  c->quantizer_ = std::move(quantizer);
  c->calibration_ = std::move(calibration);
  return std::shared_ptr<const KvCodec>(std::move(c));
}

absl::StatusOr<std::shared_ptr<const KvCodec>> KvCodec::Build(KvCompressionProfile profile, int threads,
                                                              const CancelToken* cancel,
                                                              std::shared_ptr<const KvCalibration> calibration) {
  if (profile.axis_policy == KvAxisPolicy::kRaw) return Create(std::move(profile), nullptr);
  FQ_RETURN_IF_ERROR(profile.Validate());
  FQ_ASSIGN_OR_RETURN(Codebook cb, Codebook::Build(*profile.fib_profile, threads, cancel));
  FQ_ASSIGN_OR_RETURN(std::shared_ptr<const Quantizer> q, Quantizer::Create(std::move(cb)));
  return Create(std::move(profile), std::move(q), std::move(calibration));
}

absl::Status KvCodec::CheckCoords(const KvPageCoords& c) const {
  const KvTensorShape& s = profile_.shape;
  if (c.batch >= s.batch) {
    return absl::OutOfRangeError(absl::StrCat("page batch ", c.batch, " is outside the shape (batch ", s.batch, ")"));
  }
  if (c.layer >= s.layers) {
    return absl::OutOfRangeError(absl::StrCat("page layer ", c.layer, " is outside the shape (layers ", s.layers, ")"));
  }
  if (c.kv_head >= s.kv_heads) {
    return absl::OutOfRangeError(
        absl::StrCat("page kv_head ", c.kv_head, " is outside the shape (kv_heads ", s.kv_heads, ")"));
  }
  if (c.token_start >= s.tokens) {
    return absl::OutOfRangeError(
        absl::StrCat("page token_start ", c.token_start, " is outside the shape (tokens ", s.tokens, ")"));
  }
  const uint32_t tpp = profile_.page_geometry.tokens_per_page;
  if (c.token_start % tpp != 0) {
    return absl::InvalidArgumentError(absl::StrCat("page token_start ", c.token_start,
                                                   " is not a multiple of tokens_per_page ", tpp));
  }
  const uint32_t want = std::min(tpp, s.tokens - c.token_start);
  if (c.token_count != want) {
    return absl::InvalidArgumentError(absl::StrCat("page token_count must be ", want, " for token_start ",
                                                   c.token_start, "; got ", c.token_count));
  }
  return absl::OkStatus();
}

absl::StatusOr<CompressedPage> KvCodec::CompressPage(const KvPageInput& in, const KvCompressOptions& opt) const {
  FQ_RETURN_IF_ERROR(CheckCoords(in.coords));
  const KvTensorShape& shape = profile_.shape;
  if (in.dtype != shape.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("page input dtype ", std::string(DTypeName(in.dtype)),
                                                   " differs from the profile's shape dtype ",
                                                   std::string(DTypeName(shape.dtype))));
  }
  const uint32_t T = in.coords.token_count, D = shape.head_dim;
  const size_t esize = DTypeSize(in.dtype);
  const size_t elems = size_t{T} * D;
  if (in.data.size() != elems * esize) {
    return absl::InvalidArgumentError(absl::StrCat("page data must be token_count*head_dim*", esize, " = ",
                                                   elems * esize, " bytes; got ", in.data.size()));
  }
  if (in.queries.size() % D != 0) {
    return absl::InvalidArgumentError(absl::StrCat("page queries must be [n, head_dim ", D, "] f32; got ",
                                                   in.queries.size(), " floats"));
  }
  if (!in.keys.empty()) {
    if (shape.role != KvRole::kValue) {
      return absl::InvalidArgumentError("page keys may be given only for value pages");
    }
    if (in.keys.size() != elems) {
      return absl::InvalidArgumentError(absl::StrCat("page keys must be [token_count, head_dim] = ", elems,
                                                     " floats; got ", in.keys.size()));
    }
  }
  if (const size_t i = FirstNonFinite(in.dtype, in.data.data(), elems); i != elems) {
    return absl::InvalidArgumentError(absl::StrCat("page input element [", i / D, ", ", i % D, "] of ",
                                                   PageName(in.coords), " is not finite"));
  }
  const bool channel = vector_axis() == KvVectorAxis::kChannel;
  const KvQualityBudget& budget = profile_.quality_budget;
  const bool enforce = opt.enforce_budget && budget.has_any_metric();
  // The reconstruction is read only by the quality metrics and the budget: a page that needs
  // neither (the common case: no queries, no budget, not sampled) skips the decode that makes it.
  const bool need_recon = opt.compute_metrics || enforce;
  // Page values as f32 in [T, D] (exact for f16/bf16 input), made only when something reads them
  // as such: the channel transpose, the calibration, the metrics. Otherwise the quantizer converts
  // the rows it encodes itself.
  const bool need_x = channel || calibration_ || need_recon;
  std::vector<float> x(need_x ? elems : 0);
  if (need_x) ToFloat(in.dtype, in.data.data(), elems, x.data());
  const uint32_t n = channel ? D : T;
  const uint32_t len = channel ? T : D;
  // Vectors as f32 rows [n, len].
  std::vector<float> vecs;
  if (channel) {
    vecs.resize(elems);
    for (uint32_t t = 0; t < T; ++t) {
      for (uint32_t c = 0; c < D; ++c) vecs[size_t{c} * T + t] = x[size_t{t} * D + c];
    }
  }
  const float* V = channel ? vecs.data() : x.data();

  CompressedPage out;
  out.coords = in.coords;
  out.input_dtype = in.dtype;
  out.input_bytes = in.data.size();
  out.source_digest = KvPageSourceDigest(in.coords, in.dtype, in.data);
  std::vector<VecReason> reason(n, kCoded);
  const KvProtectedPolicy& pp = profile_.protected_policy;
  if (profile_.axis_policy == KvAxisPolicy::kRaw) {
    std::fill(reason.begin(), reason.end(), kPolicy);
    AddReason(&out.raw_reasons, "raw_axis_policy");
  } else if (channel) {
    const bool head = pp.ProtectsHead(in.coords.layer, in.coords.kv_head);
    const bool first = in.coords.token_start < pp.first_tokens_raw;
    const bool last = uint64_t{in.coords.token_start} + T - 1 + pp.last_tokens_raw >= shape.tokens;
    if (head || first || last) {
      std::fill(reason.begin(), reason.end(), kProtected);
      AddReason(&out.raw_reasons, "protected_region");
    } else if (T < profile_.page_geometry.tokens_per_page) {
      std::fill(reason.begin(), reason.end(), kPolicy);
      AddReason(&out.raw_reasons, "partial_page");
    }
  } else {
    for (uint32_t i = 0; i < n; ++i) {
      if (pp.IsProtected(shape, in.coords.layer, in.coords.kv_head, in.coords.token_start + i)) {
        reason[i] = kProtected;
        AddReason(&out.raw_reasons, "protected_region");
      }
    }
  }
  // Encode the vectors still marked coded.
  const size_t cb = quantizer_ ? quantizer_->code_bytes() : 0;
  std::vector<uint8_t> codes(size_t{n} * cb, 0);  // slot per vector while building; compacted later
  std::vector<float> recon;
  if (need_recon) recon.assign(V, V + size_t{n} * len);
  const bool centered = profile_.centering == KvCentering::kPage;
  std::vector<float> page_mean(centered ? len : 0, 0.0f);
  {
    std::vector<uint32_t> todo;
    for (uint32_t i = 0; i < n; ++i) {
      if (reason[i] == kCoded) todo.push_back(i);
    }
    // Every vector coded, none transformed: the quantizer reads the page's own bytes (it converts
    // f16/bf16 exactly, as ToFloat did) and writes the codes in place.
    const bool direct = !channel && !calibration_ && !centered && todo.size() == n;
    if (!todo.empty()) {
      std::vector<float> src(direct ? 0 : todo.size() * len);
      for (size_t j = 0; j < src.size() / len; ++j) {
        if (calibration_) {
          calibration_->Forward(in.coords.layer, in.coords.kv_head, V + size_t{todo[j]} * len, &src[j * len]);
        } else if (need_x) {
          std::memcpy(&src[j * len], V + size_t{todo[j]} * len, len * sizeof(float));
        } else {  // token axis: row todo[j] of the page
          ToFloat(in.dtype, in.data.data() + size_t{todo[j]} * len * esize, len, &src[j * len]);
        }
      }
      if (centered) {
        // Channel mean of the coded vectors (f64 sums in vector order, stored as f32), subtracted.
        std::vector<double> sum(len, 0.0);
        for (size_t j = 0; j < todo.size(); ++j) {
          for (uint32_t c = 0; c < len; ++c) sum[c] += src[j * len + c];
        }
        for (uint32_t c = 0; c < len; ++c) page_mean[c] = static_cast<float>(sum[c] / static_cast<double>(todo.size()));
        for (size_t j = 0; j < todo.size(); ++j) {
          for (uint32_t c = 0; c < len; ++c) src[j * len + c] -= page_mean[c];
        }
      }
      // Codes of todo[j] at enc[j * cb]; when todo is every vector, `codes` itself.
      std::vector<uint8_t> enc_buf(todo.size() == n ? 0 : todo.size() * cb);
      const absl::Span<uint8_t> enc = todo.size() == n ? absl::Span<uint8_t>(codes) : absl::Span<uint8_t>(enc_buf);
      std::vector<VectorFailure> failures;
      FQ_RETURN_IF_ERROR(quantizer_->Encode(
          direct ? in.dtype : DType::kF32,
          direct ? in.data
                 : absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(src.data()), src.size() * sizeof(float)),
          todo.size(), enc, opt.path, &failures));
      std::vector<bool> failed(todo.size(), false);
      for (const VectorFailure& f : failures) {
        const uint32_t vi = todo[f.index];
        if (profile_.fallback_policy.mode == KvFallbackMode::kFailClosed) {
          return absl::Status(f.status.code(), absl::StrCat(channel ? "channel " : "token vector ", vi, " of ",
                                                            PageName(in.coords), " cannot be encoded: ",
                                                            f.status.message()));
        }
        failed[f.index] = true;
        reason[vi] = kEncodeFallback;
        AddReason(&out.raw_reasons, absl::StrCat("encode_fallback:", f.status.message()));
      }
      // The successful codes into their vectors' slots (failed slots are all-zero codes, which do
      // not decode; they are raw and never reach the frame).
      std::vector<uint32_t> ok_idx;
      std::vector<uint8_t> ok_codes;
      for (size_t j = 0; j < todo.size(); ++j) {
        if (failed[j]) continue;
        if (todo.size() != n) std::memcpy(&codes[size_t{todo[j]} * cb], &enc[j * cb], cb);
        if (!need_recon) continue;
        ok_idx.push_back(todo[j]);
        ok_codes.insert(ok_codes.end(), enc.begin() + static_cast<std::ptrdiff_t>(j * cb),
                        enc.begin() + static_cast<std::ptrdiff_t>((j + 1) * cb));
      }
      if (!ok_idx.empty()) {
        std::vector<float> dec(ok_idx.size() * len);
        FQ_RETURN_IF_ERROR(quantizer_->DecodeF32(ok_codes, ok_idx.size(), dec.data(), opt.path));
        UndoTransform(in.coords, centered ? page_mean.data() : nullptr, ok_codes.data(), dec.data(), ok_idx.size());
        for (size_t j = 0; j < ok_idx.size(); ++j) {
          std::memcpy(&recon[size_t{ok_idx[j]} * len], &dec[j * len], len * sizeof(float));
        }
      }
    }
  }
  // Reconstructed page as [T, D] for metrics.
  auto page_view = [&](std::vector<float>* buf) {
    if (!channel) {
      *buf = recon;
      return;
    }
    buf->resize(elems);
    for (uint32_t c = 0; c < D; ++c) {
      for (uint32_t t = 0; t < T; ++t) (*buf)[size_t{t} * D + c] = recon[size_t{c} * T + t];
    }
  };
  if (need_recon) {
    const size_t nq = in.queries.size() / D;
    FQ_ASSIGN_OR_RETURN(const KvQualityEvaluator evaluator,
                        KvQualityEvaluator::Create(shape.role, x.data(), T, D, nq ? in.queries.data() : nullptr, nq,
                                                   in.keys.empty() ? nullptr : in.keys.data(), opt.top_k));
    std::vector<float> xh;
    auto measure = [&]() -> absl::StatusOr<KvQualityMetrics> {
      page_view(&xh);
      return evaluator.Evaluate(xh.data());
    };
    FQ_ASSIGN_OR_RETURN(KvQualityMetrics m, measure());
    CheckBudget(budget, m, &out.budget_checks);
    if (enforce && !AllPass(out.budget_checks)) {
      if (budget.fallback_on_violation == KvFallbackMode::kFailClosed) {
        for (const KvBudgetCheck& c : out.budget_checks) {
          if (!c.passed) {
            return absl::FailedPreconditionError(
                absl::StrFormat("quality budget violated: %s %.17g > %.17g on %s", c.metric, c.value, c.limit,
                                PageName(in.coords)));
          }
        }
      }
      // keep_raw: store the worst coded vectors raw (largest squared error first, ties by lower
      // index), the fewest that make the budget hold: doubling, then bisection on the count.
      std::vector<uint32_t> coded;
      std::vector<double> err(n, 0);
      for (uint32_t i = 0; i < n; ++i) {
        if (reason[i] != kCoded) continue;
        coded.push_back(i);
        double e = 0;
        for (uint32_t j = 0; j < len; ++j) {
          const double d = double{V[size_t{i} * len + j]} - double{recon[size_t{i} * len + j]};
          e += d * d;
        }
        err[i] = e;
      }
      std::stable_sort(coded.begin(), coded.end(), [&](uint32_t a, uint32_t b) { return err[a] > err[b]; });
      const std::vector<float> recon_coded = recon;
      std::vector<KvBudgetCheck> checks;
      auto try_count = [&](size_t k) -> absl::StatusOr<bool> {
        recon = recon_coded;
        for (size_t j = 0; j < k; ++j) {
          const uint32_t i = coded[j];
          std::memcpy(&recon[size_t{i} * len], V + size_t{i} * len, len * sizeof(float));
        }
        FQ_ASSIGN_OR_RETURN(KvQualityMetrics mk, measure());
        CheckBudget(budget, mk, &checks);
        return AllPass(checks);
      };
      size_t lo = 0, hi = 1;  // lo fails, hi candidate
      while (true) {
        hi = std::min(hi, coded.size());
        FQ_ASSIGN_OR_RETURN(bool ok, try_count(hi));
        if (ok || hi == coded.size()) break;
        lo = hi;
        hi *= 2;
      }
      while (hi - lo > 1) {
        const size_t mid = lo + (hi - lo) / 2;
        FQ_ASSIGN_OR_RETURN(bool ok, try_count(mid));
        if (ok) {
          hi = mid;
        } else {
          lo = mid;
        }
      }
      FQ_ASSIGN_OR_RETURN(bool ok, try_count(hi));
      (void)ok;  // with every vector raw the metrics are exact, so hi == coded.size() always passes
      for (size_t j = 0; j < hi; ++j) reason[coded[j]] = kQualityFallback;
      std::vector<KvBudgetCheck> before = out.budget_checks;
      FQ_ASSIGN_OR_RETURN(KvQualityMetrics m2, measure());
      CheckBudget(budget, m2, &out.budget_checks);
      for (size_t j = 0; j < out.budget_checks.size(); ++j) out.budget_checks[j].value_before = before[j].value;
      out.metrics_before_fallback = m;
      m = m2;
      for (const KvBudgetCheck& c : before) {
        if (!c.passed) AddReason(&out.raw_reasons, absl::StrCat("quality_budget:", c.metric));
      }
    }
    out.metrics = m;
  }
  // Assemble the frame.
  KvFrameHeader h;
  h.flags = channel ? kKvFrameFlagChannelAxis : 0;
  if (centered) h.flags |= kKvFrameFlagCentered;
  // Version 2 only when a version-2 feature is used: other frames stay byte-identical to version 1.
  h.version = (h.flags & ~kKvFrameV1Flags) ? kKvFrameVersion : 1;
  h.raw_dtype = in.dtype;
  h.axis_policy = profile_.axis_policy;
  h.profile_digest = digest_raw_;
  h.coords = in.coords;
  h.vector_len = len;
  h.code_bytes = static_cast<uint32_t>(cb);
  h.counts.vector_count = n;
  std::vector<uint8_t> bitmap((n + 7) / 8, 0);
  std::vector<uint8_t> code_sec;
  std::vector<uint8_t> raw_sec;
  const bool all_coded = std::all_of(reason.begin(), reason.end(), [](VecReason r) { return r == kCoded; });
  for (uint32_t i = 0; i < n; ++i) {
    switch (reason[i]) {
      case kCoded: ++h.counts.coded; break;
      case kProtected: ++h.counts.raw_protected; break;
      case kPolicy: ++h.counts.raw_policy; break;
      case kEncodeFallback: ++h.counts.raw_encode_fallback; break;
      default: ++h.counts.raw_quality_fallback; break;
    }
    if (reason[i] == kCoded) {
      if (all_coded) continue;  // the code section is `codes` as it stands
      code_sec.insert(code_sec.end(), codes.begin() + static_cast<std::ptrdiff_t>(size_t{i} * cb),
                      codes.begin() + static_cast<std::ptrdiff_t>(size_t{i + 1} * cb));
      continue;
    }
    bitmap[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
    if (!channel) {
      const uint8_t* row = in.data.data() + size_t{i} * D * esize;
      raw_sec.insert(raw_sec.end(), row, row + size_t{D} * esize);
    } else {
      for (uint32_t t = 0; t < T; ++t) {
        const uint8_t* e = in.data.data() + (size_t{t} * D + i) * esize;
        raw_sec.insert(raw_sec.end(), e, e + esize);
      }
    }
  }
  std::vector<uint8_t> mean_sec(page_mean.size() * 4);
  for (size_t c = 0; c < page_mean.size(); ++c) {
    const uint32_t u = std::bit_cast<uint32_t>(page_mean[c]);
    for (int b = 0; b < 4; ++b) mean_sec[c * 4 + b] = static_cast<uint8_t>(u >> (8 * b));
  }
  FQ_ASSIGN_OR_RETURN(out.frame, BuildKvFrame(h, bitmap, all_coded ? codes : code_sec, raw_sec, mean_sec));
  out.counts = h.counts;
  Sha256Hasher fh;
  fh.Update(out.frame);
  out.frame_digest = fh.FinishRaw();
  return out;
}

std::vector<float> KvCodec::FrameMean(const KvFrameView& v) const {
  std::vector<float> m;
  if (!(v.header.flags & kKvFrameFlagCentered)) return m;
  m.resize(v.header.vector_len);
  for (uint32_t c = 0; c < v.header.vector_len; ++c) m[c] = v.MeanAt(c);
  return m;
}

void KvCodec::UndoTransform(const KvPageCoords& coords, const float* page_mean, const uint8_t* codes, float* y,
                            size_t count) const {
  const uint32_t len = profile_.shape.head_dim;
  const bool renorm = profile_.renormalize;
  if (!page_mean && !calibration_ && !renorm) return;
  const size_t cb = quantizer_->code_bytes();
  std::vector<float> tmp(len);
  for (size_t j = 0; j < count; ++j) {
    float* v = y + j * len;
    if (renorm) {
      // The code's fp16 norm (bytes 0..1, docs/format/code.md) over the decoded length.
      const uint16_t h = static_cast<uint16_t>(codes[j * cb] | (codes[j * cb + 1] << 8));
      const double target = HalfToFloat(h);
      double ss = 0;
      for (uint32_t c = 0; c < len; ++c) ss += double{v[c]} * double{v[c]};
      if (ss > 0) {
        const double f = target / std::sqrt(ss);
        for (uint32_t c = 0; c < len; ++c) v[c] = static_cast<float>(v[c] * f);
      }
    }
    if (page_mean) {
      for (uint32_t c = 0; c < len; ++c) v[c] += page_mean[c];
    }
    if (calibration_) {
      calibration_->Inverse(coords.layer, coords.kv_head, v, tmp.data());
      std::memcpy(v, tmp.data(), len * sizeof(float));
    }
  }
}

absl::StatusOr<KvFrameView> KvCodec::VerifyFrame(absl::Span<const uint8_t> frame) const {
  FQ_ASSIGN_OR_RETURN(KvFrameView v, ParseKvFrame(frame));
  const KvFrameHeader& h = v.header;
  if (h.profile_digest != digest_raw_) {
    std::array<uint8_t, 32> d = h.profile_digest;
    return absl::InvalidArgumentError(absl::StrCat("frame profile digest ", RenderDigest(d),
                                                   " does not match the codec's profile digest ", digest_));
  }
  if (h.axis_policy != profile_.axis_policy) {
    return absl::DataLossError(absl::StrCat("frame axis_policy ", std::string(KvAxisPolicyName(h.axis_policy)),
                                            " differs from the profile's ",
                                            std::string(KvAxisPolicyName(profile_.axis_policy))));
  }
  if (h.vector_axis() != vector_axis()) {
    return absl::DataLossError("frame flags: the channel-axis bit does not match the profile's vector axis");
  }
  if (((h.flags & kKvFrameFlagCentered) != 0) != (profile_.centering == KvCentering::kPage)) {
    return absl::DataLossError("frame flags: the centered bit does not match the profile's centering");
  }
  if (h.raw_dtype != profile_.shape.dtype) {
    return absl::DataLossError(absl::StrCat("frame raw_dtype ", std::string(DTypeName(h.raw_dtype)),
                                            " differs from the shape dtype ", std::string(DTypeName(profile_.shape.dtype))));
  }
  if (h.code_bytes != profile_.page_geometry.encoded_vector_bytes) {
    return absl::DataLossError(absl::StrCat("frame code_bytes ", h.code_bytes, " differs from the profile's ",
                                            profile_.page_geometry.encoded_vector_bytes));
  }
  {
    absl::Status st = CheckCoords(h.coords);
    if (!st.ok()) return absl::DataLossError(absl::StrCat("frame coordinates: ", st.message()));
  }
  const uint32_t D = profile_.shape.head_dim;
  const bool channel = vector_axis() == KvVectorAxis::kChannel;
  if (channel ? h.counts.vector_count != D : h.vector_len != D) {
    return absl::DataLossError(absl::StrCat("frame ", channel ? "vector_count " : "vector_len ",
                                            channel ? h.counts.vector_count : h.vector_len, " must equal head_dim ", D));
  }
  const uint32_t n = h.counts.vector_count;
  if (profile_.axis_policy == KvAxisPolicy::kRaw && h.counts.raw_policy != n) {
    return absl::DataLossError(absl::StrCat("frame raw_policy count ", h.counts.raw_policy,
                                            " must equal vector_count ", n, " under axis_policy raw"));
  }
  if (profile_.axis_policy != KvAxisPolicy::kRaw) {
    const KvProtectedPolicy& pp = profile_.protected_policy;
    const KvPageCoords& c = h.coords;
    uint32_t want_protected = 0;
    uint32_t want_policy = 0;
    if (channel) {
      const bool prot = pp.ProtectsHead(c.layer, c.kv_head) || c.token_start < pp.first_tokens_raw ||
                        uint64_t{c.token_start} + c.token_count - 1 + pp.last_tokens_raw >= profile_.shape.tokens;
      if (prot) {
        want_protected = n;
      } else if (c.token_count < profile_.page_geometry.tokens_per_page) {
        want_policy = n;
      }
    } else {
      for (uint32_t i = 0; i < n; ++i) {
        if (pp.IsProtected(profile_.shape, c.layer, c.kv_head, c.token_start + i)) {
          ++want_protected;
          if (!v.IsRaw(i)) {
            return absl::DataLossError(absl::StrCat("frame raw map: protected token vector ", i, " is not raw"));
          }
        }
      }
    }
    if (h.counts.raw_protected != want_protected) {
      return absl::DataLossError(absl::StrCat("frame raw_protected count ", h.counts.raw_protected,
                                              " differs from the protected vectors of the page (", want_protected, ")"));
    }
    if (h.counts.raw_policy != want_policy) {
      return absl::DataLossError(absl::StrCat("frame raw_policy count ", h.counts.raw_policy, " must be ", want_policy));
    }
  }
  return v;
}

absl::Status KvCodec::DecodeVerified(const KvFrameView& v, DType out, uint8_t* dst, CodecPath path) const {
  const KvFrameHeader& h = v.header;
  const uint32_t n = h.counts.vector_count, len = h.vector_len;
  const uint32_t D = profile_.shape.head_dim;
  const bool channel = h.vector_axis() == KvVectorAxis::kChannel;
  // Every vector coded on the token axis, f32 out, nothing to undo: the decoded rows are the page
  // (StoreSaturating stores f32 as is), so the quantizer writes them in place.
  if (out == DType::kF32 && !channel && h.counts.coded == n && !(h.flags & kKvFrameFlagCentered) &&
      !calibration_ && !profile_.renormalize) {
    absl::Status st = quantizer_->Decode(v.codes, n, DType::kF32, absl::Span<uint8_t>(dst, size_t{n} * len * 4), path);
    if (!st.ok()) return absl::Status(st.code(), absl::StrCat("frame code section: ", st.message()));
    return absl::OkStatus();
  }
  std::vector<float> dec(size_t{h.counts.coded} * len);
  if (h.counts.coded > 0) {
    absl::Status st = quantizer_->DecodeF32(v.codes, h.counts.coded, dec.data(), path);
    if (!st.ok()) return absl::Status(st.code(), absl::StrCat("frame code section: ", st.message()));
    std::vector<float> mean = FrameMean(v);
    UndoTransform(h.coords, mean.empty() ? nullptr : mean.data(), v.codes.data(), dec.data(), h.counts.coded);
  }
  const size_t rsize = DTypeSize(h.raw_dtype);
  uint32_t raw_i = 0, code_i = 0;
  for (uint32_t i = 0; i < n; ++i) {
    const bool raw = v.IsRaw(i);
    for (uint32_t j = 0; j < len; ++j) {
      float val;
      if (raw) {
        val = LoadElement(h.raw_dtype, v.raw.data() + (size_t{raw_i} * len) * rsize, j);
      } else {
        val = dec[size_t{code_i} * len + j];
      }
      const size_t pos = channel ? size_t{j} * D + i : size_t{i} * D + j;
      StoreSaturating(out, val, dst, pos);
    }
    if (raw) {
      ++raw_i;
    } else {
      ++code_i;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DecodedPage> KvCodec::DecodeFrame(absl::Span<const uint8_t> frame, DType out, CodecPath path) const {
  FQ_ASSIGN_OR_RETURN(KvFrameView v, VerifyFrame(frame));
  DecodedPage page;
  page.coords = v.header.coords;
  page.dtype = out;
  page.counts = v.header.counts;
  page.data.resize(size_t{v.header.coords.token_count} * profile_.shape.head_dim * DTypeSize(out));
  FQ_RETURN_IF_ERROR(DecodeVerified(v, out, page.data.data(), path));
  return page;
}

absl::StatusOr<DecodedPage> KvCodec::DecodeFrameInto(absl::Span<const uint8_t> frame, DType out, std::string* data,
                                                     CodecPath path) const {
  FQ_ASSIGN_OR_RETURN(KvFrameView v, VerifyFrame(frame));
  DecodedPage page;
  page.coords = v.header.coords;
  page.dtype = out;
  page.counts = v.header.counts;
  data->resize(size_t{v.header.coords.token_count} * profile_.shape.head_dim * DTypeSize(out));
  FQ_RETURN_IF_ERROR(DecodeVerified(v, out, reinterpret_cast<uint8_t*>(data->data()), path));
  return page;
}

absl::StatusOr<std::vector<uint8_t>> KvCodec::DecodeVector(absl::Span<const uint8_t> frame, uint32_t index, DType out,
                                                          CodecPath path) const {
  FQ_ASSIGN_OR_RETURN(KvFrameView v, VerifyFrame(frame));
  const KvFrameHeader& h = v.header;
  if (index >= h.counts.vector_count) {
    return absl::OutOfRangeError(absl::StrCat("vector index ", index, " is outside the frame (vector_count ",
                                              h.counts.vector_count, ")"));
  }
  const uint32_t len = h.vector_len;
  std::vector<uint8_t> res(size_t{len} * DTypeSize(out));
  const uint32_t rank = v.RawRank(index);
  if (v.IsRaw(index)) {
    const size_t rsize = DTypeSize(h.raw_dtype);
    const uint8_t* src = v.raw.data() + size_t{rank} * len * rsize;
    for (uint32_t j = 0; j < len; ++j) StoreSaturating(out, LoadElement(h.raw_dtype, src, j), res.data(), j);
    return res;
  }
  const uint32_t ci = index - rank;
  std::vector<float> dec(len);
  absl::Status st = quantizer_->DecodeF32(v.codes.subspan(size_t{ci} * h.code_bytes, h.code_bytes), 1, dec.data(), path);
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat("frame code of vector ", index, ": ", st.message()));
  std::vector<float> mean = FrameMean(v);
  UndoTransform(h.coords, mean.empty() ? nullptr : mean.data(), v.codes.data() + size_t{ci} * h.code_bytes,
                dec.data(), 1);
  for (uint32_t j = 0; j < len; ++j) StoreSaturating(out, dec[j], res.data(), j);
  return res;
}

}  // namespace fibquant
