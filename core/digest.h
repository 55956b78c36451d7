// SHA-256 digests over the project's canonical byte encodings (docs/FORMAT.md, "Canonical encoding").
//
// Every digested object writes itself through a CanonicalWriter: a domain string, a 0x00 byte, then
// its fields in a documented order as fixed-width little-endian integers, IEEE-754 bit patterns and
// length-prefixed strings. The digest is rendered "sha256:" + 64 lowercase hex characters.
// Thread safety: CanonicalWriter and Sha256Hasher are single-threaded values; free functions are pure.
#ifndef FIBQUANT_CORE_DIGEST_H_
#define FIBQUANT_CORE_DIGEST_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace fibquant {

inline constexpr std::string_view kDigestPrefix = "sha256:";
inline constexpr size_t kDigestStringLength = 7 + 64;

// Renders 32 raw SHA-256 bytes as "sha256:<hex>".
std::string RenderDigest(const std::array<uint8_t, 32>& raw);
// "sha256:" + hex of SHA-256(bytes).
std::string Sha256Digest(std::string_view bytes);
// True iff `s` is "sha256:" followed by exactly 64 lowercase hex characters.
bool IsDigestString(std::string_view s);
// Parses a digest string into its 32 raw bytes; false if it is not a digest string.
bool ParseDigest(std::string_view s, std::array<uint8_t, 32>* raw);

// Incremental SHA-256 (OpenSSL EVP) for large inputs such as KV tensors.
class Sha256Hasher {
 public:
  Sha256Hasher();
  ~Sha256Hasher();
  Sha256Hasher(const Sha256Hasher&) = delete;
  Sha256Hasher& operator=(const Sha256Hasher&) = delete;
  void Update(const void* data, size_t n);
  void Update(std::string_view s) { Update(s.data(), s.size()); }
  std::array<uint8_t, 32> FinishRaw();
  std::string Finish() { return RenderDigest(FinishRaw()); }

 private:
  struct Ctx;
  std::unique_ptr<Ctx> ctx_;
};

// Builds the canonical byte encoding of one object. All integers are little-endian.
class CanonicalWriter {
 public:
  // Starts the encoding with the UTF-8 domain string and a 0x00 separator.
  explicit CanonicalWriter(std::string_view domain);

  void U8(uint8_t v);
  void U16(uint16_t v);
  void U32(uint32_t v);
  void U64(uint64_t v);
  void I64(int64_t v);
  void Bool(bool v) { U8(v ? 1 : 0); }
  // IEEE-754 binary64 bit pattern, little-endian (-0.0 and 0.0 differ; callers pass finite values).
  void F64(double v);
  // IEEE-754 binary32 bit pattern, little-endian.
  void F32(float v);
  // u32 byte length, then the bytes.
  void Str(std::string_view s);
  // u64 byte length, then the bytes.
  void Bytes(const void* data, size_t n);
  // 0x00 for absent; 0x01 then the F64 for present.
  void OptF64(bool present, double v);

  const std::string& bytes() const { return bytes_; }
  std::string Digest() const { return Sha256Digest(bytes_); }

 private:
  std::string bytes_;
};

}  // namespace fibquant

#endif  // FIBQUANT_CORE_DIGEST_H_
