// The `.fqc` container written by `fibquant compress` and read by `fibquant decompress`: a
// metadata JSON (source tensor layout, profile digest), the page frames in stream order, and the
// stream's receipt JSON, closed by an XXH3-64 checksum. Byte layout: docs/format/container.md.
//
// Parsing checks every declared size against ContainerLimits and against the bytes that remain
// BEFORE copying anything, so a corrupt length field never drives an allocation. Status codes:
//   DataLoss          corrupt content (magic, reserved flags, lengths past the end, trailing
//                     bytes, checksum, metadata/receipt JSON that does not parse);
//   Unimplemented     a container version this build does not read;
//   ResourceExhausted a field above ContainerLimits.
//
// Ownership: the CLI engineer. Thread safety: pure functions.
#ifndef FIBQUANT_CLIENT_CLI_CONTAINER_H_
#define FIBQUANT_CLIENT_CLI_CONTAINER_H_

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fibquant::cli {

inline constexpr std::array<char, 4> kContainerMagic = {'F', 'Q', 'K', 'C'};
inline constexpr uint16_t kContainerVersion = 1;
inline constexpr size_t kContainerPreambleBytes = 16;  // magic, version, flags, meta_len, frame_count
inline constexpr size_t kContainerChecksumBytes = 8;

struct ContainerLimits {
  uint32_t max_metadata_bytes = 1u << 20;
  uint32_t max_frames = 1u << 22;
  // The KV layer's own frame limit (core/kv_frame.h KvFrameLimits::max_frame_bytes).
  uint32_t max_frame_bytes = 256u << 20;
  uint32_t max_receipt_bytes = 16u << 20;
  // Largest container file read into memory.
  uint64_t max_container_bytes = 64ull << 30;
};

struct Container {
  std::string metadata_json;        // UTF-8 JSON object (see docs/format/container.md)
  std::vector<std::string> frames;  // KV page frames, stream order
  std::string receipt_json;         // the stream's Receipt (proto3 JSON mapping)
};

// Serialises a container. InvalidArgument when a part exceeds the default limits (so every written
// container can be read back).
[[nodiscard]] absl::StatusOr<std::string> EncodeContainer(const Container& c);

// Parses and verifies a container (docs/format/container.md "Reader checks", in that order).
[[nodiscard]] absl::StatusOr<Container> DecodeContainer(std::string_view bytes,
                                                        const ContainerLimits& limits = {});

// XXH3-64 of `bytes` (what the trailing checksum field stores for the bytes before it).
uint64_t ContainerChecksum(std::string_view bytes);

}  // namespace fibquant::cli

#endif  // FIBQUANT_CLIENT_CLI_CONTAINER_H_
