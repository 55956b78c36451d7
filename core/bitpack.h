// Fixed-width index bit packing for vector codes (docs/FORMAT.md, "Vector code", packing rules).
//
// Indices of `width` bits (1..32) are packed LSB-first into a little-endian bit stream: bit b of
// index i is stream bit p = i*width + b, i.e. bit (p mod 8) of byte p/8. The stream is
// ceil(count*width/8) bytes; the padding bits after count*width are zero, and Unpack rejects any
// that are not (a set padding bit means the payload was corrupted or forged).
// Owner: codec module. Thread safety: pure functions.
#ifndef FIBQUANT_CORE_BITPACK_H_
#define FIBQUANT_CORE_BITPACK_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace fibquant {

inline constexpr uint32_t kMinPackWidth = 1;
inline constexpr uint32_t kMaxPackWidth = 32;

// ceil(count*width/8). InvalidArgument for a width outside 1..32; ResourceExhausted if count*width
// overflows size_t.
[[nodiscard]] absl::StatusOr<size_t> PackedBytes(size_t count, uint32_t width);

// Packs `indices` at `width` bits. InvalidArgument for a bad width or an index >= 2^width (the
// message names the position and the limit).
[[nodiscard]] absl::StatusOr<std::vector<uint8_t>> Pack(absl::Span<const uint32_t> indices,
                                                        uint32_t width);
// As Pack, into `out`, which must be exactly PackedBytes(indices.size(), width) long
// (InvalidArgument otherwise). `out` is fully overwritten.
absl::Status PackInto(absl::Span<const uint32_t> indices, uint32_t width, absl::Span<uint8_t> out);

// Reverses Pack. InvalidArgument for a bad width; DataLoss if `bytes` is not exactly
// PackedBytes(count, width) long or a padding bit is set.
[[nodiscard]] absl::StatusOr<std::vector<uint32_t>> Unpack(absl::Span<const uint8_t> bytes,
                                                           size_t count, uint32_t width);
// As Unpack, into `out` (count values).
absl::Status UnpackInto(absl::Span<const uint8_t> bytes, size_t count, uint32_t width,
                        absl::Span<uint32_t> out);

// Unchecked kernels for the codec's per-vector hot loop. The caller guarantees 1 <= width <= 32,
// `out`/`bytes` hold exactly ceil(count*width/8) bytes and every index < 2^width.
// PackRaw overwrites all ceil(count*width/8) bytes (padding bits zero).
void PackRaw(const uint32_t* indices, size_t count, uint32_t width, uint8_t* out);
// UnpackRaw returns false (out filled anyway) if a padding bit is set.
bool UnpackRaw(const uint8_t* bytes, size_t count, uint32_t width, uint32_t* out);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_BITPACK_H_
