#include "core/digest.h"

#include <openssl/evp.h>

#include <cstring>

namespace fibquant {

std::string RenderDigest(const std::array<uint8_t, 32>& raw) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(kDigestPrefix);
  out.reserve(kDigestStringLength);
  for (uint8_t b : raw) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 15]);
  }
  return out;
}

std::string Sha256Digest(std::string_view bytes) {
  Sha256Hasher h;
  h.Update(bytes);
  return h.Finish();
}

bool ParseDigest(std::string_view s, std::array<uint8_t, 32>* raw) {
  if (s.size() != kDigestStringLength || s.substr(0, kDigestPrefix.size()) != kDigestPrefix) {
    return false;
  }
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < 32; ++i) {
    const int hi = nibble(s[7 + 2 * i]);
    const int lo = nibble(s[8 + 2 * i]);
    if (hi < 0 || lo < 0) return false;
    if (raw != nullptr) (*raw)[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return true;
}

bool IsDigestString(std::string_view s) { return ParseDigest(s, nullptr); }

struct Sha256Hasher::Ctx {
  EVP_MD_CTX* md = nullptr;
};

Sha256Hasher::Sha256Hasher() : ctx_(std::make_unique<Ctx>()) {
  ctx_->md = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx_->md, EVP_sha256(), nullptr);
}

Sha256Hasher::~Sha256Hasher() { EVP_MD_CTX_free(ctx_->md); }

void Sha256Hasher::Update(const void* data, size_t n) { EVP_DigestUpdate(ctx_->md, data, n); }

std::array<uint8_t, 32> Sha256Hasher::FinishRaw() {
  std::array<uint8_t, 32> out{};
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx_->md, out.data(), &len);
  return out;
}

CanonicalWriter::CanonicalWriter(std::string_view domain) {
  bytes_.append(domain);
  bytes_.push_back('\0');
}

void CanonicalWriter::U8(uint8_t v) { bytes_.push_back(static_cast<char>(v)); }
void CanonicalWriter::U16(uint16_t v) {
  for (int i = 0; i < 2; ++i) bytes_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void CanonicalWriter::U32(uint32_t v) {
  for (int i = 0; i < 4; ++i) bytes_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void CanonicalWriter::U64(uint64_t v) {
  for (int i = 0; i < 8; ++i) bytes_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void CanonicalWriter::I64(int64_t v) { U64(static_cast<uint64_t>(v)); }
void CanonicalWriter::F64(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, 8);
  U64(bits);
}
void CanonicalWriter::F32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  U32(bits);
}
void CanonicalWriter::Str(std::string_view s) {
  U32(static_cast<uint32_t>(s.size()));
  bytes_.append(s);
}
void CanonicalWriter::Bytes(const void* data, size_t n) {
  U64(n);
  bytes_.append(static_cast<const char*>(data), n);
}
void CanonicalWriter::OptF64(bool present, double v) {
  U8(present ? 1 : 0);
  if (present) F64(v);
}

}  // namespace fibquant
