#include "client/cli/container.h"

#include <xxhash.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace fibquant::cli {
namespace {

void PutLe(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint64_t GetLe(std::string_view s, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(s[at + i]);
  return v;
}

bool IsJsonObject(std::string_view text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  return !j.is_discarded() && j.is_object();
}

}  // namespace

uint64_t ContainerChecksum(std::string_view bytes) { return XXH3_64bits(bytes.data(), bytes.size()); }

absl::StatusOr<std::string> EncodeContainer(const Container& c) {
  const ContainerLimits limits;
  if (c.metadata_json.size() > limits.max_metadata_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("container metadata of ", c.metadata_json.size(),
                                                   " bytes is above the limit of ", limits.max_metadata_bytes));
  }
  if (c.frames.size() > limits.max_frames) {
    return absl::InvalidArgumentError(absl::StrCat("container of ", c.frames.size(),
                                                   " frames is above the limit of ", limits.max_frames));
  }
  if (c.receipt_json.size() > limits.max_receipt_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("receipt of ", c.receipt_json.size(),
                                                   " bytes is above the limit of ", limits.max_receipt_bytes));
  }
  size_t total = kContainerPreambleBytes + c.metadata_json.size() + 4 + c.receipt_json.size() +
                 kContainerChecksumBytes;
  for (size_t i = 0; i < c.frames.size(); ++i) {
    if (c.frames[i].size() > limits.max_frame_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("frame ", i, " of ", c.frames[i].size(),
                                                     " bytes is above the limit of ", limits.max_frame_bytes));
    }
    total += 4 + c.frames[i].size();
  }
  std::string out;
  out.reserve(total);
  out.append(kContainerMagic.data(), kContainerMagic.size());
  PutLe(&out, kContainerVersion, 2);
  PutLe(&out, 0, 2);  // flags: reserved
  PutLe(&out, c.metadata_json.size(), 4);
  PutLe(&out, c.frames.size(), 4);
  out += c.metadata_json;
  for (const auto& f : c.frames) {
    PutLe(&out, f.size(), 4);
    out += f;
  }
  PutLe(&out, c.receipt_json.size(), 4);
  out += c.receipt_json;
  PutLe(&out, ContainerChecksum(out), 8);
  return out;
}

absl::StatusOr<Container> DecodeContainer(std::string_view b, const ContainerLimits& limits) {
  if (b.size() > limits.max_container_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("container of ", b.size(), " bytes is above the limit of ",
                                                     limits.max_container_bytes));
  }
  if (b.size() < kContainerPreambleBytes + 4 + kContainerChecksumBytes) {
    return absl::DataLossError(absl::StrCat("container truncated: ", b.size(), " bytes, at least ",
                                            kContainerPreambleBytes + 4 + kContainerChecksumBytes,
                                            " needed"));
  }
  if (b.substr(0, 4) != std::string_view(kContainerMagic.data(), 4)) {
    return absl::DataLossError("not a fibquant container: bad magic (expected \"FQKC\")");
  }
  const uint64_t version = GetLe(b, 4, 2);
  if (version != kContainerVersion) {
    return absl::UnimplementedError(absl::StrCat("container version ", version,
                                                 " is not supported (this build reads version ",
                                                 kContainerVersion, ")"));
  }
  const uint64_t flags = GetLe(b, 6, 2);
  if (flags != 0) return absl::DataLossError(absl::StrCat("container flags 0x", absl::Hex(flags), " are reserved and must be 0"));
  const uint64_t meta_len = GetLe(b, 8, 4);
  const uint64_t frame_count = GetLe(b, 12, 4);
  if (meta_len > limits.max_metadata_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("container metadata_len ", meta_len,
                                                     " is above the limit of ", limits.max_metadata_bytes));
  }
  if (frame_count > limits.max_frames) {
    return absl::ResourceExhaustedError(absl::StrCat("container frame_count ", frame_count,
                                                     " is above the limit of ", limits.max_frames));
  }
  // Everything up to the checksum; lengths are checked against what is left of it.
  const size_t body_end = b.size() - kContainerChecksumBytes;
  size_t pos = kContainerPreambleBytes;
  if (meta_len > body_end - pos) {
    return absl::DataLossError(absl::StrCat("container metadata_len ", meta_len, " runs past the end of the file"));
  }
  const size_t meta_pos = pos;
  pos += meta_len;
  // First pass: walk the length fields only, so nothing is copied from a container that is
  // corrupt further on.
  // Every counted frame needs at least its 4-byte length field, so the bytes that remain bound
  // the reservation (frame_count alone must not drive an allocation).
  std::vector<std::pair<size_t, size_t>> spans;
  spans.reserve(std::min<uint64_t>(frame_count, (body_end - pos) / 4));
  for (uint64_t i = 0; i < frame_count; ++i) {
    if (body_end - pos < 4) {
      return absl::DataLossError(absl::StrCat("container truncated in the length of frame ", i, " of ", frame_count));
    }
    const uint64_t len = GetLe(b, pos, 4);
    pos += 4;
    if (len > limits.max_frame_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat("container frame ", i, " length ", len,
                                                       " is above the limit of ", limits.max_frame_bytes));
    }
    if (len > body_end - pos) {
      return absl::DataLossError(absl::StrCat("container frame ", i, " length ", len, " runs past the end of the file"));
    }
    spans.emplace_back(pos, len);
    pos += len;
  }
  if (body_end - pos < 4) return absl::DataLossError("container truncated in the receipt length");
  const uint64_t receipt_len = GetLe(b, pos, 4);
  pos += 4;
  if (receipt_len > limits.max_receipt_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("container receipt_len ", receipt_len,
                                                     " is above the limit of ", limits.max_receipt_bytes));
  }
  if (receipt_len > body_end - pos) {
    return absl::DataLossError(absl::StrCat("container receipt_len ", receipt_len, " runs past the end of the file"));
  }
  const size_t receipt_pos = pos;
  pos += receipt_len;
  if (pos != body_end) {
    return absl::DataLossError(absl::StrCat("container has ", body_end - pos,
                                            " unexpected bytes before the checksum"));
  }
  const uint64_t stored = GetLe(b, body_end, 8);
  const uint64_t computed = ContainerChecksum(b.substr(0, body_end));
  if (stored != computed) {
    return absl::DataLossError(absl::StrCat("container checksum mismatch (stored 0x", absl::Hex(stored),
                                            ", computed 0x", absl::Hex(computed), ")"));
  }
  Container c;
  c.metadata_json = std::string(b.substr(meta_pos, meta_len));
  if (!IsJsonObject(c.metadata_json)) return absl::DataLossError("container metadata is not a JSON object");
  c.receipt_json = std::string(b.substr(receipt_pos, receipt_len));
  if (!IsJsonObject(c.receipt_json)) return absl::DataLossError("container receipt is not a JSON object");
  c.frames.reserve(spans.size());
  for (const auto& [at, len] : spans) c.frames.emplace_back(b.substr(at, len));
  return c;
}

}  // namespace fibquant::cli
