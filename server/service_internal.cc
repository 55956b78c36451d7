// Definitions of the helpers shared by the service's RPC files (server/service_internal.h).
#include "server/service_internal.h"

#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/digest.h"
#include "core/kv_codec.h"
#include "core/kv_receipt.h"
#include "server/metrics.h"
#include "server/registry.h"
#include <nlohmann/json.hpp>

namespace fibquant::server::internal {

namespace v1 = ::fibquant::v1;
using nlohmann::json;
int64_t NowUnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::Status Prefixed(const absl::Status& s, const std::string& prefix) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

[[nodiscard]] absl::StatusOr<DType> FromProtoDType(v1::DType d, std::string_view field) {
  switch (d) {
    case v1::DTYPE_F32: return DType::kF32;
    case v1::DTYPE_F16: return DType::kF16;
    case v1::DTYPE_BF16: return DType::kBF16;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(field), " must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16"));
  }
}

// The structured spec rendered as the KV layer's spec JSON (KvCompressionProfile::FromSpecJson),
// with the documented defaults for fields proto3 cannot mark as absent.
std::string SpecToJson(const v1::KvProfileSpec& s) {
  json j;
  j["profile_id"] = s.profile_id();
  const v1::KvShape& sh = s.shape();
  const bool value = sh.role() == "value";
  j["shape"] = {{"role", sh.role()},
                {"attention_kind", sh.attention_kind().empty() ? "mha" : sh.attention_kind()},
                {"batch", sh.batch() == 0 ? 1u : sh.batch()},
                {"layers", sh.layers()},
                {"kv_heads", sh.kv_heads()},
                {"query_heads", sh.query_heads() == 0 ? sh.kv_heads() : sh.query_heads()},
                {"tokens", sh.tokens()},
                {"head_dim", sh.head_dim()},
                {"dtype", sh.dtype().empty() ? "f32" : sh.dtype()},
                {"rope_state", !sh.rope_state().empty() ? sh.rope_state()
                                                        : (value ? "not_applicable" : "pre_rope")}};
  const std::string axis = s.axis_policy().empty() ? "per_token" : s.axis_policy();
  j["axis_policy"] = axis;
  j["tokens_per_page"] = s.page_geometry().tokens_per_page();
  if (s.page_geometry().has_reserved_vector_bytes()) {
    j["reserved_vector_bytes"] = s.page_geometry().reserved_vector_bytes();
  }
  if (axis != "raw" || s.has_fibquant()) {
    const v1::FibQuantParams& f = s.fibquant();
    json fq = {{"block_dim", f.block_dim()}, {"codebook_size", f.codebook_size()}, {"seed", f.seed()}};
    if (!f.rotation_algorithm().empty()) fq["rotation_algorithm"] = f.rotation_algorithm();
    if (f.has_lloyd_restarts()) fq["lloyd_restarts"] = f.lloyd_restarts();
    if (f.has_lloyd_iterations()) fq["lloyd_iterations"] = f.lloyd_iterations();
    if (f.has_training_samples()) fq["training_samples"] = f.training_samples();
    if (!f.empty_cell_policy().empty()) fq["empty_cell_policy"] = f.empty_cell_policy();
    j["fibquant"] = fq;
  }
  if (s.has_protected_regions()) {
    const auto& p = s.protected_regions();
    j["protected"] = {{"first_tokens_raw", p.first_tokens_raw()},
                      {"last_tokens_raw", p.last_tokens_raw()},
                      {"raw_layers", std::vector<uint32_t>(p.raw_layers().begin(), p.raw_layers().end())},
                      {"raw_heads", std::vector<uint32_t>(p.raw_heads().begin(), p.raw_heads().end())}};
  }
  if (s.has_fallback()) {
    json f = {{"mode", s.fallback().mode().empty() ? "keep_raw" : s.fallback().mode()}};
    if (s.fallback().has_raw_fallback_available()) {
      f["raw_fallback_available"] = s.fallback().raw_fallback_available();
    }
    j["fallback"] = f;
  }
  if (s.has_quality_budget()) {
    const auto& b = s.quality_budget();
    json q = json::object();
    if (b.has_max_logit_mse()) q["max_logit_mse"] = b.max_logit_mse();
    if (b.has_max_attention_tv()) q["max_attention_tv"] = b.max_attention_tv();
    if (b.has_max_topk_disagreement()) q["max_topk_disagreement"] = b.max_topk_disagreement();
    if (b.has_max_value_aggregation_mse()) q["max_value_aggregation_mse"] = b.max_value_aggregation_mse();
    if (!b.fallback_on_violation().empty()) q["fallback_on_violation"] = b.fallback_on_violation();
    if (b.top_k() != 0) q["top_k"] = b.top_k();
    j["quality_budget"] = q;
  }
  if (!s.calibration_digest().empty()) j["calibration_digest"] = s.calibration_digest();
  return j.dump();
}

// Saturating a * b.
uint64_t MulSat(uint64_t a, uint64_t b) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return std::numeric_limits<uint64_t>::max();
  return a * b;
}


BuildCostParts BuildCostOf(const KvCompressionProfile& p) {
  BuildCostParts parts;
  if (!p.fib_profile.has_value()) return parts;
  const Profile& f = *p.fib_profile;
  parts.lloyd = 1;
  for (uint64_t x : {uint64_t{f.training_samples}, uint64_t{f.codebook_size}, uint64_t{f.block_dim},
                     uint64_t{f.lloyd_iterations}, uint64_t{f.lloyd_restarts}}) {
    parts.lloyd = MulSat(parts.lloyd, x);
  }
  const uint64_t d = f.rotation_dim();
  if (f.rotation_algorithm == kRotationHaarQr) {
    parts.rotation = MulSat(MulSat(d, d), d);
  } else {
    uint64_t log2d = 0;
    while ((uint64_t{1} << log2d) < d) ++log2d;
    parts.rotation = MulSat(d, log2d);
  }
  return parts;
}

uint64_t BuildCost(const KvCompressionProfile& p) { return BuildCostOf(p).total(); }

absl::Status CheckBuildCost(const KvCompressionProfile& p, uint64_t limit) {
  const BuildCostParts parts = BuildCostOf(p);
  if (parts.total() <= limit) return absl::OkStatus();
  const Profile& f = *p.fib_profile;
  return absl::ResourceExhaustedError(absl::StrCat(
      "profile build cost ", parts.total(), " (Lloyd: training_samples ", f.training_samples,
      " x codebook_size ", f.codebook_size, " x block_dim ", f.block_dim, " x lloyd_iterations ",
      f.lloyd_iterations, " x lloyd_restarts ", f.lloyd_restarts, " = ", parts.lloyd, "; rotation ",
      f.rotation_algorithm, " at head_dim ", f.ambient_dim, ": ", parts.rotation,
      f.rotation_algorithm == kRotationHaarQr ? " = head_dim^3, a Hadamard rotation costs far less" : "",
      ") exceeds max_profile_build_cost ", limit));
}

// Identity of a spec before its codebook exists: the unresolved profile's JSON. Registering the
// same spec again finds its digest here and skips the build.
std::string SpecKey(KvCompressionProfile p) {
  p.codebook_digest.clear();
  p.rotation_digest.clear();
  return p.ToJson(0);
}

void FillProfileInfo(const ProfileEntry& e, v1::ProfileInfo* out) {
  const KvCompressionProfile& p = e.codec->profile();
  out->set_digest(e.digest);
  out->set_profile_id(p.profile_id);
  out->set_profile_json(e.profile_json);
  out->set_fibquant_profile_digest(p.fib_profile_digest);
  out->set_codebook_digest(p.codebook_digest);
  out->set_rotation_digest(p.rotation_digest);
  out->set_head_dim(p.shape.head_dim);
  v1::BuildStats* st = out->mutable_build_stats();
  st->set_seconds(e.build_seconds);
  st->set_threads(e.build_threads);
  st->set_loaded_from_disk(e.loaded_from_disk);
  st->set_cost(BuildCost(p));
  if (p.fib_profile.has_value()) {
    const Profile& f = *p.fib_profile;
    out->set_block_dim(f.block_dim);
    out->set_codebook_size(f.codebook_size);
    out->set_wire_index_bits(f.wire_index_bits);
    out->set_code_bytes_per_vector(static_cast<uint32_t>(f.code_bytes()));
    out->set_paper_bits_per_coord(f.paper_rate_bits_per_coord);
    out->set_wire_bits_per_coord(f.wire_bits_per_coord);
    out->set_rotation_algorithm(f.rotation_algorithm);
  }
  if (e.codec->quantizer()) {
    const LloydReport& r = e.codec->quantizer()->codebook().report();
    st->set_init_mse(r.init_mse);
    st->set_training_mse(r.best_mse);
    st->set_best_restart(r.best_restart);
    st->set_empty_cells_repaired(static_cast<uint32_t>(r.repair_events.size()));
  }
  out->set_registered_unix_seconds(e.registered_unix_seconds);
}

void FillPageMetrics(const CompressedPage& page, v1::PageMetrics* m) {
  m->set_compressed_vectors(page.counts.coded);
  m->set_raw_vectors(page.counts.raw_total());
  for (const auto& r : page.raw_reasons) m->add_raw_reasons(r);
  if (!page.metrics.has_value()) {
    m->set_query_source("none");
    return;
  }
  const KvQualityMetrics& q = *page.metrics;
  m->set_mse(q.reconstruction_mse);
  m->set_cosine_similarity(q.cosine_similarity);
  if (q.key_logit_mse) m->set_key_logit_mse(*q.key_logit_mse);
  if (q.attention_tv) m->set_attention_tv(*q.attention_tv);
  if (q.attention_kl) m->set_attention_kl(*q.attention_kl);
  if (q.topk_disagreement) m->set_topk_disagreement(*q.topk_disagreement);
  if (q.value_aggregation_mse) m->set_value_aggregation_mse(*q.value_aggregation_mse);
  m->set_query_source(std::string(KvQuerySourceName(q.query_source)));
}

void FillQualityMetrics(const KvQualityMetrics& q, v1::QualityMetrics* m) {
  m->set_reconstruction_mse(q.reconstruction_mse);
  m->set_cosine_similarity(q.cosine_similarity);
  if (q.key_logit_mse) m->set_key_logit_mse(*q.key_logit_mse);
  if (q.attention_tv) m->set_attention_tv(*q.attention_tv);
  if (q.attention_kl) m->set_attention_kl(*q.attention_kl);
  if (q.topk_disagreement) m->set_topk_disagreement(*q.topk_disagreement);
  if (q.value_aggregation_mse) m->set_value_aggregation_mse(*q.value_aggregation_mse);
  m->set_query_source(std::string(KvQuerySourceName(q.query_source)));
}

void RecordPageMetrics(Metrics* metrics, const CompressedPage& page) {
  if (metrics == nullptr) return;
  metrics->AddPages("compress", 1);
  metrics->AddBytes("raw_in", page.input_bytes);
  metrics->AddBytes("compressed_out", page.frame.size());
  metrics->AddVectors("compressed", page.counts.coded);
  metrics->AddVectors("raw_protected", page.counts.raw_protected + page.counts.raw_policy);
  metrics->AddVectors("raw_fallback", page.counts.raw_encode_fallback + page.counts.raw_quality_fallback);
  if (page.counts.raw_encode_fallback > 0) metrics->AddFallback("encode_failure");
  if (page.counts.raw_quality_fallback > 0) metrics->AddFallback("quality_budget");
  if (!page.frame.empty()) {
    metrics->ObserveCompressionRatio(static_cast<double>(page.input_bytes) / static_cast<double>(page.frame.size()));
  }
  if (page.metrics.has_value()) {
    metrics->ObserveDistortion("mse", page.metrics->reconstruction_mse);
    metrics->ObserveDistortion("cosine_distance", 1.0 - page.metrics->cosine_similarity);
  }
}

}  // namespace fibquant::server::internal
