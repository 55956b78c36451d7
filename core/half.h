// Element types of KV data (f32, IEEE binary16, bfloat16) and exact scalar conversions.
//
// Conversions are bit-manipulation only (round to nearest even, NaN kept NaN), so they are identical
// on every CPU; SIMD variants for the codec's fast path live in the codec and are tested against
// these. Thread safety: pure functions.
#ifndef FIBQUANT_CORE_HALF_H_
#define FIBQUANT_CORE_HALF_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"

namespace fibquant {

enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Bytes per element: 4, 2, 2.
size_t DTypeSize(DType dtype);
// "f32", "f16", "bf16".
std::string_view DTypeName(DType dtype);
[[nodiscard]] absl::StatusOr<DType> ParseDType(std::string_view name);

// f32 -> binary16, round to nearest even; overflow gives +-inf, NaN gives a quiet NaN.
uint16_t FloatToHalf(float f);
float HalfToFloat(uint16_t h);
// f32 -> bfloat16, round to nearest even; NaN gives a quiet NaN.
uint16_t FloatToBf16(float f);
float Bf16ToFloat(uint16_t b);

// Reads element i of a little-endian buffer of `dtype` as f32.
float LoadElement(DType dtype, const uint8_t* data, size_t i);
// Writes v as element i of a little-endian buffer of `dtype`.
void StoreElement(DType dtype, float v, uint8_t* data, size_t i);
// Converts n elements of `dtype` to f32 (out has n floats).
void ToFloat(DType dtype, const uint8_t* data, size_t n, float* out);
// Converts n floats to `dtype` (out has n * DTypeSize(dtype) bytes).
void FromFloat(DType dtype, const float* in, size_t n, uint8_t* out);
// Index of the first of n elements of `dtype` that is Inf or NaN (all exponent bits set), n when
// every element is finite: the check ToFloat + std::isfinite makes, without converting.
size_t FirstNonFinite(DType dtype, const uint8_t* data, size_t n);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_HALF_H_
