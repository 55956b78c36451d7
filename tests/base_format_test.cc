// Pins every check value quoted in docs/format/base.md, so the specification of the base pieces
// (digest rendering, canonical writer, RNG and samplers, portable log/exp, f16/bf16 rounding) cannot
// drift from the code silently. Behavioural tests of the same pieces live in base_test.cc.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "core/digest.h"
#include "core/half.h"
#include "core/portable_math.h"
#include "core/rng.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

uint64_t Bits(double d) {
  uint64_t b;
  std::memcpy(&b, &d, 8);
  return b;
}

float FloatFromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

TEST(BaseFormat, DigestRendering) {
  EXPECT_EQ(Sha256Digest(""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_FALSE(IsDigestString("sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"));
  EXPECT_FALSE(IsDigestString("sha256:e3b0"));
  CanonicalWriter w("dom");
  w.U8(1);
  EXPECT_EQ(w.bytes(), std::string("dom\0\x01", 5));
  EXPECT_EQ(w.Digest(), "sha256:327cc87b9d24814823d28baee2d4a2570e5073f63c2eb84e5723c0a2628a42b3");
}

TEST(BaseFormat, CanonicalWriterPrimitives) {
  CanonicalWriter w("d");
  w.I64(-2);
  w.Bool(true);
  w.F32(1.0f);
  w.Bytes("xy", 2);
  w.OptF64(false, 5.0);
  w.OptF64(true, -0.0);
  const std::string want(
      "d\0"
      "\xfe\xff\xff\xff\xff\xff\xff\xff"
      "\x01"
      "\x00\x00\x80\x3f"
      "\x02\0\0\0\0\0\0\0xy"
      "\x00"
      "\x01\0\0\0\0\0\0\0\x80",
      2 + 8 + 1 + 4 + 10 + 1 + 9);
  EXPECT_EQ(w.bytes(), want);
}

TEST(BaseFormat, SplitMixAndXoshiro) {
  uint64_t x = 0;
  EXPECT_EQ(SplitMix64(&x), 0xe220a8397b1dcdafull);
  EXPECT_EQ(x, 0x9E3779B97F4A7C15ull);
  Rng r(0);
  EXPECT_EQ(r.NextU64(), 0x99ec5f36cb75f2b4ull);
  EXPECT_EQ(r.NextU64(), 0xbf6e1f784956452aull);
  EXPECT_EQ(r.NextU64(), 0x1a5f849d4933e6e0ull);
  EXPECT_EQ(r.NextU64(), 0x6aa594f1262d2d2cull);
  EXPECT_EQ(Rng(42).NextU64(), 0x15780b2e0c2ec716ull);
  EXPECT_EQ(kRngAlgorithm, "fq-rng-xoshiro256starstar-splitmix64-polar-mtgamma-v1");
}

TEST(BaseFormat, UniformDoubles) {
  EXPECT_EQ(Rng(0).NextDouble(), 0x1.33d8be6d96ebep-1);
  EXPECT_EQ(Rng(0).NextOpenDouble(), 0x1.33d8be6d96ebep-1);
  // The documented rounding of m + 0.5: exact below 2^52, ties to even at and above.
  Rng a(123), b(123);
  for (int i = 0; i < 20000; ++i) {
    const uint64_t m = b.NextU64() >> 11;
    uint64_t rounded2 = 2 * m + 1;  // (m + 0.5) in units of 1/2
    if (m >= (1ull << 52)) rounded2 = (m % 2 == 0) ? 2 * m : 2 * m + 2;
    const double want = static_cast<double>(rounded2) * 0x1p-54;
    EXPECT_EQ(a.NextOpenDouble(), want) << i;
  }
}

TEST(BaseFormat, NormalAndGamma) {
  Rng r(0);
  EXPECT_EQ(r.Normal(), 0x1.323a82a4bc9e5p-1);
  EXPECT_EQ(r.Normal(), 0x1.76a54f2c0effap+0);
  EXPECT_EQ(r.Normal(), -0x1.ca445408b789cp-1);
  Rng g(0);
  EXPECT_EQ(g.Gamma(0.5), 0x1.58a178df2785bp-2);
  EXPECT_EQ(g.Gamma(2.0), 0x1.17071fffaa322p+2);
}

TEST(BaseFormat, PortableLogExpCheckValues) {
  EXPECT_EQ(Bits(PortableLog(2.0)), Bits(0x1.62e42fefa39efp-1));
  EXPECT_EQ(Bits(PortableLog(10.0)), Bits(0x1.26bb1bbb55515p+1));
  EXPECT_EQ(Bits(PortableLog(0.1)), Bits(-0x1.26bb1bbb55515p+1));
  EXPECT_EQ(Bits(PortableLog(1e-300)), Bits(-0x1.5963447f87fb5p+9));
  EXPECT_EQ(Bits(PortableLog(1.0)), Bits(0.0));
  EXPECT_EQ(Bits(PortableExp(1.0)), Bits(0x1.5bf0a8b14576ap+1));
  EXPECT_EQ(Bits(PortableExp(-1.0)), Bits(0x1.78b56362cef38p-2));
  EXPECT_EQ(Bits(PortableExp(0.5)), Bits(0x1.a61298e1e069cp+0));
  EXPECT_EQ(Bits(PortableExp(100.0)), Bits(0x1.3494a9b171bf5p+144));
  EXPECT_EQ(Bits(PortableExp(0.0)), Bits(1.0));
  EXPECT_TRUE(std::isinf(PortableLog(HUGE_VAL)));
  EXPECT_TRUE(std::isinf(PortableLog(-0.0)));
  EXPECT_TRUE(std::isinf(PortableExp(0x1.62e42fefa39f0p+9)));  // just above the overflow bound
  EXPECT_EQ(PortableExp(-0x1.74910d52d3053p+9), 0.0);           // just below the underflow bound
}

TEST(BaseFormat, HalfRounding) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(FloatFromBits(0x477fefff)), 0x7bff);  // just below 65520
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-65520.0f), 0xfc00);
  EXPECT_EQ(FloatToHalf(0x1p-24f), 0x0001);
  EXPECT_EQ(FloatToHalf(0x1p-25f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0x1p-25f), 0x8000);
  EXPECT_EQ(FloatToHalf(FloatFromBits(0x33000001)), 0x0001);
  EXPECT_EQ(FloatToHalf(1.00146484375f), 0x3c02);
  EXPECT_EQ(FloatToHalf(1.00048828125f), 0x3c00);  // 1 + half a half-ulp: tie to even
  EXPECT_EQ(FloatToHalf(3.14159265f), 0x4248);
  EXPECT_EQ(FloatToHalf(FloatFromBits(0x7f800000)), 0x7c00);
  EXPECT_EQ(FloatToHalf(FloatFromBits(0xffc00001)), 0xfe00);  // NaN: quiet, payload dropped
  EXPECT_EQ(FloatToHalf(0x1.ffcp-15f), 0x03ff + 1);  // rounds up into the smallest normal
  EXPECT_EQ(HalfToFloat(0x0200), 0x1p-15f);
  EXPECT_EQ(HalfToFloat(0x0001), 0x1p-24f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
}

TEST(BaseFormat, Bf16Rounding) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(3.14159265f), 0x4049);
  EXPECT_EQ(FloatToBf16(1.00390625f), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.01171875f), 0x3f82);
  EXPECT_EQ(FloatToBf16(FloatFromBits(0x7f7fffff)), 0x7f80);  // rounds past the largest to inf
  EXPECT_EQ(FloatToBf16(FloatFromBits(0xff812345)), 0xffc1);  // NaN: upper payload kept, quiet bit
  EXPECT_EQ(Bf16ToFloat(0x4049), FloatFromBits(0x40490000));
}

}  // namespace
}  // namespace fibquant
