#include "core/kv_receipt.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/digest.h"
#include "core/kv_internal.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

using kv_internal::S;

void WriteMetrics(CanonicalWriter* w, const KvQualityMetrics& m) {
  w->U64(m.tokens);
  w->U32(m.queries);
  w->Str(KvQuerySourceName(m.query_source));
  w->F64(m.reconstruction_mse);
  w->F64(m.cosine_similarity);
  for (const std::optional<double>* o : {&m.key_logit_mse, &m.attention_tv, &m.attention_kl, &m.topk_disagreement,
                                         &m.value_aggregation_mse}) {
    w->OptF64(o->has_value(), o->value_or(0));
  }
}

nlohmann::ordered_json MetricsJson(const KvQualityMetrics& m) {
  nlohmann::ordered_json j;
  j["tokens"] = m.tokens;
  j["queries"] = m.queries;
  j["query_source"] = S(KvQuerySourceName(m.query_source));
  j["reconstruction_mse"] = m.reconstruction_mse;
  j["cosine_similarity"] = m.cosine_similarity;
  auto opt = [](const std::optional<double>& v) {
    return v ? nlohmann::ordered_json(*v) : nlohmann::ordered_json(nullptr);
  };
  j["key_logit_mse"] = opt(m.key_logit_mse);
  j["attention_tv"] = opt(m.attention_tv);
  j["attention_kl"] = opt(m.attention_kl);
  j["topk_disagreement"] = opt(m.topk_disagreement);
  j["value_aggregation_mse"] = opt(m.value_aggregation_mse);
  return j;
}

std::string ListDigest(std::string_view domain, uint64_t count, const std::string& concat) {
  CanonicalWriter w(domain);
  w.U64(count);
  w.Bytes(concat.data(), concat.size());
  return w.Digest();
}

}  // namespace

std::string KvReceipt::CanonicalBytes() const {
  CanonicalWriter w(kKvReceiptSchema);
  w.Str(schema_version);
  w.Str(profile_id);
  w.Str(profile_digest);
  w.Str(shape_digest);
  w.Str(fib_profile_digest);
  w.Str(codebook_digest);
  w.Str(rotation_digest);
  w.Str(KvAxisPolicyName(axis_policy));
  w.Str(source_digest);
  w.Str(frames_digest);
  for (uint64_t v : {pages, vectors, vectors_compressed, raw_protected, raw_policy, raw_encode_fallback,
                     raw_quality_fallback, pages_with_quality_fallback, bytes_in, bytes_out}) {
    w.U64(v);
  }
  w.F64(compression_ratio);
  w.Bool(quality_mean.has_value());
  if (quality_mean) WriteMetrics(&w, *quality_mean);
  w.Bool(quality_max.has_value());
  if (quality_max) WriteMetrics(&w, *quality_max);
  w.U32(static_cast<uint32_t>(layer_head.size()));
  for (const KvLayerHeadQuality& q : layer_head) {
    w.U32(q.layer);
    w.U32(q.kv_head);
    w.U64(q.pages);
    WriteMetrics(&w, q.mean);
  }
  w.U32(static_cast<uint32_t>(budget.size()));
  for (const KvBudgetVerdict& b : budget) {
    w.Str(b.metric);
    w.F64(b.limit);
    w.F64(b.worst_value);
    w.U64(b.pages_over_before_fallback);
    w.U64(b.pages_failing);
    w.U64(b.pages_measured);
    w.Bool(b.passed);
  }
  w.Bool(budget_passed);
  w.U32(static_cast<uint32_t>(raw_reasons.size()));
  for (const std::string& r : raw_reasons) w.Str(r);
  return w.bytes();
}

std::string KvReceipt::ToJson(int indent) const {
  nlohmann::ordered_json j;
  j["schema_version"] = schema_version;
  j["profile_id"] = profile_id;
  j["profile_digest"] = profile_digest;
  j["shape_digest"] = shape_digest;
  j["fib_profile_digest"] = fib_profile_digest;
  j["codebook_digest"] = codebook_digest;
  j["rotation_digest"] = rotation_digest;
  j["axis_policy"] = S(KvAxisPolicyName(axis_policy));
  j["source_digest"] = source_digest;
  j["frames_digest"] = frames_digest;
  j["pages"] = pages;
  j["vectors"] = vectors;
  j["vectors_compressed"] = vectors_compressed;
  j["raw_protected"] = raw_protected;
  j["raw_policy"] = raw_policy;
  j["raw_encode_fallback"] = raw_encode_fallback;
  j["raw_quality_fallback"] = raw_quality_fallback;
  j["pages_with_quality_fallback"] = pages_with_quality_fallback;
  j["bytes_in"] = bytes_in;
  j["bytes_out"] = bytes_out;
  j["compression_ratio"] = compression_ratio;
  j["quality_mean"] = quality_mean ? MetricsJson(*quality_mean) : nlohmann::ordered_json(nullptr);
  j["quality_max"] = quality_max ? MetricsJson(*quality_max) : nlohmann::ordered_json(nullptr);
  nlohmann::ordered_json lh = nlohmann::ordered_json::array();
  for (const KvLayerHeadQuality& q : layer_head) {
    nlohmann::ordered_json e;
    e["layer"] = q.layer;
    e["kv_head"] = q.kv_head;
    e["pages"] = q.pages;
    e["mean"] = MetricsJson(q.mean);
    lh.push_back(e);
  }
  j["layer_head"] = lh;
  nlohmann::ordered_json bj = nlohmann::ordered_json::array();
  for (const KvBudgetVerdict& b : budget) {
    nlohmann::ordered_json e;
    e["metric"] = b.metric;
    e["limit"] = b.limit;
    e["worst_value"] = b.worst_value;
    e["pages_over_before_fallback"] = b.pages_over_before_fallback;
    e["pages_failing"] = b.pages_failing;
    e["pages_measured"] = b.pages_measured;
    e["passed"] = b.passed;
    bj.push_back(e);
  }
  j["budget"] = bj;
  j["budget_passed"] = budget_passed;
  j["raw_reasons"] = raw_reasons;
  j["digest"] = digest;
  j["recorded_unix_seconds"] =
      recorded_unix_seconds ? nlohmann::ordered_json(*recorded_unix_seconds) : nlohmann::ordered_json(nullptr);
  return j.dump(indent);
}

KvReceiptBuilder::KvReceiptBuilder(std::shared_ptr<const KvCodec> codec) : codec_(std::move(codec)) {
  const KvCompressionProfile& p = codec_->profile();
  receipt_.profile_id = p.profile_id;
  receipt_.profile_digest = codec_->profile_digest();
  receipt_.shape_digest = p.shape_digest;
  receipt_.fib_profile_digest = p.fib_profile_digest;
  receipt_.codebook_digest = p.codebook_digest;
  receipt_.rotation_digest = p.rotation_digest;
  receipt_.axis_policy = p.axis_policy;
  const KvQualityBudget& b = p.quality_budget;
  auto add = [&](const char* name, const std::optional<double>& limit) {
    if (!limit) return;
    KvBudgetVerdict v;
    v.metric = name;
    v.limit = *limit;
    receipt_.budget.push_back(v);
  };
  add("logit_mse", b.max_logit_mse);
  add("attention_tv", b.max_attention_tv);
  add("topk_disagreement", b.max_topk_disagreement);
  add("value_aggregation_mse", b.max_value_aggregation_mse);
}

absl::Status KvReceiptBuilder::Add(const CompressedPage& page) {
  if (page.frame.size() < kKvFrameHeaderBytes ||
      std::memcmp(page.frame.data() + 12, codec_->profile_digest_raw().data(), 32) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("receipt: page ", receipt_.pages,
                                                   " was not compressed with profile ", codec_->profile_digest()));
  }
  KvReceipt& r = receipt_;
  ++r.pages;
  r.vectors += page.counts.vector_count;
  r.vectors_compressed += page.counts.coded;
  r.raw_protected += page.counts.raw_protected;
  r.raw_policy += page.counts.raw_policy;
  r.raw_encode_fallback += page.counts.raw_encode_fallback;
  r.raw_quality_fallback += page.counts.raw_quality_fallback;
  if (page.counts.raw_quality_fallback > 0) ++r.pages_with_quality_fallback;
  r.bytes_in += page.input_bytes;
  r.bytes_out += page.frame.size();
  source_concat_.append(reinterpret_cast<const char*>(page.source_digest.data()), 32);
  frames_concat_.append(reinterpret_cast<const char*>(page.frame_digest.data()), 32);
  if (page.metrics) {
    overall_.Add(*page.metrics);
    per_head_[{page.coords.layer, page.coords.kv_head}].Add(*page.metrics);
  }
  for (KvBudgetVerdict& v : r.budget) {
    for (const KvBudgetCheck& c : page.budget_checks) {
      if (c.metric != v.metric) continue;
      ++v.pages_measured;
      v.worst_value = std::max(v.worst_value, c.value);
      if (c.value_before > c.limit) ++v.pages_over_before_fallback;
      if (c.value > c.limit) ++v.pages_failing;
    }
  }
  for (const std::string& reason : page.raw_reasons) {
    if (std::find(r.raw_reasons.begin(), r.raw_reasons.end(), reason) == r.raw_reasons.end()) {
      r.raw_reasons.push_back(reason);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<KvReceipt> KvReceiptBuilder::Finish(std::optional<int64_t> recorded_unix_seconds) {
  KvReceipt r = receipt_;
  r.source_digest = ListDigest("fq_kv_source_v1", r.pages, source_concat_);
  r.frames_digest = ListDigest("fq_kv_frames_v1", r.pages, frames_concat_);
  r.compression_ratio = r.bytes_out == 0 ? 0.0 : static_cast<double>(r.bytes_in) / static_cast<double>(r.bytes_out);
  if (overall_.pages() > 0) {
    r.quality_mean = overall_.Mean();
    r.quality_max = overall_.Max();
  }
  for (const auto& [key, acc] : per_head_) {  // std::map: sorted by (layer, kv_head)
    KvLayerHeadQuality q;
    q.layer = key.first;
    q.kv_head = key.second;
    q.pages = acc.pages();
    q.mean = acc.Mean();
    r.layer_head.push_back(q);
  }
  r.budget_passed = true;
  for (KvBudgetVerdict& v : r.budget) {
    v.passed = v.pages_failing == 0 && v.pages_measured == r.pages;
    r.budget_passed = r.budget_passed && v.passed;
  }
  r.digest = Sha256Digest(r.CanonicalBytes());
  r.recorded_unix_seconds = recorded_unix_seconds;
  return r;
}

}  // namespace fibquant
