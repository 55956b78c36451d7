// Bit packing: see bitpack.h. The raw kernels read/write 64-bit little-endian words where the
// buffer allows and fall back to byte assembly at the tail, so they never touch memory past the
// stream.
#include "core/bitpack.h"

#include <bit>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

static_assert(std::endian::native == std::endian::little, "bit packing assumes a little-endian host");

absl::Status CheckWidth(uint32_t width) {
  if (width < kMinPackWidth || width > kMaxPackWidth) {
    return absl::InvalidArgumentError(
        absl::StrCat("bitpack width: ", width, " is outside [", kMinPackWidth, ", ", kMaxPackWidth, "]"));
  }
  return absl::OkStatus();
}

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

}  // namespace

absl::StatusOr<size_t> PackedBytes(size_t count, uint32_t width) {
  FQ_RETURN_IF_ERROR(CheckWidth(width));
  if (count > std::numeric_limits<size_t>::max() / width) {
    return absl::ResourceExhaustedError(
        absl::StrCat("bitpack: count ", count, " x width ", width, " bits overflows size_t"));
  }
  const size_t bits = count * width;
  return bits / 8 + (bits % 8 != 0 ? 1 : 0);
}

void PackRaw(const uint32_t* indices, size_t count, uint32_t width, uint8_t* out) {
  // Byte-aligned widths (the common codebook sizes 4, 16, 256) without the bit accumulator; the
  // bytes are the same as the general loop's.
  if (width == 8 || width == 4 || width == 2) {
    const uint32_t per = 8 / width;
    const size_t full = count / per;
    for (size_t b = 0; b < full; ++b) {
      uint32_t byte = 0;
      for (uint32_t e = 0; e < per; ++e) byte |= indices[b * per + e] << (e * width);
      out[b] = static_cast<uint8_t>(byte);
    }
    if (full * per < count) {
      uint32_t byte = 0;
      for (size_t e = full * per; e < count; ++e) {
        byte |= indices[e] << ((e - full * per) * width);
      }
      out[full] = static_cast<uint8_t>(byte);
    }
    return;
  }
  uint64_t acc = 0;
  uint32_t nbits = 0;  // <= 7 between iterations, so acc never holds more than 39 bits
  for (size_t i = 0; i < count; ++i) {
    acc |= static_cast<uint64_t>(indices[i]) << nbits;
    nbits += width;
    if (nbits >= 32) {
      const uint32_t w32 = static_cast<uint32_t>(acc);
      std::memcpy(out, &w32, 4);
      out += 4;
      acc >>= 32;
      nbits -= 32;
    }
  }
  while (nbits >= 8) {
    *out++ = static_cast<uint8_t>(acc);
    acc >>= 8;
    nbits -= 8;
  }
  if (nbits > 0) *out = static_cast<uint8_t>(acc);
}

bool UnpackRaw(const uint8_t* bytes, size_t count, uint32_t width, uint32_t* out) {
  const size_t total_bits = count * width;
  const size_t nbytes = (total_bits + 7) / 8;
  const uint64_t mask = (uint64_t{1} << width) - 1;
  if (width == 8 || width == 4 || width == 2) {  // byte-aligned: the same values, no window loads
    size_t e = 0;
    if (width == 8) {
      for (; e < count; ++e) out[e] = bytes[e];
    } else if (width == 4) {
      for (; e + 2 <= count; e += 2) {
        out[e] = bytes[e / 2] & 0xFu;
        out[e + 1] = bytes[e / 2] >> 4;
      }
    } else {
      for (; e + 4 <= count; e += 4) {
        const uint32_t b = bytes[e / 4];
        out[e] = b & 3u;
        out[e + 1] = (b >> 2) & 3u;
        out[e + 2] = (b >> 4) & 3u;
        out[e + 3] = b >> 6;
      }
    }
    for (; e < count; ++e) {  // the last, partial byte
      out[e] = static_cast<uint32_t>(bytes[(e * width) / 8] >> ((e * width) % 8)) & mask;
    }
    const uint32_t used = static_cast<uint32_t>(total_bits & 7);
    return used == 0 || (bytes[nbytes - 1] >> used) == 0;
  }
  size_t i = 0;
  size_t p = 0;
  // Fast part: an 8-byte window starting at byte p/8 holds bits [p, p + 57) >= p + width.
  if (nbytes >= 8) {
    const size_t last_fast_byte = nbytes - 8;
    for (; i < count && (p >> 3) <= last_fast_byte; ++i, p += width) {
      out[i] = static_cast<uint32_t>((Load64(bytes + (p >> 3)) >> (p & 7)) & mask);
    }
  }
  for (; i < count; ++i, p += width) {
    const size_t first = p >> 3;
    const size_t last = (p + width - 1) >> 3;  // < nbytes
    uint64_t w = 0;
    for (size_t b = first; b <= last; ++b) w |= static_cast<uint64_t>(bytes[b]) << (8 * (b - first));
    out[i] = static_cast<uint32_t>((w >> (p & 7)) & mask);
  }
  const uint32_t used = static_cast<uint32_t>(total_bits & 7);
  return used == 0 || (bytes[nbytes - 1] >> used) == 0;
}

absl::Status PackInto(absl::Span<const uint32_t> indices, uint32_t width, absl::Span<uint8_t> out) {
  FQ_ASSIGN_OR_RETURN(const size_t nbytes, PackedBytes(indices.size(), width));
  if (out.size() != nbytes) {
    return absl::InvalidArgumentError(absl::StrCat("bitpack: output buffer is ", out.size(),
                                                   " bytes, expected ", nbytes));
  }
  if (width < 32) {
    const uint32_t limit = uint32_t{1} << width;
    for (size_t i = 0; i < indices.size(); ++i) {
      if (indices[i] >= limit) {
        return absl::InvalidArgumentError(absl::StrCat("bitpack: index[", i, "] = ", indices[i],
                                                       " does not fit in ", width, " bits (limit ",
                                                       limit - 1, ")"));
      }
    }
  }
  PackRaw(indices.data(), indices.size(), width, out.data());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> Pack(absl::Span<const uint32_t> indices, uint32_t width) {
  FQ_ASSIGN_OR_RETURN(const size_t nbytes, PackedBytes(indices.size(), width));
  std::vector<uint8_t> out(nbytes);
  FQ_RETURN_IF_ERROR(PackInto(indices, width, absl::MakeSpan(out)));
  return out;
}

absl::Status UnpackInto(absl::Span<const uint8_t> bytes, size_t count, uint32_t width,
                        absl::Span<uint32_t> out) {
  FQ_ASSIGN_OR_RETURN(const size_t nbytes, PackedBytes(count, width));
  if (bytes.size() != nbytes) {
    return absl::DataLossError(absl::StrCat("bitpack: packed indices are ", bytes.size(),
                                            " bytes, expected ", nbytes, " for ", count,
                                            " indices of ", width, " bits"));
  }
  if (out.size() != count) {
    return absl::InvalidArgumentError(
        absl::StrCat("bitpack: output holds ", out.size(), " indices, expected ", count));
  }
  if (!UnpackRaw(bytes.data(), count, width, out.data())) {
    return absl::DataLossError(
        absl::StrCat("bitpack: non-zero padding bit after ", count * width, " index bits"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint32_t>> Unpack(absl::Span<const uint8_t> bytes, size_t count,
                                             uint32_t width) {
  FQ_ASSIGN_OR_RETURN(const size_t nbytes, PackedBytes(count, width));
  if (bytes.size() != nbytes) {  // checked before allocating `count` values
    return absl::DataLossError(absl::StrCat("bitpack: packed indices are ", bytes.size(),
                                            " bytes, expected ", nbytes, " for ", count,
                                            " indices of ", width, " bits"));
  }
  std::vector<uint32_t> out(count);
  FQ_RETURN_IF_ERROR(UnpackInto(bytes, count, width, absl::MakeSpan(out)));
  return out;
}

}  // namespace fibquant
