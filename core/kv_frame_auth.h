// Authenticated page frames (docs/format/kv.md, "Authenticated frames"): HMAC-SHA256 with a key
// only the cluster holds, so that a frame the cluster did not mint is refused even when whoever
// changed it recomputed the XXH3 checksum (which detects corruption, not tampering).
//
// A sealed frame is a version-2 frame with flag bit 2 set, the sealing key's id in header bytes
// 10..11, and a 32-byte tag = HMAC-SHA256(key, every byte before the tag) between the raw section
// and the checksum. The tag covers the whole header (coordinates, counts, profile digest, key id),
// the bitmap, the codes and the raw section.
//
// Ownership: the KV engineer; the server loads a KvFrameKeyRing once from --frame-key-file (and on
// reload builds a new one). Thread safety: KvFrameKeyRing is immutable after creation; the
// functions are pure.
#ifndef FIBQUANT_CORE_KV_FRAME_AUTH_H_
#define FIBQUANT_CORE_KV_FRAME_AUTH_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/kv_frame.h"

namespace fibquant {

// Shortest accepted secret: 32 bytes, the HMAC-SHA256 block's worth of strength.
inline constexpr size_t kKvFrameMinKeyBytes = 32;
inline constexpr size_t kKvFrameMaxKeys = 64;

struct KvFrameKey {
  uint16_t id = 0;     // 1..65535, written into every frame it seals
  std::string secret;  // >= kKvFrameMinKeyBytes bytes
};

// The keys a node accepts; the first one seals. Rotation: add the new key as a second line on
// every replica, then move it first (it seals from then on), then drop the old key once no frame
// sealed with it is still needed.
class KvFrameKeyRing {
 public:
  // InvalidArgument: no key, more than kKvFrameMaxKeys, an id 0, a repeated id, a short secret.
  [[nodiscard]] static absl::StatusOr<KvFrameKeyRing> FromKeys(std::vector<KvFrameKey> keys);
  // Text form (the --frame-key-file format): one key per line, `<id> <secret as hex>`, ids in
  // decimal 1..65535, hex of at least 64 digits; blank lines and lines starting with '#' ignored.
  // InvalidArgument naming `what` and the line number; the secret is never echoed.
  [[nodiscard]] static absl::StatusOr<KvFrameKeyRing> Parse(std::string_view text,
                                                            std::string_view what);

  uint16_t active_id() const { return keys_.front().id; }
  // The key with this id, or null.
  const KvFrameKey* Find(uint16_t id) const;
  std::vector<uint16_t> ids() const;

 private:
  explicit KvFrameKeyRing(std::vector<KvFrameKey> keys) : keys_(std::move(keys)) {}
  std::vector<KvFrameKey> keys_;
};

// HMAC-SHA256(secret, bytes).
std::array<uint8_t, 32> KvFrameTag(std::string_view secret, absl::Span<const uint8_t> bytes);

// Seals an unauthenticated frame (as KvCodec::CompressPage returns it) with the ring's active key:
// version 2, flag bit 2, key id, tag, new checksum. InvalidArgument for a frame that does not parse
// or is already authenticated.
[[nodiscard]] absl::StatusOr<std::string> SealKvFrame(absl::Span<const uint8_t> frame,
                                                      const KvFrameKeyRing& ring);

// Verifies a frame against the ring: ParseKvFrame (structure, checksum), then DataLoss when the
// frame is not authenticated, names a key id the ring does not hold, or carries a tag that does
// not match (compared in constant time). OK says the frame was sealed by a holder of that key and
// not changed since; KvCodec::DecodeFrame then checks it against the profile as for any frame.
absl::Status VerifyKvFrameAuth(absl::Span<const uint8_t> frame, const KvFrameKeyRing& ring,
                               const KvFrameLimits& limits = {});

}  // namespace fibquant

#endif  // FIBQUANT_CORE_KV_FRAME_AUTH_H_
