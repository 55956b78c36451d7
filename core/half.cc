#include "core/half.h"

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace fibquant {

size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
  }
  return "unknown";
}

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "f32") return DType::kF32;
  if (name == "f16") return DType::kF16;
  if (name == "bf16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("dtype: unknown element type '", std::string(name), "' (expected f32, f16 or bf16)"));
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x0200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // < half of the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24 for exponents 102..112
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((abs >> 13) - (112u << 10));  // rebias exponent 127 -> 15
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t x;
  if (exp == 0) {
    if (mant == 0) {
      x = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      x = sign | ((112u - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    x = sign | 0x7f800000u | (mant << 13);
  } else {
    x = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

uint16_t FloatToBf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  const uint32_t lsb = (x >> 16) & 1u;
  x += 0x7fffu + lsb;
  return static_cast<uint16_t>(x >> 16);
}

float Bf16ToFloat(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

float LoadElement(DType dtype, const uint8_t* data, size_t i) {
  switch (dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, data + 4 * i, 4);
      return f;
    }
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, data + 2 * i, 2);
      return HalfToFloat(h);
    }
    case DType::kBF16: {
      uint16_t b;
      std::memcpy(&b, data + 2 * i, 2);
      return Bf16ToFloat(b);
    }
  }
  return 0.0f;
}

void StoreElement(DType dtype, float v, uint8_t* data, size_t i) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(data + 4 * i, &v, 4);
      return;
    case DType::kF16: {
      const uint16_t h = FloatToHalf(v);
      std::memcpy(data + 2 * i, &h, 2);
      return;
    }
    case DType::kBF16: {
      const uint16_t b = FloatToBf16(v);
      std::memcpy(data + 2 * i, &b, 2);
      return;
    }
  }
}

void ToFloat(DType dtype, const uint8_t* data, size_t n, float* out) {
  if (dtype == DType::kF32) {
    std::memcpy(out, data, 4 * n);
    return;
  }
  for (size_t i = 0; i < n; ++i) out[i] = LoadElement(dtype, data, i);
}

size_t FirstNonFinite(DType dtype, const uint8_t* data, size_t n) {
  if (dtype == DType::kF32) {
    for (size_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, data + 4 * i, 4);
      if ((u & 0x7F800000u) == 0x7F800000u) return i;
    }
    return n;
  }
  const uint16_t mask = dtype == DType::kF16 ? 0x7C00u : 0x7F80u;
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = static_cast<uint16_t>(data[2 * i] | (data[2 * i + 1] << 8));
    if ((h & mask) == mask) return i;
  }
  return n;
}

void FromFloat(DType dtype, const float* in, size_t n, uint8_t* out) {
  if (dtype == DType::kF32) {
    std::memcpy(out, in, 4 * n);
    return;
  }
  for (size_t i = 0; i < n; ++i) StoreElement(dtype, in[i], out, i);
}

}  // namespace fibquant
