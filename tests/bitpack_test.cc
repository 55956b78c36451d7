// Bit packing: round trips over every width and small counts, the documented bit order, and the
// rejection of out-of-range indices (pack), wrong lengths and set padding bits (unpack).
#include "core/bitpack.h"

#include <cstdint>
#include <limits>
#include <vector>

#include "core/rng.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

// Bit-by-bit model of the documented layout, independent of the implementation.
std::vector<uint8_t> ModelPack(const std::vector<uint32_t>& idx, uint32_t w) {
  const size_t bits = idx.size() * w;
  std::vector<uint8_t> out((bits + 7) / 8, 0);
  for (size_t i = 0; i < idx.size(); ++i) {
    for (uint32_t b = 0; b < w; ++b) {
      if ((idx[i] >> b) & 1u) {
        const size_t p = i * w + b;
        out[p / 8] |= static_cast<uint8_t>(1u << (p % 8));
      }
    }
  }
  return out;
}

TEST(Bitpack, RoundTripAllWidthsAndCounts) {
  Rng rng(12345);
  for (uint32_t w = 1; w <= 32; ++w) {
    for (size_t count = 0; count < 128; ++count) {
      std::vector<uint32_t> idx(count);
      for (auto& v : idx) {
        const uint64_t r = rng.NextU64();
        v = w == 32 ? static_cast<uint32_t>(r) : static_cast<uint32_t>(r & ((1ull << w) - 1));
      }
      if (count > 0) idx[0] = w == 32 ? 0xffffffffu : (1u << w) - 1;  // all ones at the start
      auto packed = Pack(idx, w);
      ASSERT_TRUE(packed.ok()) << packed.status();
      ASSERT_EQ(packed->size(), (count * w + 7) / 8);
      ASSERT_EQ(*packed, ModelPack(idx, w)) << "w=" << w << " count=" << count;
      auto unpacked = Unpack(*packed, count, w);
      ASSERT_TRUE(unpacked.ok()) << unpacked.status();
      ASSERT_EQ(*unpacked, idx) << "w=" << w << " count=" << count;
    }
  }
}

TEST(Bitpack, Width3Example) {
  const std::vector<uint32_t> idx = {0, 1, 2, 3, 4, 5, 6, 7, 3, 1};
  auto packed = Pack(idx, 3);
  ASSERT_TRUE(packed.ok());
  // 30 bits -> 4 bytes. Stream bits LSB-first: 000 100 010 110 001 101 011 111 110 100.
  EXPECT_EQ(*packed, (std::vector<uint8_t>{0x88, 0xC6, 0xFA, 0x0B}));
  auto unpacked = Unpack(*packed, idx.size(), 3);
  ASSERT_TRUE(unpacked.ok());
  EXPECT_EQ(*unpacked, idx);
}

TEST(Bitpack, AnySetPaddingBitIsDataLoss) {
  for (uint32_t w = 1; w <= 32; ++w) {
    for (size_t count = 1; count < 20; ++count) {
      const size_t bits = count * w;
      if (bits % 8 == 0) continue;
      std::vector<uint32_t> idx(count, 0);
      auto packed = Pack(idx, w);
      ASSERT_TRUE(packed.ok());
      for (size_t p = bits; p < packed->size() * 8; ++p) {
        std::vector<uint8_t> bad = *packed;
        bad[p / 8] |= static_cast<uint8_t>(1u << (p % 8));
        auto r = Unpack(bad, count, w);
        EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << "w=" << w << " bit " << p;
      }
    }
  }
}

TEST(Bitpack, IndexTooWideIsInvalidArgument) {
  for (uint32_t w = 1; w < 32; ++w) {
    std::vector<uint32_t> idx = {0, (1u << w) - 1, 1u << w};
    auto r = Pack(idx, w);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << w;
    EXPECT_NE(r.status().message().find("index[2]"), std::string_view::npos) << r.status();
  }
}

TEST(Bitpack, BadWidthIsInvalidArgument) {
  EXPECT_EQ(Pack({1}, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Pack({1}, 33).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Unpack({}, 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PackedBytes(1, 33).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Bitpack, WrongLengthIsDataLoss) {
  auto packed = Pack({1, 2, 3}, 5);  // 15 bits -> 2 bytes
  ASSERT_TRUE(packed.ok());
  std::vector<uint8_t> longer = *packed;
  longer.push_back(0);
  EXPECT_EQ(Unpack(longer, 3, 5).status().code(), absl::StatusCode::kDataLoss);
  std::vector<uint8_t> shorter(packed->begin(), packed->begin() + 1);
  EXPECT_EQ(Unpack(shorter, 3, 5).status().code(), absl::StatusCode::kDataLoss);
  // A huge count is rejected by the length check before anything is allocated.
  EXPECT_EQ(Unpack(*packed, size_t{1} << 40, 5).status().code(), absl::StatusCode::kDataLoss);
}

TEST(Bitpack, SizeOverflowIsResourceExhausted) {
  EXPECT_EQ(PackedBytes(std::numeric_limits<size_t>::max() / 2, 3).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(Unpack({}, std::numeric_limits<size_t>::max() / 4, 8).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(Bitpack, IntoChecksBufferSizes) {
  std::vector<uint8_t> out(3);
  EXPECT_EQ(PackInto(std::vector<uint32_t>{1, 2}, 8, absl::MakeSpan(out)).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint32_t> vals(1);
  const std::vector<uint8_t> bytes = {1, 2};
  EXPECT_EQ(UnpackInto(bytes, 2, 8, absl::MakeSpan(vals)).code(), absl::StatusCode::kInvalidArgument);
}

TEST(Bitpack, PackOverwritesStaleBytes) {
  std::vector<uint8_t> out(2, 0xff);
  ASSERT_TRUE(PackInto(std::vector<uint32_t>{1, 0, 1}, 3, absl::MakeSpan(out)).ok());
  EXPECT_EQ(out, (std::vector<uint8_t>{0x41, 0x00}));
}

}  // namespace
}  // namespace fibquant
