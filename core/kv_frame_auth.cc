#include "core/kv_frame_auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <array>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

void PutU16At(std::string* s, size_t off, uint16_t v) {
  (*s)[off] = static_cast<char>(v & 0xFF);
  (*s)[off + 1] = static_cast<char>(v >> 8);
}

absl::Span<const uint8_t> Bytes(std::string_view s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

}  // namespace

absl::StatusOr<KvFrameKeyRing> KvFrameKeyRing::FromKeys(std::vector<KvFrameKey> keys) {
  if (keys.empty()) return absl::InvalidArgumentError("frame key ring: no key");
  if (keys.size() > kKvFrameMaxKeys) {
    return absl::InvalidArgumentError(absl::StrCat("frame key ring: ", keys.size(),
                                                   " keys, at most ", kKvFrameMaxKeys));
  }
  std::set<uint16_t> seen;
  for (const KvFrameKey& k : keys) {
    if (k.id == 0) return absl::InvalidArgumentError("frame key ring: key id 0 is not allowed");
    if (!seen.insert(k.id).second) {
      return absl::InvalidArgumentError(absl::StrCat("frame key ring: key id ", k.id, " appears twice"));
    }
    if (k.secret.size() < kKvFrameMinKeyBytes) {
      return absl::InvalidArgumentError(absl::StrCat("frame key ring: key id ", k.id, " has ",
                                                     k.secret.size(), " bytes, at least ",
                                                     kKvFrameMinKeyBytes, " are required"));
    }
  }
  return KvFrameKeyRing(std::move(keys));
}

absl::StatusOr<KvFrameKeyRing> KvFrameKeyRing::Parse(std::string_view text, std::string_view what) {
  std::vector<KvFrameKey> keys;
  int line_no = 0;
  const std::string where(what);
  for (absl::string_view line : absl::StrSplit(absl::string_view(text.data(), text.size()), '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    std::vector<absl::string_view> parts = absl::StrSplit(line, ' ', absl::SkipEmpty());
    auto bad = [&](std::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": line ", line_no, ": ", std::string(why),
                                                     " (expected '<id 1..65535> <secret as hex, "
                                                     "at least 64 digits>')"));
    };
    if (parts.size() != 2) return bad("not two fields");
    uint32_t id = 0;
    if (!absl::SimpleAtoi(parts[0], &id) || id == 0 || id > 65535) return bad("bad key id");
    const absl::string_view hex = parts[1];
    if (hex.size() % 2 != 0 ||
        !std::all_of(hex.begin(), hex.end(), [](char c) { return absl::ascii_isxdigit(c); })) {
      return bad("secret is not hex");
    }
    if (hex.size() < 2 * kKvFrameMinKeyBytes) return bad("secret shorter than 32 bytes");
    keys.push_back(KvFrameKey{static_cast<uint16_t>(id), absl::HexStringToBytes(hex)});
  }
  auto ring = FromKeys(std::move(keys));
  if (!ring.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", ring.status().message()));
  }
  return ring;
}

const KvFrameKey* KvFrameKeyRing::Find(uint16_t id) const {
  for (const KvFrameKey& k : keys_) {
    if (k.id == id) return &k;
  }
  return nullptr;
}

std::vector<uint16_t> KvFrameKeyRing::ids() const {
  std::vector<uint16_t> out;
  for (const KvFrameKey& k : keys_) out.push_back(k.id);
  return out;
}

std::array<uint8_t, 32> KvFrameTag(std::string_view secret, absl::Span<const uint8_t> bytes) {
  std::array<uint8_t, 32> tag{};
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()), bytes.data(), bytes.size(),
       tag.data(), &len);
  return tag;
}

absl::StatusOr<std::string> SealKvFrame(absl::Span<const uint8_t> frame, const KvFrameKeyRing& ring) {
  absl::StatusOr<KvFrameView> v = ParseKvFrame(frame);
  if (!v.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("SealKvFrame: ", v.status().message()));
  }
  if (v->header.authenticated()) {
    return absl::InvalidArgumentError("SealKvFrame: the frame is already authenticated");
  }
  const KvFrameKey& key = *ring.Find(ring.active_id());
  std::string out(reinterpret_cast<const char*>(frame.data()), frame.size() - kKvFrameChecksumBytes);
  PutU16At(&out, 4, 2);  // version 2: the authenticated flag exists from version 2 on
  PutU16At(&out, 6, static_cast<uint16_t>(v->header.flags | kKvFrameFlagAuthenticated));
  PutU16At(&out, 10, key.id);
  const std::array<uint8_t, 32> tag = KvFrameTag(key.secret, Bytes(out));
  out.append(reinterpret_cast<const char*>(tag.data()), tag.size());
  const uint64_t sum = KvFrameChecksum(Bytes(out));
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((sum >> (8 * i)) & 0xFF));
  return out;
}

absl::Status VerifyKvFrameAuth(absl::Span<const uint8_t> frame, const KvFrameKeyRing& ring,
                               const KvFrameLimits& limits) {
  FQ_ASSIGN_OR_RETURN(KvFrameView v, ParseKvFrame(frame, limits));
  if (!v.header.authenticated()) {
    return absl::DataLossError(
        "frame is not authenticated, and this decoder accepts only frames sealed with one of its "
        "frame keys");
  }
  const KvFrameKey* key = ring.Find(v.header.key_id);
  if (key == nullptr) {
    return absl::DataLossError(absl::StrCat("frame is sealed with key id ", v.header.key_id,
                                            ", which this decoder does not hold"));
  }
  const size_t signed_len = frame.size() - kKvFrameChecksumBytes - kKvFrameTagBytes;
  const std::array<uint8_t, 32> want = KvFrameTag(key->secret, frame.subspan(0, signed_len));
  if (v.auth_tag.size() != want.size() ||
      CRYPTO_memcmp(v.auth_tag.data(), want.data(), want.size()) != 0) {
    return absl::DataLossError(absl::StrCat(
        "frame authentication tag mismatch (key id ", v.header.key_id,
        "): the frame was changed after sealing or sealed by someone without this key"));
  }
  return absl::OkStatus();
}

}  // namespace fibquant
