// FibQuant vector codec: batch encode/decode of fixed-size codes (docs/FORMAT.md, "Vector code").
//
// One code per vector, `code_bytes()` long: the fp16 norm (2 bytes LE), then B = d/k indices of
// wire_index_bits each, packed LSB-first, padding bits zero. Every code is decodable on its own.
// Two paths: kReference (f64 rotation, exact nearest codeword with lowest index on ties; the
// specification) and kFast (f32, batched rotation, SIMD, pruned exact search; may differ from the
// reference only on near-ties, which tests measure and bound).
// Owner: codec module (docs/format/code.md is the normative text).
// Thread safety: a Quantizer is immutable after Create(); Encode/Decode are const and may run
// concurrently from many threads (each thread keeps its own scratch buffers).
#ifndef FIBQUANT_CORE_CODEC_H_
#define FIBQUANT_CORE_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/codebook.h"
#include "core/half.h"
#include "core/rotation.h"

namespace fibquant {

enum class CodecPath : uint8_t { kReference = 0, kFast = 1 };

// A vector that could not be encoded (non-finite element: InvalidArgument; zero norm:
// InvalidArgument; norm outside the fp16 range (>= 65520 or < ~3e-8): OutOfRange). Its code bytes
// are all zero.
struct VectorFailure {
  size_t index = 0;
  absl::Status status;
};

class Quantizer {
 public:
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const Quantizer>> Create(Codebook codebook);

  const Profile& profile() const { return codebook_.profile(); }
  const Codebook& codebook() const { return codebook_; }
  const Rotation& rotation() const { return rotation_; }
  uint32_t dim() const { return codebook_.profile().ambient_dim; }
  size_t code_bytes() const { return code_bytes_; }

  // Encodes n vectors of dim() elements of `dtype` (in: n*dim*DTypeSize bytes) into
  // codes (n*code_bytes() bytes). InvalidArgument if a buffer size is wrong. Vectors that cannot be
  // encoded are listed in *failures (if non-null; otherwise the first one fails the call).
  // *failures is cleared first, then lists this call's failures in index order. Both paths write
  // the same norm bytes; kFast differs from kReference only in near-tie block indices, and its
  // indices are the same on every x86-64 CPU (the scalar and AVX2 searches are bit-identical).
  // Single-threaded per call; run calls on several threads for parallelism.
  absl::Status Encode(DType dtype, absl::Span<const uint8_t> in, size_t n, absl::Span<uint8_t> codes,
                      CodecPath path, std::vector<VectorFailure>* failures = nullptr) const;

  // Decodes n codes into n*dim elements of `dtype`. DataLoss (naming the vector and field) for a
  // non-zero padding bit, an index >= N, or a norm that is not finite and > 0. Values beyond the
  // f16/bf16 range saturate to the largest finite value.
  absl::Status Decode(absl::Span<const uint8_t> codes, size_t n, DType dtype, absl::Span<uint8_t> out,
                      CodecPath path) const;

  // Whether the fast path's nearest-codeword search prunes for this codebook (norm pruning chosen
  // by a cost model, the k = 2 grid for 64 <= N <= 4096, or the clustered search for k = 3, 4 and
  // N >= 1024; chosen at Create, a speed choice only: the indices are the same either way).
  bool uses_pruned_search() const;

  // Decodes to f32 (convenience for metrics).
  absl::Status DecodeF32(absl::Span<const uint8_t> codes, size_t n, float* out, CodecPath path) const;

 private:
  Quantizer(Codebook codebook, Rotation rotation);
  Codebook codebook_;
  Rotation rotation_;
  size_t code_bytes_ = 0;
  // Search acceleration built once (e.g. codewords sorted by norm); owned by the codec.
  struct SearchIndex;
  std::shared_ptr<const SearchIndex> search_;
};

}  // namespace fibquant

#endif  // FIBQUANT_CORE_CODEC_H_
