#include "core/kv_profile.h"

#include <cmath>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/digest.h"
#include "core/kv_internal.h"
#include "core/rotation.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

using kv_internal::S;

bool IdCharOk(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-' || c == ':' || c == '/' || c == '+' || c == '@';
}

absl::Status CheckIndexList(const std::vector<uint32_t>& list, uint32_t bound, const char* field,
                            const char* bound_name) {
  if (list.size() > kMaxKvProtectedListLength) {
    return absl::ResourceExhaustedError(absl::StrCat("protected_policy.", field, " has more than ",
                                                     kMaxKvProtectedListLength, " entries"));
  }
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i] >= bound) {
      return absl::InvalidArgumentError(absl::StrCat("protected_policy.", field, "[", i, "] = ", list[i],
                                                     " is outside the shape (", bound_name, " ", bound, ")"));
    }
    if (i > 0 && list[i] <= list[i - 1]) {
      return absl::InvalidArgumentError(absl::StrCat("protected_policy.", field,
                                                     " must be strictly increasing; entry ", i, " is ", list[i],
                                                     " after ", list[i - 1]));
    }
  }
  return absl::OkStatus();
}

bool Contains(const std::vector<uint32_t>& v, uint32_t x) {
  for (uint32_t y : v) {
    if (y == x) return true;
  }
  return false;
}

// Raw bytes of one stored vector on the profile's axis (token: head_dim elements, channel:
// tokens_per_page elements) in the shape's dtype.
uint64_t AxisRawVectorBytes(const KvCompressionProfile& p) {
  const uint64_t len = p.vector_axis() == KvVectorAxis::kChannel ? p.page_geometry.tokens_per_page
                                                                  : p.shape.head_dim;
  return len * DTypeSize(p.shape.dtype);
}

absl::Status CheckBudgetValue(const std::optional<double>& v, const char* name) {
  if (!v) return absl::OkStatus();
  if (!std::isfinite(*v) || *v < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("quality_budget.", name, " must be finite and >= 0; got ", *v));
  }
  return absl::OkStatus();
}

nlohmann::ordered_json OptNum(const std::optional<double>& v) {
  return v ? nlohmann::ordered_json(*v) : nlohmann::ordered_json(nullptr);
}

}  // namespace

std::string_view KvFallbackModeName(KvFallbackMode v) {
  return v == KvFallbackMode::kKeepRaw ? "keep_raw" : "fail_closed";
}
absl::StatusOr<KvFallbackMode> ParseKvFallbackMode(std::string_view s) {
  if (s == "keep_raw") return KvFallbackMode::kKeepRaw;
  if (s == "fail_closed") return KvFallbackMode::kFailClosed;
  return absl::InvalidArgumentError(
      absl::StrCat("fallback mode must be \"keep_raw\" or \"fail_closed\"; got \"", S(s), "\""));
}

bool KvProtectedPolicy::ProtectsHead(uint32_t layer, uint32_t head) const {
  return Contains(raw_layers, layer) || Contains(raw_heads, head);
}

bool KvProtectedPolicy::IsProtected(const KvTensorShape& shape, uint32_t layer, uint32_t head,
                                    uint32_t token) const {
  if (token < first_tokens_raw) return true;
  if (uint64_t{token} + last_tokens_raw >= shape.tokens) return true;
  return ProtectsHead(layer, head);
}

absl::Status KvCompressionProfile::Validate() const {
  if (schema_version != kKvProfileSchema) {
    return absl::InvalidArgumentError(absl::StrCat("kv_profile.schema_version must be \"",
                                                   S(kKvProfileSchema), "\"; got \"", schema_version, "\""));
  }
  if (profile_id.empty() || profile_id.size() > kMaxKvProfileIdLength) {
    return absl::InvalidArgumentError(absl::StrCat("kv_profile.profile_id must be 1..", kMaxKvProfileIdLength,
                                                   " characters; got ", profile_id.size()));
  }
  for (char c : profile_id) {
    if (!IdCharOk(c)) {
      return absl::InvalidArgumentError(
          "kv_profile.profile_id may contain only letters, digits and . _ - : / + @");
    }
  }
  FQ_RETURN_IF_ERROR(shape.Validate());
  FQ_ASSIGN_OR_RETURN(std::string sd, shape.Digest());
  if (shape_digest != sd) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_profile.shape_digest mismatch: recorded \"", shape_digest, "\", recomputed ", sd));
  }
  if (role_policy != shape.role) {
    return absl::InvalidArgumentError(absl::StrCat("kv_profile.role_policy ", S(KvRoleName(role_policy)),
                                                   " must equal shape.role ", S(KvRoleName(shape.role))));
  }
  if (static_cast<uint8_t>(axis_policy) > 3) {
    return absl::InvalidArgumentError("kv_profile.axis_policy is not a known policy");
  }
  FQ_RETURN_IF_ERROR(page_geometry.ValidateFor(shape));
  if (axis_policy == KvAxisPolicy::kRaw) {
    if (fib_profile) {
      return absl::InvalidArgumentError("kv_profile.fib_profile must be absent for axis_policy raw");
    }
    if (!fib_profile_digest.empty() || !codebook_digest.empty() || !rotation_digest.empty()) {
      return absl::InvalidArgumentError(
          "kv_profile.fib_profile_digest, codebook_digest and rotation_digest must be empty for axis_policy raw");
    }
    if (page_geometry.encoded_vector_bytes != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "page_geometry.encoded_vector_bytes must be 0 for axis_policy raw; got ", page_geometry.encoded_vector_bytes));
    }
  } else {
    if (!fib_profile) {
      return absl::InvalidArgumentError(absl::StrCat("kv_profile.fib_profile is required for axis_policy ",
                                                     S(KvAxisPolicyName(axis_policy))));
    }
    const Profile& fp = *fib_profile;
    const bool channel = vector_axis() == KvVectorAxis::kChannel;
    const uint32_t want = channel ? page_geometry.tokens_per_page : shape.head_dim;
    if (fp.ambient_dim != want) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv_profile.fib_profile.ambient_dim must equal the vector length of the ", channel ? "channel" : "token",
          " axis (", channel ? "tokens_per_page" : "head_dim", " = ", want, "); got ", fp.ambient_dim));
    }
    {
      absl::Status st = fp.Validate();
      if (!st.ok()) return absl::Status(st.code(), absl::StrCat("kv_profile.fib_profile: ", st.message()));
    }
    FQ_ASSIGN_OR_RETURN(std::string fd, fp.Digest());
    if (fib_profile_digest != fd) {
      return absl::InvalidArgumentError(absl::StrCat("kv_profile.fib_profile_digest mismatch: recorded \"",
                                                     fib_profile_digest, "\", recomputed ", fd));
    }
    if (codebook_digest.empty() != rotation_digest.empty()) {
      return absl::InvalidArgumentError(
          "kv_profile.codebook_digest and rotation_digest must both be set (resolved) or both empty (spec)");
    }
    if (!codebook_digest.empty() && !IsDigestString(codebook_digest)) {
      return absl::InvalidArgumentError("kv_profile.codebook_digest must be \"sha256:\" + 64 lowercase hex");
    }
    if (!rotation_digest.empty() && !IsDigestString(rotation_digest)) {
      return absl::InvalidArgumentError("kv_profile.rotation_digest must be \"sha256:\" + 64 lowercase hex");
    }
    if (page_geometry.encoded_vector_bytes != fp.code_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat("page_geometry.encoded_vector_bytes must equal the code size ",
                                                     fp.code_bytes(), " of the fib profile; got ",
                                                     page_geometry.encoded_vector_bytes));
    }
  }
  const KvProtectedPolicy& pp = protected_policy;
  if (pp.first_tokens_raw > shape.tokens) {
    return absl::InvalidArgumentError(absl::StrCat("protected_policy.first_tokens_raw must be <= shape.tokens ",
                                                   shape.tokens, "; got ", pp.first_tokens_raw));
  }
  if (pp.last_tokens_raw > shape.tokens) {
    return absl::InvalidArgumentError(absl::StrCat("protected_policy.last_tokens_raw must be <= shape.tokens ",
                                                   shape.tokens, "; got ", pp.last_tokens_raw));
  }
  FQ_RETURN_IF_ERROR(CheckIndexList(pp.raw_layers, shape.layers, "raw_layers", "layers"));
  FQ_RETURN_IF_ERROR(CheckIndexList(pp.raw_heads, shape.kv_heads, "raw_heads", "kv_heads"));
  if (static_cast<uint8_t>(fallback_policy.mode) > 1) {
    return absl::InvalidArgumentError("fallback_policy.mode is not a known mode");
  }
  const uint64_t raw_bytes = AxisRawVectorBytes(*this);
  auto check_keep_raw = [&](const char* field) -> absl::Status {
    if (!fallback_policy.raw_fallback_available) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " keep_raw requires fallback_policy.raw_fallback_available = true"));
    }
    if (page_geometry.reserved_vector_bytes < raw_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, " keep_raw requires page_geometry.reserved_vector_bytes >= the raw vector size ", raw_bytes,
          "; got ", page_geometry.reserved_vector_bytes));
    }
    return absl::OkStatus();
  };
  if (fallback_policy.mode == KvFallbackMode::kKeepRaw) FQ_RETURN_IF_ERROR(check_keep_raw("fallback_policy.mode"));
  // Protected vectors (sinks, recent window, raw layers/heads) are stored raw whatever the fallback
  // mode, so a profile that protects anything must allow raw vectors and reserve room for them; a
  // profile declaring raw_fallback_available = false would otherwise still carry raw vectors.
  const bool protects = pp.first_tokens_raw > 0 || pp.last_tokens_raw > 0 || !pp.raw_layers.empty() ||
                        !pp.raw_heads.empty();
  if (protects && !fallback_policy.raw_fallback_available) {
    return absl::InvalidArgumentError(
        "protected_policy stores protected vectors raw, which fallback_policy.raw_fallback_available = false "
        "forbids: protect nothing (first_tokens_raw, last_tokens_raw, raw_layers, raw_heads all empty) or allow "
        "raw vectors");
  }
  if (protects && page_geometry.reserved_vector_bytes < raw_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "protected_policy stores protected vectors raw: page_geometry.reserved_vector_bytes must be >= the raw "
        "vector size ", raw_bytes, "; got ", page_geometry.reserved_vector_bytes));
  }
  const KvQualityBudget& b = quality_budget;
  FQ_RETURN_IF_ERROR(CheckBudgetValue(b.max_logit_mse, "max_logit_mse"));
  FQ_RETURN_IF_ERROR(CheckBudgetValue(b.max_attention_tv, "max_attention_tv"));
  FQ_RETURN_IF_ERROR(CheckBudgetValue(b.max_topk_disagreement, "max_topk_disagreement"));
  FQ_RETURN_IF_ERROR(CheckBudgetValue(b.max_value_aggregation_mse, "max_value_aggregation_mse"));
  if (b.top_k.has_value() && (*b.top_k < 1 || *b.top_k > 4096)) {
    return absl::InvalidArgumentError(absl::StrCat("quality_budget.top_k must be in [1, 4096]; got ", *b.top_k));
  }
  if (static_cast<uint8_t>(b.fallback_on_violation) > 1) {
    return absl::InvalidArgumentError("quality_budget.fallback_on_violation is not a known mode");
  }
  if (shape.role == KvRole::kKey && b.max_value_aggregation_mse) {
    return absl::InvalidArgumentError(
        "quality_budget.max_value_aggregation_mse cannot be measured on key pages (value profiles only)");
  }
  if (shape.role == KvRole::kValue && (b.max_logit_mse || b.max_attention_tv || b.max_topk_disagreement)) {
    return absl::InvalidArgumentError(
        "quality_budget.max_logit_mse / max_attention_tv / max_topk_disagreement cannot be measured on value "
        "pages (key profiles only)");
  }
  if (b.has_any_metric() && b.fallback_on_violation == KvFallbackMode::kKeepRaw) {
    FQ_RETURN_IF_ERROR(check_keep_raw("quality_budget.fallback_on_violation"));
  }
  if (calibration_digest != kMissingCalibration && !IsDigestString(calibration_digest)) {
    return absl::InvalidArgumentError(
        "kv_profile.calibration_digest must be \"missing:calibration\" or a \"sha256:\" digest");
  }
  if (static_cast<uint8_t>(centering) > 1) return absl::InvalidArgumentError("kv_profile.centering is not a known mode");
  if (static_cast<uint8_t>(channel_transform) > 1) {
    return absl::InvalidArgumentError("kv_profile.channel_transform is not a known mode");
  }
  if ((centering != KvCentering::kNone || channel_transform != KvChannelTransform::kNone || renormalize) &&
      (axis_policy == KvAxisPolicy::kRaw || vector_axis() != KvVectorAxis::kToken)) {
    return absl::InvalidArgumentError(
        "kv_profile.centering / channel_transform / renormalize apply to token vectors only (axis_policy per_token, or "
        "role_aware_kivi_style for values)");
  }
  if (channel_transform == KvChannelTransform::kCalibration && calibration_digest == kMissingCalibration) {
    return absl::InvalidArgumentError(
        "kv_profile.channel_transform \"calibration\" requires calibration_digest to name a calibration");
  }
  return absl::OkStatus();
}

std::string_view KvCenteringName(KvCentering v) { return v == KvCentering::kPage ? "page" : "none"; }

absl::StatusOr<KvCentering> ParseKvCentering(std::string_view s) {
  if (s == "none") return KvCentering::kNone;
  if (s == "page") return KvCentering::kPage;
  return absl::InvalidArgumentError(absl::StrCat("kv_profile.centering must be \"none\" or \"page\"; got \"", S(s), "\""));
}

std::string_view KvChannelTransformName(KvChannelTransform v) {
  return v == KvChannelTransform::kCalibration ? "calibration" : "none";
}

absl::StatusOr<KvChannelTransform> ParseKvChannelTransform(std::string_view s) {
  if (s == "none") return KvChannelTransform::kNone;
  if (s == "calibration") return KvChannelTransform::kCalibration;
  return absl::InvalidArgumentError(
      absl::StrCat("kv_profile.channel_transform must be \"none\" or \"calibration\"; got \"", S(s), "\""));
}

absl::Status KvCompressionProfile::ValidateDeep() const {
  FQ_RETURN_IF_ERROR(Validate());
  if (!fib_profile || rotation_digest.empty()) return absl::OkStatus();
  FQ_ASSIGN_OR_RETURN(Rotation rot, Rotation::Create(fib_profile->rotation_algorithm, fib_profile->rotation_dim(),
                                                     fib_profile->rotation_seed));
  if (rot.digest() != rotation_digest) {
    return absl::InvalidArgumentError(absl::StrCat("kv_profile.rotation_digest mismatch: recorded \"",
                                                   rotation_digest, "\", recomputed ", rot.digest()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> KvCompressionProfile::CanonicalBytes() const {
  FQ_RETURN_IF_ERROR(Validate());
  if (!resolved()) {
    return absl::FailedPreconditionError(
        "kv_profile is unresolved (codebook_digest empty): build a KvCodec to resolve it before digesting");
  }
  CanonicalWriter w(kKvProfileSchema);
  w.Str(schema_version);
  w.Str(profile_id);
  FQ_ASSIGN_OR_RETURN(std::string shape_bytes, shape.CanonicalBytes());
  w.Bytes(shape_bytes.data(), shape_bytes.size());
  w.Str(shape_digest);
  w.Bool(fib_profile.has_value());
  if (fib_profile) {
    FQ_ASSIGN_OR_RETURN(std::string fb, fib_profile->CanonicalBytes());
    w.Bytes(fb.data(), fb.size());
  }
  w.Str(fib_profile_digest);
  w.Str(codebook_digest);
  w.Str(rotation_digest);
  w.Str(KvRoleName(role_policy));
  w.Str(KvAxisPolicyName(axis_policy));
  const std::string gb = page_geometry.CanonicalBytes();
  w.Bytes(gb.data(), gb.size());
  w.U32(protected_policy.first_tokens_raw);
  w.U32(protected_policy.last_tokens_raw);
  w.U32(static_cast<uint32_t>(protected_policy.raw_layers.size()));
  for (uint32_t v : protected_policy.raw_layers) w.U32(v);
  w.U32(static_cast<uint32_t>(protected_policy.raw_heads.size()));
  for (uint32_t v : protected_policy.raw_heads) w.U32(v);
  w.Str(KvFallbackModeName(fallback_policy.mode));
  w.Bool(fallback_policy.raw_fallback_available);
  const KvQualityBudget& b = quality_budget;
  w.OptF64(b.max_logit_mse.has_value(), b.max_logit_mse.value_or(0));
  w.OptF64(b.max_attention_tv.has_value(), b.max_attention_tv.value_or(0));
  w.OptF64(b.max_topk_disagreement.has_value(), b.max_topk_disagreement.value_or(0));
  w.OptF64(b.max_value_aggregation_mse.has_value(), b.max_value_aggregation_mse.value_or(0));
  w.Str(KvFallbackModeName(b.fallback_on_violation));
  w.Str(calibration_digest);
  if (centering != KvCentering::kNone || channel_transform != KvChannelTransform::kNone || renormalize) {
    w.Str(KvCenteringName(centering));
    w.Str(KvChannelTransformName(channel_transform));
    w.Bool(renormalize);
  }
  // Appended only when set: every profile without it keeps the digest it had before the field.
  if (b.top_k.has_value()) {
    w.Str("quality_budget.top_k");
    w.U32(*b.top_k);
  }
  return w.bytes();
}

absl::StatusOr<std::string> KvCompressionProfile::Digest() const {
  FQ_ASSIGN_OR_RETURN(std::string bytes, CanonicalBytes());
  return Sha256Digest(bytes);
}

std::string KvCompressionProfile::ToJson(int indent) const {
  nlohmann::ordered_json j;
  j["schema_version"] = schema_version;
  j["profile_id"] = profile_id;
  j["shape"] = nlohmann::ordered_json::parse(shape.ToJson(-1));
  j["shape_digest"] = shape_digest;
  j["fib_profile"] = fib_profile ? nlohmann::ordered_json::parse(fib_profile->ToJson(-1))
                                 : nlohmann::ordered_json(nullptr);
  j["fib_profile_digest"] = fib_profile_digest;
  j["codebook_digest"] = codebook_digest;
  j["rotation_digest"] = rotation_digest;
  j["role_policy"] = S(KvRoleName(role_policy));
  j["axis_policy"] = S(KvAxisPolicyName(axis_policy));
  nlohmann::ordered_json g;
  g["tokens_per_page"] = page_geometry.tokens_per_page;
  g["head_dim"] = page_geometry.head_dim;
  g["encoded_vector_bytes"] = page_geometry.encoded_vector_bytes;
  g["raw_vector_bytes"] = page_geometry.raw_vector_bytes;
  g["reserved_vector_bytes"] = page_geometry.reserved_vector_bytes;
  j["page_geometry"] = g;
  nlohmann::ordered_json p;
  p["first_tokens_raw"] = protected_policy.first_tokens_raw;
  p["last_tokens_raw"] = protected_policy.last_tokens_raw;
  p["raw_layers"] = protected_policy.raw_layers;
  p["raw_heads"] = protected_policy.raw_heads;
  j["protected_policy"] = p;
  nlohmann::ordered_json f;
  f["mode"] = S(KvFallbackModeName(fallback_policy.mode));
  f["raw_fallback_available"] = fallback_policy.raw_fallback_available;
  j["fallback_policy"] = f;
  nlohmann::ordered_json b;
  b["max_logit_mse"] = OptNum(quality_budget.max_logit_mse);
  b["max_attention_tv"] = OptNum(quality_budget.max_attention_tv);
  b["max_topk_disagreement"] = OptNum(quality_budget.max_topk_disagreement);
  b["max_value_aggregation_mse"] = OptNum(quality_budget.max_value_aggregation_mse);
  b["fallback_on_violation"] = S(KvFallbackModeName(quality_budget.fallback_on_violation));
  if (quality_budget.top_k) b["top_k"] = *quality_budget.top_k;
  j["quality_budget"] = b;
  j["calibration_digest"] = calibration_digest;
  if (centering != KvCentering::kNone) j["centering"] = S(KvCenteringName(centering));
  if (channel_transform != KvChannelTransform::kNone) j["channel_transform"] = S(KvChannelTransformName(channel_transform));
  if (renormalize) j["renormalize"] = true;
  return j.dump(indent);
}

namespace {

absl::StatusOr<std::vector<uint32_t>> GetU32List(const nlohmann::json& obj, std::string_view ctx, const char* f) {
  if (!obj.contains(f)) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " is required"));
  const nlohmann::json& v = obj.at(f);
  if (!v.is_array()) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " must be an array"));
  if (v.size() > kMaxKvProtectedListLength) {
    return absl::ResourceExhaustedError(absl::StrCat(S(ctx), ".", f, " has more than ",
                                                     kMaxKvProtectedListLength, " entries"));
  }
  std::vector<uint32_t> out;
  for (size_t i = 0; i < v.size(); ++i) {
    nlohmann::json wrap = {{"v", v[i]}};
    auto r = kv_internal::GetU32(wrap, absl::StrCat(S(ctx), ".", f, "[", i, "]"), "v");
    if (!r.ok()) return r.status();
    out.push_back(*r);
  }
  return out;
}

absl::StatusOr<KvProtectedPolicy> ParseProtected(const nlohmann::json& p, bool all_required) {
  using namespace kv_internal;
  constexpr std::string_view kCtx = "protected_policy";
  std::initializer_list<const char*> fields = {"first_tokens_raw", "last_tokens_raw", "raw_layers", "raw_heads"};
  FQ_RETURN_IF_ERROR(CheckKeys(p, kCtx, fields, all_required ? fields : std::initializer_list<const char*>{}));
  KvProtectedPolicy out;
  if (p.contains("first_tokens_raw")) {
    FQ_ASSIGN_OR_RETURN(out.first_tokens_raw, GetU32(p, kCtx, "first_tokens_raw"));
  }
  if (p.contains("last_tokens_raw")) {
    FQ_ASSIGN_OR_RETURN(out.last_tokens_raw, GetU32(p, kCtx, "last_tokens_raw"));
  }
  if (p.contains("raw_layers")) {
    FQ_ASSIGN_OR_RETURN(out.raw_layers, GetU32List(p, kCtx, "raw_layers"));
  }
  if (p.contains("raw_heads")) {
    FQ_ASSIGN_OR_RETURN(out.raw_heads, GetU32List(p, kCtx, "raw_heads"));
  }
  return out;
}

absl::StatusOr<KvFallbackPolicy> ParseFallback(const nlohmann::json& f, bool all_required) {
  using namespace kv_internal;
  constexpr std::string_view kCtx = "fallback_policy";
  std::initializer_list<const char*> fields = {"mode", "raw_fallback_available"};
  FQ_RETURN_IF_ERROR(CheckKeys(f, kCtx, fields, all_required ? fields : std::initializer_list<const char*>{"mode"}));
  KvFallbackPolicy out;
  FQ_ASSIGN_OR_RETURN(std::string mode, GetString(f, kCtx, "mode"));
  FQ_ASSIGN_OR_RETURN(out.mode, ParseKvFallbackMode(mode));
  out.raw_fallback_available = out.mode == KvFallbackMode::kKeepRaw;
  if (f.contains("raw_fallback_available")) {
    FQ_ASSIGN_OR_RETURN(out.raw_fallback_available, GetBool(f, kCtx, "raw_fallback_available"));
  }
  return out;
}

absl::StatusOr<KvQualityBudget> ParseBudget(const nlohmann::json& b, bool all_required) {
  using namespace kv_internal;
  constexpr std::string_view kCtx = "quality_budget";
  std::initializer_list<const char*> required = {"max_logit_mse", "max_attention_tv", "max_topk_disagreement",
                                                 "max_value_aggregation_mse", "fallback_on_violation"};
  std::initializer_list<const char*> fields = {"max_logit_mse", "max_attention_tv", "max_topk_disagreement",
                                               "max_value_aggregation_mse", "fallback_on_violation", "top_k"};
  FQ_RETURN_IF_ERROR(CheckKeys(b, kCtx, fields, all_required ? required : std::initializer_list<const char*>{}));
  KvQualityBudget out;
  FQ_ASSIGN_OR_RETURN(out.max_logit_mse, GetOptDouble(b, kCtx, "max_logit_mse"));
  FQ_ASSIGN_OR_RETURN(out.max_attention_tv, GetOptDouble(b, kCtx, "max_attention_tv"));
  FQ_ASSIGN_OR_RETURN(out.max_topk_disagreement, GetOptDouble(b, kCtx, "max_topk_disagreement"));
  FQ_ASSIGN_OR_RETURN(out.max_value_aggregation_mse, GetOptDouble(b, kCtx, "max_value_aggregation_mse"));
  if (b.contains("top_k")) {
    FQ_ASSIGN_OR_RETURN(uint32_t k, GetU32(b, kCtx, "top_k"));
    out.top_k = k;
  }
  if (b.contains("fallback_on_violation")) {
    FQ_ASSIGN_OR_RETURN(std::string m, GetString(b, kCtx, "fallback_on_violation"));
    FQ_ASSIGN_OR_RETURN(out.fallback_on_violation, ParseKvFallbackMode(m));
  }
  return out;
}

absl::StatusOr<KvTensorShape> ParseShapeValue(nlohmann::json s, bool lenient_schema) {
  if (!s.is_object()) return absl::InvalidArgumentError("kv_profile.shape must be a JSON object");
  if (lenient_schema && !s.contains("schema_version")) s["schema_version"] = S(kKvShapeSchema);
  return KvTensorShape::FromJson(s.dump());
}

// The optional "centering" and "channel_transform" strings (absent: "none").
absl::Status ParseCenteringFields(const nlohmann::json& j, std::string_view ctx, KvCompressionProfile* p) {
  using namespace kv_internal;
  if (j.contains("centering")) {
    FQ_ASSIGN_OR_RETURN(std::string c, GetString(j, ctx, "centering"));
    FQ_ASSIGN_OR_RETURN(p->centering, ParseKvCentering(c));
  }
  if (j.contains("channel_transform")) {
    FQ_ASSIGN_OR_RETURN(std::string c, GetString(j, ctx, "channel_transform"));
    FQ_ASSIGN_OR_RETURN(p->channel_transform, ParseKvChannelTransform(c));
  }
  if (j.contains("renormalize")) {
    FQ_ASSIGN_OR_RETURN(p->renormalize, GetBool(j, ctx, "renormalize"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<KvCompressionProfile> KvCompressionProfile::FromJson(std::string_view json) {
  using namespace kv_internal;
  FQ_ASSIGN_OR_RETURN(nlohmann::json j, ParseJsonObject(json, "kv_profile"));
  constexpr std::string_view kCtx = "kv_profile";
  std::initializer_list<const char*> fields = {
      "schema_version", "profile_id",    "shape",           "shape_digest",     "fib_profile",
      "fib_profile_digest", "codebook_digest", "rotation_digest", "role_policy", "axis_policy",
      "page_geometry", "protected_policy", "fallback_policy", "quality_budget", "calibration_digest"};
  std::initializer_list<const char*> allowed = {
      "schema_version", "profile_id",    "shape",           "shape_digest",     "fib_profile",
      "fib_profile_digest", "codebook_digest", "rotation_digest", "role_policy", "axis_policy",
      "page_geometry", "protected_policy", "fallback_policy", "quality_budget", "calibration_digest",
      "centering", "channel_transform", "renormalize"};
  FQ_RETURN_IF_ERROR(CheckKeys(j, kCtx, allowed, fields));
  KvCompressionProfile p;
  FQ_ASSIGN_OR_RETURN(p.schema_version, GetString(j, kCtx, "schema_version"));
  FQ_ASSIGN_OR_RETURN(p.profile_id, GetString(j, kCtx, "profile_id"));
  FQ_ASSIGN_OR_RETURN(p.shape, ParseShapeValue(j.at("shape"), false));
  FQ_ASSIGN_OR_RETURN(p.shape_digest, GetString(j, kCtx, "shape_digest"));
  if (!j.at("fib_profile").is_null()) {
    auto fp = Profile::FromJsonValue(j.at("fib_profile"));
    if (!fp.ok()) return absl::Status(fp.status().code(), absl::StrCat("kv_profile.fib_profile: ", fp.status().message()));
    p.fib_profile = *std::move(fp);
  }
  FQ_ASSIGN_OR_RETURN(p.fib_profile_digest, GetString(j, kCtx, "fib_profile_digest"));
  FQ_ASSIGN_OR_RETURN(p.codebook_digest, GetString(j, kCtx, "codebook_digest"));
  FQ_ASSIGN_OR_RETURN(p.rotation_digest, GetString(j, kCtx, "rotation_digest"));
  FQ_ASSIGN_OR_RETURN(std::string role, GetString(j, kCtx, "role_policy"));
  FQ_ASSIGN_OR_RETURN(p.role_policy, ParseKvRole(role));
  FQ_ASSIGN_OR_RETURN(std::string axis, GetString(j, kCtx, "axis_policy"));
  FQ_ASSIGN_OR_RETURN(p.axis_policy, ParseKvAxisPolicy(axis));
  {
    const nlohmann::json& g = j.at("page_geometry");
    constexpr std::string_view kG = "page_geometry";
    std::initializer_list<const char*> gf = {"tokens_per_page", "head_dim", "encoded_vector_bytes",
                                             "raw_vector_bytes", "reserved_vector_bytes"};
    FQ_RETURN_IF_ERROR(CheckKeys(g, kG, gf, gf));
    FQ_ASSIGN_OR_RETURN(p.page_geometry.tokens_per_page, GetU32(g, kG, "tokens_per_page"));
    FQ_ASSIGN_OR_RETURN(p.page_geometry.head_dim, GetU32(g, kG, "head_dim"));
    FQ_ASSIGN_OR_RETURN(p.page_geometry.encoded_vector_bytes, GetU32(g, kG, "encoded_vector_bytes"));
    FQ_ASSIGN_OR_RETURN(p.page_geometry.raw_vector_bytes, GetU32(g, kG, "raw_vector_bytes"));
    FQ_ASSIGN_OR_RETURN(p.page_geometry.reserved_vector_bytes, GetU32(g, kG, "reserved_vector_bytes"));
  }
  FQ_ASSIGN_OR_RETURN(p.protected_policy, ParseProtected(j.at("protected_policy"), true));
  FQ_ASSIGN_OR_RETURN(p.fallback_policy, ParseFallback(j.at("fallback_policy"), true));
  FQ_ASSIGN_OR_RETURN(p.quality_budget, ParseBudget(j.at("quality_budget"), true));
  FQ_ASSIGN_OR_RETURN(p.calibration_digest, GetString(j, kCtx, "calibration_digest"));
  FQ_RETURN_IF_ERROR(ParseCenteringFields(j, kCtx, &p));
  FQ_RETURN_IF_ERROR(p.Validate());
  return p;
}

absl::StatusOr<KvCompressionProfile> KvCompressionProfile::FromSpecJson(std::string_view json) {
  using namespace kv_internal;
  FQ_ASSIGN_OR_RETURN(nlohmann::json j, ParseJsonObject(json, "kv_profile spec"));
  constexpr std::string_view kCtx = "kv_profile spec";
  FQ_RETURN_IF_ERROR(CheckKeys(j, kCtx,
                               {"profile_id", "shape", "axis_policy", "tokens_per_page", "fibquant", "fib_profile",
                                "reserved_vector_bytes", "protected", "fallback", "quality_budget",
                                "calibration_digest", "centering", "channel_transform", "renormalize"},
                               {"profile_id", "shape", "axis_policy", "tokens_per_page"}));
  KvCompressionProfile p;
  FQ_ASSIGN_OR_RETURN(p.profile_id, GetString(j, kCtx, "profile_id"));
  FQ_ASSIGN_OR_RETURN(p.shape, ParseShapeValue(j.at("shape"), true));
  FQ_ASSIGN_OR_RETURN(p.shape_digest, p.shape.Digest());
  p.role_policy = p.shape.role;
  FQ_ASSIGN_OR_RETURN(std::string axis, GetString(j, kCtx, "axis_policy"));
  FQ_ASSIGN_OR_RETURN(p.axis_policy, ParseKvAxisPolicy(axis));
  FQ_ASSIGN_OR_RETURN(p.page_geometry.tokens_per_page, GetU32(j, kCtx, "tokens_per_page"));
  p.page_geometry.head_dim = p.shape.head_dim;
  p.page_geometry.raw_vector_bytes = static_cast<uint32_t>(p.shape.head_dim * DTypeSize(p.shape.dtype));
  if (j.contains("fibquant") && j.contains("fib_profile")) {
    return absl::InvalidArgumentError("kv_profile spec: give either \"fibquant\" or \"fib_profile\", not both");
  }
  const bool channel = p.vector_axis() == KvVectorAxis::kChannel;
  const uint32_t ambient = channel ? p.page_geometry.tokens_per_page : p.shape.head_dim;
  if (p.axis_policy == KvAxisPolicy::kRaw) {
    if (j.contains("fibquant") || j.contains("fib_profile")) {
      return absl::InvalidArgumentError("kv_profile spec: axis_policy raw takes no fibquant parameters");
    }
  } else if (j.contains("fibquant")) {
    nlohmann::json fq = j.at("fibquant");
    if (!fq.is_object()) return absl::InvalidArgumentError("kv_profile spec.fibquant must be a JSON object");
    if (!fq.contains("ambient_dim")) fq["ambient_dim"] = ambient;
    auto fp = Profile::FromSpecJson(fq.dump());
    if (!fp.ok()) return absl::Status(fp.status().code(), absl::StrCat("kv_profile spec.fibquant: ", fp.status().message()));
    p.fib_profile = *std::move(fp);
  } else if (j.contains("fib_profile")) {
    auto fp = Profile::FromJsonValue(j.at("fib_profile"));
    if (!fp.ok()) return absl::Status(fp.status().code(), absl::StrCat("kv_profile spec.fib_profile: ", fp.status().message()));
    p.fib_profile = *std::move(fp);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("kv_profile spec: \"fibquant\" (or \"fib_profile\") is required for axis_policy ",
                                                   axis));
  }
  if (p.fib_profile) {
    if (p.fib_profile->ambient_dim != ambient) {
      return absl::InvalidArgumentError(absl::StrCat("kv_profile spec: fib profile ambient_dim must be ", ambient, " (",
                                                     channel ? "tokens_per_page" : "head_dim", "); got ",
                                                     p.fib_profile->ambient_dim));
    }
    auto fd = p.fib_profile->Digest();
    if (!fd.ok()) return fd.status();
    p.fib_profile_digest = *fd;
    p.page_geometry.encoded_vector_bytes = static_cast<uint32_t>(p.fib_profile->code_bytes());
  }
  if (j.contains("protected")) {
    FQ_ASSIGN_OR_RETURN(p.protected_policy, ParseProtected(j.at("protected"), false));
  }
  if (j.contains("fallback")) {
    FQ_ASSIGN_OR_RETURN(p.fallback_policy, ParseFallback(j.at("fallback"), false));
  }
  if (j.contains("quality_budget")) {
    FQ_ASSIGN_OR_RETURN(p.quality_budget, ParseBudget(j.at("quality_budget"), false));
  }
  if (j.contains("calibration_digest")) {
    FQ_ASSIGN_OR_RETURN(p.calibration_digest, GetString(j, kCtx, "calibration_digest"));
  }
  FQ_RETURN_IF_ERROR(ParseCenteringFields(j, kCtx, &p));
  if (j.contains("reserved_vector_bytes")) {
    FQ_ASSIGN_OR_RETURN(p.page_geometry.reserved_vector_bytes, GetU32(j, kCtx, "reserved_vector_bytes"));
  } else {
    const KvProtectedPolicy& pp = p.protected_policy;
    const bool may_raw = p.fallback_policy.mode == KvFallbackMode::kKeepRaw ||
                         pp.first_tokens_raw > 0 || pp.last_tokens_raw > 0 || !pp.raw_layers.empty() ||
                         !pp.raw_heads.empty() ||
                         (p.quality_budget.has_any_metric() &&
                          p.quality_budget.fallback_on_violation == KvFallbackMode::kKeepRaw) ||
                         p.axis_policy == KvAxisPolicy::kRaw;
    const uint64_t axis_raw = uint64_t{ambient} * DTypeSize(p.shape.dtype);
    uint64_t reserve = p.page_geometry.encoded_vector_bytes;
    if (may_raw && axis_raw > reserve) reserve = axis_raw;
    p.page_geometry.reserved_vector_bytes = static_cast<uint32_t>(reserve);
  }
  FQ_RETURN_IF_ERROR(p.Validate());
  return p;
}

}  // namespace fibquant
