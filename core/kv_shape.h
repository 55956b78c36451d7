// KV-cache tensor shapes and page geometry (docs/format/kv.md, "Shape", "Page geometry"): the
// vocabulary of the KV layer, its validation rules, canonical encodings and digests.
//
// Canonical layout is [batch, layers, kv_heads, tokens, head_dim] (C order); the unit of work is a
// page = one (batch, layer, kv_head) span of `token_count` tokens, i.e. `[token_count, head_dim]`.
// Ownership: the KV engineer (core/kv_*). Thread safety: plain values; immutable use is thread-safe.
#ifndef FIBQUANT_CORE_KV_SHAPE_H_
#define FIBQUANT_CORE_KV_SHAPE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/half.h"

namespace fibquant {

inline constexpr std::string_view kKvShapeSchema = "fq_kv_shape_v1";
inline constexpr std::string_view kKvGeometrySchema = "fq_kv_page_geometry_v1";

// Resource limits of the KV layer (ResourceExhausted beyond them).
inline constexpr uint32_t kMaxKvHeadDim = 4096;
inline constexpr uint32_t kMaxKvTokensPerPage = 4096;     // also the per-channel ambient_dim limit
inline constexpr uint64_t kMaxKvElements = 1ull << 40;    // batch*layers*kv_heads*tokens*head_dim
inline constexpr uint64_t kMaxKvPageElements = 1ull << 24;  // token_count*head_dim of one page

enum class KvRole : uint8_t { kKey = 0, kValue = 1 };                       // "key", "value"
enum class KvAttentionKind : uint8_t { kMha = 0, kMqa = 1, kGqa = 2 };      // "mha", "mqa", "gqa"
enum class KvRopeState : uint8_t { kPreRope = 0, kPostRope = 1, kNotApplicable = 2 };
// "raw", "per_token", "per_channel", "role_aware_kivi_style" (keys per channel, values per token).
enum class KvAxisPolicy : uint8_t { kRaw = 0, kPerToken = 1, kPerChannel = 2, kRoleAwareKiviStyle = 3 };
// The orientation a page is actually stored in (role-aware resolves to one of the other two).
enum class KvVectorAxis : uint8_t { kToken = 0, kChannel = 1 };

std::string_view KvRoleName(KvRole v);
std::string_view KvAttentionKindName(KvAttentionKind v);
std::string_view KvRopeStateName(KvRopeState v);
std::string_view KvAxisPolicyName(KvAxisPolicy v);
[[nodiscard]] absl::StatusOr<KvRole> ParseKvRole(std::string_view s);
[[nodiscard]] absl::StatusOr<KvAttentionKind> ParseKvAttentionKind(std::string_view s);
[[nodiscard]] absl::StatusOr<KvRopeState> ParseKvRopeState(std::string_view s);
[[nodiscard]] absl::StatusOr<KvAxisPolicy> ParseKvAxisPolicy(std::string_view s);

// Effective axis for a role: raw -> token (everything raw), per_token -> token, per_channel ->
// channel, role_aware_kivi_style -> channel for keys, token for values.
KvVectorAxis ResolveVectorAxis(KvAxisPolicy policy, KvRole role);

struct KvTensorShape {
  KvRole role = KvRole::kKey;
  KvAttentionKind attention_kind = KvAttentionKind::kMha;
  uint32_t batch = 0;
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  uint32_t query_heads = 0;
  uint32_t tokens = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kF32;
  KvRopeState rope_state = KvRopeState::kPreRope;

  // Rules in order: every count > 0 (InvalidArgument); head_dim <= kMaxKvHeadDim
  // (ResourceExhausted); MHA => query_heads == kv_heads; MQA => kv_heads == 1; MQA/GQA =>
  // query_heads % kv_heads == 0; key => rope_state pre_rope|post_rope; value => not_applicable
  // (InvalidArgument); element_count without u64 overflow and <= kMaxKvElements (ResourceExhausted).
  absl::Status Validate() const;

  uint64_t vector_count() const;   // batch*layers*kv_heads*tokens
  uint64_t element_count() const;  // vector_count*head_dim
  // Element offset of token vector (b, l, h, t) in the canonical layout.
  uint64_t VectorOffset(uint32_t b, uint32_t l, uint32_t h, uint32_t t) const;

  // Canonical bytes (domain "fq_kv_shape_v1") and "sha256:" digest; valid shapes only.
  [[nodiscard]] absl::StatusOr<std::string> CanonicalBytes() const;
  [[nodiscard]] absl::StatusOr<std::string> Digest() const;
  std::string ToJson(int indent = 2) const;
  // All fields required, unknown fields rejected, then Validate().
  [[nodiscard]] static absl::StatusOr<KvTensorShape> FromJson(std::string_view json);

  friend bool operator==(const KvTensorShape&, const KvTensorShape&) = default;
};

struct KvPageGeometry {
  uint32_t tokens_per_page = 0;
  uint32_t head_dim = 0;
  // Fixed stride of one FibQuant code in a frame's code section (= Quantizer::code_bytes(); 0 for
  // the raw axis policy).
  uint32_t encoded_vector_bytes = 0;
  // Bytes of one raw token vector in the shape's dtype: head_dim * DTypeSize(dtype).
  uint32_t raw_vector_bytes = 0;
  // Declared capacity per vector slot for planning (the seed's encoded_block_bytes): must be
  // >= encoded_vector_bytes, and >= raw_vector_bytes when vectors may fall back to raw.
  uint32_t reserved_vector_bytes = 0;

  // 1 <= tokens_per_page <= min(shape.tokens, kMaxKvTokensPerPage); head_dim == shape.head_dim;
  // raw_vector_bytes == head_dim*DTypeSize(shape.dtype); reserved_vector_bytes > 0 and
  // >= encoded_vector_bytes. InvalidArgument (ResourceExhausted for the page-size limit).
  absl::Status ValidateFor(const KvTensorShape& shape) const;
  uint32_t page_count(uint32_t tokens) const {
    return tokens_per_page == 0 ? 0 : (tokens + tokens_per_page - 1) / tokens_per_page;
  }
  // Canonical bytes (domain "fq_kv_page_geometry_v1"): u32 fields in declaration order.
  std::string CanonicalBytes() const;
  friend bool operator==(const KvPageGeometry&, const KvPageGeometry&) = default;
};

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_SHAPE_H_
