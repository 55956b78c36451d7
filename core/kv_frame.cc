#include "core/kv_frame.h"

#include <bit>
#include <cstring>
#include <limits>
#include <string>

#include <xxhash.h>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

void PutU16(std::string* s, uint16_t v) {
  s->push_back(static_cast<char>(v & 0xFF));
  s->push_back(static_cast<char>(v >> 8));
}
void PutU32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
void PutU64(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
uint16_t GetU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t GetU32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
uint64_t GetU64(const uint8_t* p) { return uint64_t{GetU32(p)} | (uint64_t{GetU32(p + 4)} << 32); }

// Overflow-checked a*b+c accumulation.
bool MulAdd(uint64_t* acc, uint64_t a, uint64_t b) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  const uint64_t m = a * b;
  if (*acc > std::numeric_limits<uint64_t>::max() - m) return false;
  *acc += m;
  return true;
}

struct Sizes {
  uint64_t bitmap = 0, codes = 0, raw = 0, total = 0;
};

// Building: a header past a limit is ResourceExhausted. Parsing: the frame's real length is already
// known to be within max_frame_bytes, so a header claiming more than the limits is corrupt (DataLoss).
absl::StatusOr<Sizes> ComputeSizes(const KvFrameHeader& h, const KvFrameLimits& limits, bool parsing) {
  auto limit_error = [parsing](std::string msg) {
    return parsing ? absl::DataLossError(std::move(msg)) : absl::ResourceExhaustedError(std::move(msg));
  };
  const KvPageCounts& c = h.counts;
  if (c.vector_count > limits.max_vectors) {
    return limit_error(absl::StrCat("frame vector_count ", c.vector_count, " exceeds the limit ", limits.max_vectors));
  }
  if (h.vector_len > limits.max_vector_len) {
    return limit_error(absl::StrCat("frame vector_len ", h.vector_len, " exceeds the limit ", limits.max_vector_len));
  }
  if (h.code_bytes > limits.max_code_bytes) {
    return limit_error(absl::StrCat("frame code_bytes ", h.code_bytes, " exceeds the limit ", limits.max_code_bytes));
  }
  const uint64_t raw_total = uint64_t{c.raw_protected} + c.raw_policy + c.raw_encode_fallback + c.raw_quality_fallback;
  if (uint64_t{c.coded} + raw_total != c.vector_count) {
    return absl::DataLossError(absl::StrCat("frame counts inconsistent: coded ", c.coded, " + raw ", raw_total,
                                            " != vector_count ", c.vector_count));
  }
  Sizes s;
  s.bitmap = (uint64_t{c.vector_count} + 7) / 8;
  s.codes = uint64_t{c.coded} * h.code_bytes;  // both u32: fits
  uint64_t raw = 0;
  if (!MulAdd(&raw, raw_total, uint64_t{h.vector_len} * DTypeSize(h.raw_dtype))) {
    return limit_error("frame raw section size overflows u64");
  }
  s.raw = raw;
  uint64_t total = kKvFrameHeaderBytes + kKvFrameChecksumBytes + s.bitmap +
                   ((h.flags & kKvFrameFlagAuthenticated) ? kKvFrameTagBytes : 0);
  if (!MulAdd(&total, 1, s.codes) || !MulAdd(&total, 1, s.raw)) {
    return limit_error("frame size overflows u64");
  }
  if (total > limits.max_frame_bytes) {
    return limit_error(absl::StrCat("frame size ", total, " implied by the header exceeds the limit ",
                                    limits.max_frame_bytes, " bytes"));
  }
  s.total = total;
  return s;
}

}  // namespace

uint32_t KvFrameView::RawRank(uint32_t i) const {
  uint32_t r = 0;
  const uint32_t full = i >> 3;
  uint32_t b = 0;
  // 8 bytes at a time: rank is a popcount over the bitmap prefix (vector_count/64 words at most).
  for (; b + 8 <= full; b += 8) {
    uint64_t w;
    std::memcpy(&w, bitmap.data() + b, 8);
    r += static_cast<uint32_t>(std::popcount(w));
  }
  for (; b < full; ++b) r += static_cast<uint32_t>(std::popcount(static_cast<unsigned>(bitmap[b])));
  if (i & 7) r += static_cast<uint32_t>(std::popcount(static_cast<unsigned>(bitmap[full] & ((1u << (i & 7)) - 1))));
  return r;
}

uint64_t KvFrameChecksum(absl::Span<const uint8_t> bytes) { return XXH3_64bits(bytes.data(), bytes.size()); }

absl::StatusOr<uint64_t> KvFrameSize(const KvFrameHeader& h, const KvFrameLimits& limits) {
  FQ_ASSIGN_OR_RETURN(Sizes s, ComputeSizes(h, limits, false));
  return s.total;
}

absl::StatusOr<std::string> BuildKvFrame(const KvFrameHeader& h, absl::Span<const uint8_t> bitmap,
                                         absl::Span<const uint8_t> codes, absl::Span<const uint8_t> raw) {
  if (h.flags & kKvFrameFlagAuthenticated) {
    return absl::InvalidArgumentError("BuildKvFrame: the authenticated flag is added by SealKvFrame");
  }
  FQ_ASSIGN_OR_RETURN(Sizes s, ComputeSizes(h, KvFrameLimits{}, false));
  if (bitmap.size() != s.bitmap || codes.size() != s.codes || raw.size() != s.raw) {
    return absl::InvalidArgumentError(absl::StrCat("BuildKvFrame: section sizes (bitmap ", bitmap.size(), ", codes ",
                                                   codes.size(), ", raw ", raw.size(), ") do not match the header (",
                                                   s.bitmap, ", ", s.codes, ", ", s.raw, ")"));
  }
  std::string out;
  out.reserve(s.total);
  out.append(reinterpret_cast<const char*>(kKvFrameMagic.data()), 4);
  PutU16(&out, (h.flags & ~kKvFrameV1Flags) != 0 ? uint16_t{2} : uint16_t{1});
  PutU16(&out, h.flags);
  out.push_back(static_cast<char>(h.raw_dtype));
  out.push_back(static_cast<char>(h.axis_policy));
  PutU16(&out, 0);  // reserved
  out.append(reinterpret_cast<const char*>(h.profile_digest.data()), 32);
  for (uint32_t v : {h.coords.batch, h.coords.layer, h.coords.kv_head, h.coords.token_start, h.coords.token_count,
                     h.counts.vector_count, h.vector_len, h.code_bytes, h.counts.coded, h.counts.raw_protected,
                     h.counts.raw_policy, h.counts.raw_encode_fallback, h.counts.raw_quality_fallback}) {
    PutU32(&out, v);
  }
  out.append(reinterpret_cast<const char*>(bitmap.data()), bitmap.size());
  out.append(reinterpret_cast<const char*>(codes.data()), codes.size());
  out.append(reinterpret_cast<const char*>(raw.data()), raw.size());
  PutU64(&out, KvFrameChecksum(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(out.data()), out.size())));
  return out;
}

absl::StatusOr<KvFrameView> ParseKvFrame(absl::Span<const uint8_t> f, const KvFrameLimits& limits) {
  if (f.size() < kKvFrameHeaderBytes + kKvFrameChecksumBytes) {
    return absl::DataLossError(absl::StrCat("frame truncated: ", f.size(), " bytes, shorter than the ",
                                            kKvFrameHeaderBytes + kKvFrameChecksumBytes,
                                            "-byte header + checksum"));
  }
  if (f.size() > limits.max_frame_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("frame size ", f.size(), " exceeds the limit ",
                                                     limits.max_frame_bytes, " bytes"));
  }
  const uint8_t* p = f.data();
  if (std::memcmp(p, kKvFrameMagic.data(), 4) != 0) {
    return absl::DataLossError("frame magic is not \"FQKV\"");
  }
  KvFrameView v;
  KvFrameHeader& h = v.header;
  h.version = GetU16(p + 4);
  if (h.version < 1 || h.version > kKvFrameVersion) {
    return absl::DataLossError(absl::StrCat("frame version ", h.version, " is not supported (expected 1..",
                                            kKvFrameVersion, ")"));
  }
  // The checksum covers every other field, so it is verified before any of them is interpreted.
  v.checksum = GetU64(p + f.size() - kKvFrameChecksumBytes);
  {
    const uint64_t want = KvFrameChecksum(f.subspan(0, f.size() - kKvFrameChecksumBytes));
    if (v.checksum != want) {
      return absl::DataLossError(absl::StrCat("frame checksum mismatch (or truncated frame): stored 0x",
                                              absl::Hex(v.checksum, absl::kZeroPad16), ", computed 0x",
                                              absl::Hex(want, absl::kZeroPad16)));
    }
  }
  h.flags = GetU16(p + 6);
  if (h.flags & ~kKvFrameKnownFlags) {
    return absl::DataLossError(absl::StrCat("frame flags 0x", absl::Hex(h.flags), " set reserved bits"));
  }
  if (h.version == 1 && (h.flags & ~kKvFrameV1Flags)) {
    return absl::DataLossError(absl::StrCat("frame flags 0x", absl::Hex(h.flags), " set bits a version-1 frame cannot carry"));
  }
  // One encoding per frame: a writer uses version 2 only for a version-2 flag.
  if (h.version == 2 && (h.flags & ~kKvFrameV1Flags) == 0) {
    return absl::DataLossError("frame version 2 without a version-2 flag (such a frame is version 1)");
  }
  if (p[8] > 2) return absl::DataLossError(absl::StrCat("frame raw_dtype ", int{p[8]}, " is not 0 (f32), 1 (f16) or 2 (bf16)"));
  h.raw_dtype = static_cast<DType>(p[8]);
  if (p[9] > 3) return absl::DataLossError(absl::StrCat("frame axis_policy ", int{p[9]}, " is not a known policy"));
  h.axis_policy = static_cast<KvAxisPolicy>(p[9]);
  if (h.authenticated()) {
    h.key_id = GetU16(p + 10);
    if (h.key_id == 0) return absl::DataLossError("frame key_id is 0 in an authenticated frame");
  } else if (GetU16(p + 10) != 0) {
    return absl::DataLossError("frame reserved bytes 10..11 are not zero");
  }
  std::memcpy(h.profile_digest.data(), p + 12, 32);
  const uint8_t* q = p + 44;
  h.coords.batch = GetU32(q);
  h.coords.layer = GetU32(q + 4);
  h.coords.kv_head = GetU32(q + 8);
  h.coords.token_start = GetU32(q + 12);
  h.coords.token_count = GetU32(q + 16);
  h.counts.vector_count = GetU32(q + 20);
  h.vector_len = GetU32(q + 24);
  h.code_bytes = GetU32(q + 28);
  h.counts.coded = GetU32(q + 32);
  h.counts.raw_protected = GetU32(q + 36);
  h.counts.raw_policy = GetU32(q + 40);
  h.counts.raw_encode_fallback = GetU32(q + 44);
  h.counts.raw_quality_fallback = GetU32(q + 48);
  FQ_ASSIGN_OR_RETURN(Sizes s, ComputeSizes(h, limits, true));
  if (f.size() < s.total) {
    return absl::DataLossError(absl::StrCat("frame truncated: ", f.size(), " bytes, header requires ", s.total));
  }
  if (f.size() > s.total) {
    return absl::DataLossError(absl::StrCat("frame has ", f.size() - s.total, " trailing bytes after the checksum (",
                                            "header requires ", s.total, ")"));
  }
  // Axis/count consistency.
  if (h.coords.token_count == 0) return absl::DataLossError("frame token_count is 0");
  if (h.counts.vector_count == 0) return absl::DataLossError("frame vector_count is 0");
  if (h.vector_len == 0) return absl::DataLossError("frame vector_len is 0");
  if (uint64_t{h.coords.token_start} + h.coords.token_count > std::numeric_limits<uint32_t>::max()) {
    return absl::DataLossError("frame token span token_start + token_count overflows u32");
  }
  if (h.vector_axis() == KvVectorAxis::kToken) {
    if (h.counts.vector_count != h.coords.token_count) {
      return absl::DataLossError(absl::StrCat("frame vector_count ", h.counts.vector_count,
                                              " must equal token_count ", h.coords.token_count, " on the token axis"));
    }
  } else if (h.vector_len != h.coords.token_count) {
    return absl::DataLossError(absl::StrCat("frame vector_len ", h.vector_len, " must equal token_count ",
                                            h.coords.token_count, " on the channel axis"));
  }
  if (h.counts.coded > 0 && h.code_bytes == 0) {
    return absl::DataLossError("frame has coded vectors but code_bytes is 0");
  }
  size_t off = kKvFrameHeaderBytes;
  v.bitmap = f.subspan(off, s.bitmap);
  off += s.bitmap;
  v.codes = f.subspan(off, s.codes);
  off += s.codes;
  v.raw = f.subspan(off, s.raw);
  off += s.raw;
  if (h.authenticated()) v.auth_tag = f.subspan(off, kKvFrameTagBytes);
  uint64_t pop = 0;
  for (uint8_t b : v.bitmap) pop += static_cast<uint64_t>(std::popcount(static_cast<unsigned>(b)));
  const uint32_t tail = h.counts.vector_count & 7;
  if (tail != 0 && (v.bitmap.back() >> tail) != 0) {
    return absl::DataLossError("frame raw bitmap has non-zero padding bits past vector_count");
  }
  if (pop != h.counts.raw_total()) {
    return absl::DataLossError(absl::StrCat("frame raw bitmap marks ", pop, " vectors raw but the counts say ",
                                            h.counts.raw_total()));
  }
  return v;
}

absl::StatusOr<KvFrameHeader> InspectFrame(absl::Span<const uint8_t> frame) {
  FQ_ASSIGN_OR_RETURN(KvFrameView v, ParseKvFrame(frame));
  return v.header;
}

}  // namespace fibquant
