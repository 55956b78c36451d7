#include "core/kv_shape.h"

#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/digest.h"
#include "core/kv_internal.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

using kv_internal::S;

// Multiplies into *acc; false on u64 overflow.
bool MulChecked(uint64_t* acc, uint64_t f) {
  if (f != 0 && *acc > std::numeric_limits<uint64_t>::max() / f) return false;
  *acc *= f;
  return true;
}

}  // namespace

std::string_view KvRoleName(KvRole v) { return v == KvRole::kKey ? "key" : "value"; }
std::string_view KvAttentionKindName(KvAttentionKind v) {
  switch (v) {
    case KvAttentionKind::kMha: return "mha";
    case KvAttentionKind::kMqa: return "mqa";
    case KvAttentionKind::kGqa: return "gqa";
  }
  return "unknown";
}
std::string_view KvRopeStateName(KvRopeState v) {
  switch (v) {
    case KvRopeState::kPreRope: return "pre_rope";
    case KvRopeState::kPostRope: return "post_rope";
    case KvRopeState::kNotApplicable: return "not_applicable";
  }
  return "unknown";
}
std::string_view KvAxisPolicyName(KvAxisPolicy v) {
  switch (v) {
    case KvAxisPolicy::kRaw: return "raw";
    case KvAxisPolicy::kPerToken: return "per_token";
    case KvAxisPolicy::kPerChannel: return "per_channel";
    case KvAxisPolicy::kRoleAwareKiviStyle: return "role_aware_kivi_style";
  }
  return "unknown";
}

absl::StatusOr<KvRole> ParseKvRole(std::string_view s) {
  if (s == "key") return KvRole::kKey;
  if (s == "value") return KvRole::kValue;
  return absl::InvalidArgumentError(absl::StrCat("role must be \"key\" or \"value\"; got \"", S(s), "\""));
}
absl::StatusOr<KvAttentionKind> ParseKvAttentionKind(std::string_view s) {
  if (s == "mha") return KvAttentionKind::kMha;
  if (s == "mqa") return KvAttentionKind::kMqa;
  if (s == "gqa") return KvAttentionKind::kGqa;
  return absl::InvalidArgumentError(
      absl::StrCat("attention_kind must be one of mha, mqa, gqa; got \"", S(s), "\""));
}
absl::StatusOr<KvRopeState> ParseKvRopeState(std::string_view s) {
  if (s == "pre_rope") return KvRopeState::kPreRope;
  if (s == "post_rope") return KvRopeState::kPostRope;
  if (s == "not_applicable") return KvRopeState::kNotApplicable;
  return absl::InvalidArgumentError(
      absl::StrCat("rope_state must be one of pre_rope, post_rope, not_applicable; got \"", S(s), "\""));
}
absl::StatusOr<KvAxisPolicy> ParseKvAxisPolicy(std::string_view s) {
  if (s == "raw") return KvAxisPolicy::kRaw;
  if (s == "per_token") return KvAxisPolicy::kPerToken;
  if (s == "per_channel") return KvAxisPolicy::kPerChannel;
  if (s == "role_aware_kivi_style") return KvAxisPolicy::kRoleAwareKiviStyle;
  return absl::InvalidArgumentError(absl::StrCat(
      "axis_policy must be one of raw, per_token, per_channel, role_aware_kivi_style; got \"", S(s), "\""));
}

KvVectorAxis ResolveVectorAxis(KvAxisPolicy policy, KvRole role) {
  switch (policy) {
    case KvAxisPolicy::kRaw:
    case KvAxisPolicy::kPerToken: return KvVectorAxis::kToken;
    case KvAxisPolicy::kPerChannel: return KvVectorAxis::kChannel;
    case KvAxisPolicy::kRoleAwareKiviStyle:
      return role == KvRole::kKey ? KvVectorAxis::kChannel : KvVectorAxis::kToken;
  }
  return KvVectorAxis::kToken;
}

absl::Status KvTensorShape::Validate() const {
  const std::pair<const char*, uint32_t> counts[] = {{"batch", batch},       {"layers", layers},
                                                     {"kv_heads", kv_heads}, {"query_heads", query_heads},
                                                     {"tokens", tokens},     {"head_dim", head_dim}};
  for (const auto& [name, v] : counts) {
    if (v == 0) return absl::InvalidArgumentError(absl::StrCat("shape.", name, " must be >= 1; got 0"));
  }
  if (head_dim > kMaxKvHeadDim) {
    return absl::ResourceExhaustedError(
        absl::StrCat("shape.head_dim exceeds the limit ", kMaxKvHeadDim, "; got ", head_dim));
  }
  if (static_cast<uint8_t>(dtype) > 2) {
    return absl::InvalidArgumentError("shape.dtype must be f32, f16 or bf16");
  }
  switch (attention_kind) {
    case KvAttentionKind::kMha:
      if (query_heads != kv_heads) {
        return absl::InvalidArgumentError(absl::StrCat(
            "shape: mha requires query_heads == kv_heads; got query_heads ", query_heads, ", kv_heads ", kv_heads));
      }
      break;
    case KvAttentionKind::kMqa:
      if (kv_heads != 1) {
        return absl::InvalidArgumentError(absl::StrCat("shape: mqa requires kv_heads == 1; got ", kv_heads));
      }
      [[fallthrough]];
    case KvAttentionKind::kGqa:
      if (query_heads % kv_heads != 0) {
        return absl::InvalidArgumentError(absl::StrCat("shape: ", S(KvAttentionKindName(attention_kind)),
                                                       " requires query_heads % kv_heads == 0; got query_heads ",
                                                       query_heads, ", kv_heads ", kv_heads));
      }
      break;
    default:
      return absl::InvalidArgumentError("shape.attention_kind must be mha, mqa or gqa");
  }
  if (role == KvRole::kKey) {
    if (rope_state != KvRopeState::kPreRope && rope_state != KvRopeState::kPostRope) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shape.rope_state must be pre_rope or post_rope for keys; got ", S(KvRopeStateName(rope_state))));
    }
  } else if (role == KvRole::kValue) {
    if (rope_state != KvRopeState::kNotApplicable) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shape.rope_state must be not_applicable for values; got ", S(KvRopeStateName(rope_state))));
    }
  } else {
    return absl::InvalidArgumentError("shape.role must be key or value");
  }
  uint64_t n = 1;
  for (uint64_t f : {uint64_t{batch}, uint64_t{layers}, uint64_t{kv_heads}, uint64_t{tokens}, uint64_t{head_dim}}) {
    if (!MulChecked(&n, f)) {
      return absl::ResourceExhaustedError("shape element count (batch*layers*kv_heads*tokens*head_dim) overflows u64");
    }
  }
  if (n > kMaxKvElements) {
    return absl::ResourceExhaustedError(
        absl::StrCat("shape element count exceeds the limit ", kMaxKvElements, "; got ", n));
  }
  return absl::OkStatus();
}

uint64_t KvTensorShape::vector_count() const {
  return uint64_t{batch} * layers * kv_heads * tokens;
}
uint64_t KvTensorShape::element_count() const { return vector_count() * head_dim; }
uint64_t KvTensorShape::VectorOffset(uint32_t b, uint32_t l, uint32_t h, uint32_t t) const {
  return (((uint64_t{b} * layers + l) * kv_heads + h) * tokens + t) * head_dim;
}

absl::StatusOr<std::string> KvTensorShape::CanonicalBytes() const {
  FQ_RETURN_IF_ERROR(Validate());
  CanonicalWriter w(kKvShapeSchema);
  w.Str(KvRoleName(role));
  w.Str(KvAttentionKindName(attention_kind));
  w.U32(batch);
  w.U32(layers);
  w.U32(kv_heads);
  w.U32(query_heads);
  w.U32(tokens);
  w.U32(head_dim);
  w.Str(DTypeName(dtype));
  w.Str(KvRopeStateName(rope_state));
  return w.bytes();
}

absl::StatusOr<std::string> KvTensorShape::Digest() const {
  FQ_ASSIGN_OR_RETURN(std::string bytes, CanonicalBytes());
  return Sha256Digest(bytes);
}

std::string KvTensorShape::ToJson(int indent) const {
  nlohmann::ordered_json j;
  j["schema_version"] = S(kKvShapeSchema);
  j["role"] = S(KvRoleName(role));
  j["attention_kind"] = S(KvAttentionKindName(attention_kind));
  j["batch"] = batch;
  j["layers"] = layers;
  j["kv_heads"] = kv_heads;
  j["query_heads"] = query_heads;
  j["tokens"] = tokens;
  j["head_dim"] = head_dim;
  j["dtype"] = S(DTypeName(dtype));
  j["rope_state"] = S(KvRopeStateName(rope_state));
  return j.dump(indent);
}

absl::StatusOr<KvTensorShape> KvTensorShape::FromJson(std::string_view json) {
  using namespace kv_internal;
  FQ_ASSIGN_OR_RETURN(nlohmann::json j, ParseJsonObject(json, "shape"));
  static constexpr const char* kCtx = "shape";
  std::initializer_list<const char*> fields = {"schema_version", "role", "attention_kind", "batch",
                                               "layers", "kv_heads", "query_heads", "tokens",
                                               "head_dim", "dtype", "rope_state"};
  FQ_RETURN_IF_ERROR(CheckKeys(j, kCtx, fields, fields));
  FQ_ASSIGN_OR_RETURN(std::string schema, GetString(j, kCtx, "schema_version"));
  if (schema != kKvShapeSchema) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape.schema_version must be \"", S(kKvShapeSchema), "\"; got \"", schema, "\""));
  }
  KvTensorShape s;
  FQ_ASSIGN_OR_RETURN(std::string role, GetString(j, kCtx, "role"));
  FQ_ASSIGN_OR_RETURN(s.role, ParseKvRole(role));
  FQ_ASSIGN_OR_RETURN(std::string kind, GetString(j, kCtx, "attention_kind"));
  FQ_ASSIGN_OR_RETURN(s.attention_kind, ParseKvAttentionKind(kind));
  FQ_ASSIGN_OR_RETURN(s.batch, GetU32(j, kCtx, "batch"));
  FQ_ASSIGN_OR_RETURN(s.layers, GetU32(j, kCtx, "layers"));
  FQ_ASSIGN_OR_RETURN(s.kv_heads, GetU32(j, kCtx, "kv_heads"));
  FQ_ASSIGN_OR_RETURN(s.query_heads, GetU32(j, kCtx, "query_heads"));
  FQ_ASSIGN_OR_RETURN(s.tokens, GetU32(j, kCtx, "tokens"));
  FQ_ASSIGN_OR_RETURN(s.head_dim, GetU32(j, kCtx, "head_dim"));
  FQ_ASSIGN_OR_RETURN(std::string dtype, GetString(j, kCtx, "dtype"));
  auto dt = ParseDType(dtype);
  if (!dt.ok()) return absl::InvalidArgumentError(absl::StrCat("shape.dtype: ", dt.status().message()));
  s.dtype = *dt;
  FQ_ASSIGN_OR_RETURN(std::string rope, GetString(j, kCtx, "rope_state"));
  FQ_ASSIGN_OR_RETURN(s.rope_state, ParseKvRopeState(rope));
  FQ_RETURN_IF_ERROR(s.Validate());
  return s;
}

absl::Status KvPageGeometry::ValidateFor(const KvTensorShape& shape) const {
  if (tokens_per_page == 0) {
    return absl::InvalidArgumentError("page_geometry.tokens_per_page must be >= 1; got 0");
  }
  if (tokens_per_page > kMaxKvTokensPerPage) {
    return absl::ResourceExhaustedError(absl::StrCat("page_geometry.tokens_per_page exceeds the limit ",
                                                     kMaxKvTokensPerPage, "; got ", tokens_per_page));
  }
  if (tokens_per_page > shape.tokens) {
    return absl::InvalidArgumentError(absl::StrCat("page_geometry.tokens_per_page must be <= shape.tokens ",
                                                   shape.tokens, "; got ", tokens_per_page));
  }
  if (uint64_t{tokens_per_page} * shape.head_dim > kMaxKvPageElements) {
    return absl::ResourceExhaustedError(absl::StrCat("page elements tokens_per_page*head_dim exceed the limit ",
                                                     kMaxKvPageElements));
  }
  if (head_dim != shape.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("page_geometry.head_dim must equal shape.head_dim ",
                                                   shape.head_dim, "; got ", head_dim));
  }
  const uint64_t raw = uint64_t{shape.head_dim} * DTypeSize(shape.dtype);
  if (raw_vector_bytes != raw) {
    return absl::InvalidArgumentError(absl::StrCat("page_geometry.raw_vector_bytes must be head_dim*",
                                                   DTypeSize(shape.dtype), " = ", raw, "; got ", raw_vector_bytes));
  }
  if (reserved_vector_bytes == 0) {
    return absl::InvalidArgumentError("page_geometry.reserved_vector_bytes must be >= 1; got 0");
  }
  if (reserved_vector_bytes < encoded_vector_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "page_geometry.reserved_vector_bytes must be >= encoded_vector_bytes ", encoded_vector_bytes,
        "; got ", reserved_vector_bytes));
  }
  return absl::OkStatus();
}

std::string KvPageGeometry::CanonicalBytes() const {
  CanonicalWriter w(kKvGeometrySchema);
  w.U32(tokens_per_page);
  w.U32(head_dim);
  w.U32(encoded_vector_bytes);
  w.U32(raw_vector_bytes);
  w.U32(reserved_vector_bytes);
  return w.bytes();
}

}  // namespace fibquant
