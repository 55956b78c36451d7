// Fuzz target: page-frame decoding of arbitrary bytes (ParseKvFrame, InspectFrame,
// KvCodec::DecodeFrame, KvCodec::DecodeVector) against small real profiles: per-token f32 keys with
// a protected first token, per-channel bf16 values, role-aware f16 keys, the raw axis policy, and
// centred per-token keys (version-2 frames with a mean section).
// Invariants: never crash; errors are DataLoss/InvalidArgument/ResourceExhausted/OutOfRange; a
// decoded page has exactly token_count * head_dim elements of the requested dtype and the coords
// and counts of the parsed header; DecodeVector agrees with DecodeFrame on every vector.
// The seed corpus (corpus/kv_frame_fuzz/) holds real frames of these profiles, some sealed (flag
// bit 2, HMAC tag) as with --frame-key-file (make_seeds.cc).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "core/kv_codec.h"
#include "core/kv_frame.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/fuzz_profiles.h"

using namespace fibquant;
using fibquant::fuzz::IsInputError;

namespace {

const std::vector<std::shared_ptr<const KvCodec>>& Codecs() {
  static const auto* codecs = new std::vector<std::shared_ptr<const KvCodec>>(fuzz::BuildFuzzCodecs());
  return *codecs;
}

void CheckDecode(const KvCodec& codec, absl::Span<const uint8_t> frame, const KvFrameView& view) {
  const DType out = codec.profile().shape.dtype;
  auto page = codec.DecodeFrame(frame, out);
  if (!page.ok()) {
    FQ_FUZZ_CHECK(IsInputError(page.status()));
    return;
  }
  const KvTensorShape& s = codec.profile().shape;
  FQ_FUZZ_CHECK(page->coords == view.header.coords);
  FQ_FUZZ_CHECK(page->counts == view.header.counts);
  FQ_FUZZ_CHECK(page->data.size() == size_t{page->coords.token_count} * s.head_dim * DTypeSize(out));
  const bool channel = view.header.vector_axis() == KvVectorAxis::kChannel;
  const uint32_t n = view.header.counts.vector_count;
  const size_t es = DTypeSize(out);
  for (uint32_t i = 0; i < n; ++i) {
    auto v = codec.DecodeVector(frame, i, out);
    FQ_FUZZ_CHECK(v.ok());
    const uint32_t len = channel ? page->coords.token_count : s.head_dim;
    FQ_FUZZ_CHECK(v->size() == size_t{len} * es);
    for (uint32_t j = 0; j < len; ++j) {
      const size_t pos = channel ? size_t{j} * s.head_dim + i : size_t{i} * s.head_dim + j;
      FQ_FUZZ_CHECK(std::memcmp(v->data() + size_t{j} * es, page->data.data() + pos * es, es) == 0);
    }
  }
  auto past = codec.DecodeVector(frame, n, out);
  FQ_FUZZ_CHECK(!past.ok() && past.status().code() == absl::StatusCode::kOutOfRange);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Codecs();
  return 0;
}

namespace {

void CheckFrame(absl::Span<const uint8_t> frame);

}  // namespace

// Each input is checked twice: as is (the checksum rejects almost every mutation) and "resealed"
// (its last 8 bytes replaced by the correct checksum of the rest), so the fuzzer also explores
// every check behind the checksum: counts, bitmap, code indices and padding, protected vectors.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  CheckFrame(absl::Span<const uint8_t>(data, size));
  if (size > kKvFrameChecksumBytes) {
    std::vector<uint8_t> sealed(data, data + size);
    const uint64_t c =
        KvFrameChecksum(absl::Span<const uint8_t>(sealed.data(), size - kKvFrameChecksumBytes));
    for (size_t i = 0; i < kKvFrameChecksumBytes; ++i) {
      sealed[size - kKvFrameChecksumBytes + i] = static_cast<uint8_t>(c >> (8 * i));
    }
    CheckFrame(sealed);
  }
  return 0;
}

namespace {

void CheckFrame(absl::Span<const uint8_t> frame) {
  auto view = ParseKvFrame(frame);
  auto header = InspectFrame(frame);
  FQ_FUZZ_CHECK(view.ok() == header.ok());
  if (!view.ok()) {
    FQ_FUZZ_CHECK(IsInputError(view.status()));
    for (const auto& c : Codecs()) {
      auto page = c->DecodeFrame(frame, c->profile().shape.dtype);
      FQ_FUZZ_CHECK(!page.ok() && IsInputError(page.status()));
    }
    return;
  }
  FQ_FUZZ_CHECK(view->header.counts.coded + view->header.counts.raw_total() == view->header.counts.vector_count);
  for (const auto& c : Codecs()) CheckDecode(*c, frame, *view);
}

}  // namespace
