// Binary page frame (docs/format/kv.md, "Page frame"): the wire and storage form of one compressed
// KV page. Fixed 96-byte little-endian header (magic "FQKV", version, flags, KV profile digest, page
// coordinates, counts), a raw-vector bitmap, a fixed-stride code section, a raw section, and an
// XXH3-64 checksum over everything before it. Version 2 adds flag bit 2 (authenticated): a key id
// in header bytes 10..11 and an HMAC-SHA256 tag before the checksum (sealed and verified by
// core/kv_frame_auth.h; this layer only lays it out).
//
// This file is the structural layer: it builds frames and parses them with every self-contained
// check (sizes against limits before allocating, counts, padding bits, reserved fields, checksum).
// Checks that need the profile (digest, code size, coordinates in the shape, protection) live in
// KvCodec::DecodeFrame. Ownership: the KV engineer. Thread safety: pure functions.
#ifndef FIBQUANT_CORE_KV_FRAME_H_
#define FIBQUANT_CORE_KV_FRAME_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/half.h"
#include "core/kv_shape.h"

namespace fibquant {

inline constexpr std::array<uint8_t, 4> kKvFrameMagic = {'F', 'Q', 'K', 'V'};
inline constexpr uint16_t kKvFrameVersion = 2;
inline constexpr size_t kKvFrameHeaderBytes = 96;
inline constexpr size_t kKvFrameChecksumBytes = 8;
// Flag bit 0: vectors are channels (per-channel page). Bit 2 (version 2 only): authenticated, the
// header's u16 at offset 10 is the key id (non-zero) and a kKvFrameTagBytes HMAC-SHA256 tag sits
// between the raw section and the checksum. Other bits reserved, must be zero. A writer emits
// version 1 unless a version-2 flag is set, so unauthenticated frames keep their version-1 bytes.
inline constexpr uint16_t kKvFrameFlagChannelAxis = 1u << 0;
inline constexpr uint16_t kKvFrameFlagAuthenticated = 1u << 2;
inline constexpr uint16_t kKvFrameV1Flags = kKvFrameFlagChannelAxis;
inline constexpr uint16_t kKvFrameKnownFlags = kKvFrameFlagChannelAxis | kKvFrameFlagAuthenticated;
inline constexpr size_t kKvFrameTagBytes = 32;

struct KvPageCoords {
  uint32_t batch = 0;
  uint32_t layer = 0;
  uint32_t kv_head = 0;
  uint32_t token_start = 0;
  uint32_t token_count = 0;
  friend bool operator==(const KvPageCoords&, const KvPageCoords&) = default;
};

// Raw vectors by reason; coded + sum(raw) == vector_count.
struct KvPageCounts {
  uint32_t vector_count = 0;
  uint32_t coded = 0;
  uint32_t raw_protected = 0;         // protected region ("protected_region")
  uint32_t raw_policy = 0;            // raw axis policy or partial per-channel page
  uint32_t raw_encode_fallback = 0;   // vector could not be encoded (keep_raw)
  uint32_t raw_quality_fallback = 0;  // stored raw to meet the quality budget (keep_raw)
  uint32_t raw_total() const {
    return raw_protected + raw_policy + raw_encode_fallback + raw_quality_fallback;
  }
  friend bool operator==(const KvPageCounts&, const KvPageCounts&) = default;
};

struct KvFrameHeader {
  uint16_t version = kKvFrameVersion;
  uint16_t flags = 0;
  DType raw_dtype = DType::kF32;      // dtype of the raw section (= the page's input dtype)
  KvAxisPolicy axis_policy = KvAxisPolicy::kPerToken;  // the profile's configured policy
  std::array<uint8_t, 32> profile_digest{};
  KvPageCoords coords;
  uint32_t vector_len = 0;  // elements per vector: head_dim (token axis) or token_count (channel)
  uint32_t code_bytes = 0;  // stride of the code section
  KvPageCounts counts;
  uint16_t key_id = 0;  // authenticated frames only (header bytes 10..11)
  bool authenticated() const { return (flags & kKvFrameFlagAuthenticated) != 0; }
  KvVectorAxis vector_axis() const {
    return (flags & kKvFrameFlagChannelAxis) ? KvVectorAxis::kChannel : KvVectorAxis::kToken;
  }
};

// Limits checked before anything is allocated from header fields.
struct KvFrameLimits {
  uint64_t max_frame_bytes = 256ull << 20;
  uint32_t max_vectors = 1u << 20;
  uint32_t max_vector_len = kMaxKvTokensPerPage > kMaxKvHeadDim ? kMaxKvTokensPerPage : kMaxKvHeadDim;
  uint32_t max_code_bytes = 1u << 16;
};

// A parsed, structurally verified frame; spans point into the caller's buffer.
struct KvFrameView {
  KvFrameHeader header;
  absl::Span<const uint8_t> bitmap;  // ceil(vector_count/8) bytes, bit i (LSB-first) = vector i raw
  absl::Span<const uint8_t> codes;   // coded * code_bytes, in vector order
  absl::Span<const uint8_t> raw;     // raw_total * vector_len * DTypeSize(raw_dtype), in vector order
  absl::Span<const uint8_t> auth_tag;  // authenticated frames: the stored tag (not verified here)
  uint64_t checksum = 0;
  bool IsRaw(uint32_t i) const { return (bitmap[i >> 3] >> (i & 7)) & 1u; }
  // Number of raw vectors before vector i (popcount of the bitmap prefix).
  uint32_t RawRank(uint32_t i) const;
};

// Total frame size implied by a header (overflow-checked); ResourceExhausted past the limits (the
// encoder side: BuildKvFrame uses it too).
[[nodiscard]] absl::StatusOr<uint64_t> KvFrameSize(const KvFrameHeader& h, const KvFrameLimits& limits = {});

// Assembles an unauthenticated frame (version 1 unless a version-2 flag is set; the header's
// `version` is not used). InvalidArgument when the sections do not match the header's counts, or
// when the authenticated flag is set (SealKvFrame in core/kv_frame_auth.h adds it).
[[nodiscard]] absl::StatusOr<std::string> BuildKvFrame(const KvFrameHeader& header,
                                                       absl::Span<const uint8_t> bitmap,
                                                       absl::Span<const uint8_t> codes,
                                                       absl::Span<const uint8_t> raw);

// Parses and verifies a frame (docs/format/kv.md "Decoder checks", in that order): length, magic,
// version, checksum, flags, dtype, axis, reserved bytes, header counts vs limits, exact size
// (truncation / trailing bytes), axis/count consistency, bitmap popcount and padding bits. DataLoss
// naming the field for corrupt content (including a header claiming more than the limits);
// ResourceExhausted only when the frame itself is longer than max_frame_bytes.
[[nodiscard]] absl::StatusOr<KvFrameView> ParseKvFrame(absl::Span<const uint8_t> frame,
                                                       const KvFrameLimits& limits = {});

// Header-only summary for tools and servers (ParseKvFrame, then the header).
[[nodiscard]] absl::StatusOr<KvFrameHeader> InspectFrame(absl::Span<const uint8_t> frame);

// XXH3-64 of the frame bytes before the checksum (the value a correct frame stores).
uint64_t KvFrameChecksum(absl::Span<const uint8_t> frame_without_checksum);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_FRAME_H_
