// Readers and writers of the KV tensor files the `fibquant` CLI accepts: NumPy `.npy` (format
// versions 1, 2 and 3), `.safetensors`, and raw little-endian files whose dtype and shape come from
// flags; plus the `.npy` writer used by `fibquant decompress`.
//
// Hostile input is the design constraint: every declared size (header length, shape, data offsets)
// is checked with overflow-safe arithmetic against the file's real size and against TensorLimits
// BEFORE anything proportional to it is allocated, so a 100-byte file that declares a 2^60-element
// shape costs 100 bytes. Status codes:
//   InvalidArgument  malformed header, unsupported dtype/byte order/layout, size arithmetic overflow,
//                    shape/offsets that disagree with each other, unknown format;
//   DataLoss         the file is shorter than its header declares (truncated data or header);
//   ResourceExhausted a well-formed file above TensorLimits;
//   NotFound         the file or a named safetensors tensor does not exist.
// Every message names the file.
//
// Ownership: the CLI engineer (client/cli). Thread safety: free functions without shared state.
#ifndef FIBQUANT_CLIENT_CLI_TENSOR_IO_H_
#define FIBQUANT_CLIENT_CLI_TENSOR_IO_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/half.h"

namespace fibquant::cli {

struct TensorLimits {
  // Largest tensor payload read into memory.
  uint64_t max_data_bytes = 8ull << 30;
  // Largest .npy header / safetensors JSON header.
  uint64_t max_header_bytes = 16ull << 20;
  // Largest rank accepted.
  uint32_t max_rank = 8;
};

// A dense little-endian C-order tensor.
struct Tensor {
  DType dtype = DType::kF32;
  std::vector<uint64_t> shape;
  std::string data;  // product(shape) * DTypeSize(dtype) bytes
  uint64_t element_count() const;
};

// .npy: descr '<f4' (f32), '<f2' (f16); bf16 only when `bf16_from_u16` is set, stored as '<u2' or
// '|V2' / '<V2' (NumPy has no bfloat16; ml_dtypes saves it as 2-byte void). fortran_order must be
// False. The payload must be exactly product(shape) elements (shorter: DataLoss, longer:
// InvalidArgument).
[[nodiscard]] absl::StatusOr<Tensor> ReadNpy(const std::string& path, bool bf16_from_u16,
                                             const TensorLimits& limits = {});
// The same from bytes already in memory (`name` is used in messages).
[[nodiscard]] absl::StatusOr<Tensor> ParseNpy(std::string_view bytes, std::string_view name,
                                              bool bf16_from_u16, const TensorLimits& limits = {});

// .safetensors: u64 LE header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
// data. dtype F32/F16/BF16. `tensor_name` empty picks the only tensor (InvalidArgument listing
// the names when there are several).
[[nodiscard]] absl::StatusOr<Tensor> ReadSafetensors(const std::string& path,
                                                     const std::string& tensor_name,
                                                     const TensorLimits& limits = {});

// Raw little-endian elements of `dtype` in C order of `shape`; the file size must match exactly.
[[nodiscard]] absl::StatusOr<Tensor> ReadRaw(const std::string& path, DType dtype,
                                             const std::vector<uint64_t>& shape,
                                             const TensorLimits& limits = {});

// "64,4,128" -> {64, 4, 128}; InvalidArgument for empty, non-numeric or zero dimensions.
[[nodiscard]] absl::StatusOr<std::vector<uint64_t>> ParseShapeFlag(std::string_view text);

// Serialises a tensor as .npy version 1.0 (2.0 when the header needs it). bf16 is written as
// '<u2' (NumPy has no bfloat16; read it back with the bf16 flag).
std::string EncodeNpy(const Tensor& tensor);
// EncodeNpy with the header dict given verbatim (for tests that write malformed files).
std::string EncodeNpyWithHeader(std::string_view header_dict, std::string_view payload,
                                int major_version = 1);
// Serialises one or more tensors as .safetensors (tests and tools).
struct NamedTensor {
  std::string name;
  const Tensor* tensor;
};
std::string EncodeSafetensors(const std::vector<NamedTensor>& tensors);

// Whole-file helpers. ReadFile refuses files above `max_bytes` (ResourceExhausted) before reading.
[[nodiscard]] absl::StatusOr<std::string> ReadFile(const std::string& path, uint64_t max_bytes);
// Writes via a temporary file in the same directory and renames it, so a failed run never leaves
// a half-written output under the final name.
absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes);

}  // namespace fibquant::cli

#endif  // FIBQUANT_CLIENT_CLI_TENSOR_IO_H_
