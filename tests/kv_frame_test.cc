// Page frame structure with synthetic code bytes: round trip, and one named test per corrupted
// field (each corruption re-seals the checksum so the specific check, not the checksum, fires).
#include <bit>
#include <cstring>
#include <string>
#include <vector>

#include "core/kv_frame.h"
#include "gtest/gtest.h"

namespace fibquant {
namespace {

using absl::StatusCode;

KvFrameHeader Header() {
  KvFrameHeader h;
  h.version = 1;  // the version-1 layout stays pinned by GoldenChecksum
  h.raw_dtype = DType::kF32;
  h.axis_policy = KvAxisPolicy::kPerToken;
  for (int i = 0; i < 32; ++i) h.profile_digest[i] = static_cast<uint8_t>(i * 7);
  h.coords = {1, 2, 3, 8, 4};
  h.vector_len = 3;
  h.code_bytes = 5;
  h.counts.vector_count = 4;
  h.counts.coded = 2;
  h.counts.raw_protected = 1;
  h.counts.raw_quality_fallback = 1;
  return h;
}

// Vectors 0 and 2 raw.
std::string Frame() {
  const KvFrameHeader h = Header();
  std::vector<uint8_t> bitmap = {0x05};
  std::vector<uint8_t> codes(10);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>(0xA0 + i);
  std::vector<uint8_t> raw(2 * 3 * 4);
  for (size_t i = 0; i < raw.size(); ++i) raw[i] = static_cast<uint8_t>(i);
  auto f = BuildKvFrame(h, bitmap, codes, raw);
  EXPECT_TRUE(f.ok()) << f.status();
  return *f;
}

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

void Reseal(std::string* f) {
  const uint64_t c = KvFrameChecksum(Bytes(*f).subspan(0, f->size() - 8));
  for (int i = 0; i < 8; ++i) (*f)[f->size() - 8 + i] = static_cast<char>((c >> (8 * i)) & 0xFF);
}

void PutU32(std::string* f, size_t off, uint32_t v) {
  for (int i = 0; i < 4; ++i) (*f)[off + i] = static_cast<char>((v >> (8 * i)) & 0xFF);
}

absl::Status ParseStatus(const std::string& f) { return ParseKvFrame(Bytes(f)).status(); }

TEST(KvFrame, LayoutAndRoundTrip) {
  const std::string f = Frame();
  EXPECT_EQ(f.size(), kKvFrameHeaderBytes + 1 + 10 + 24 + kKvFrameChecksumBytes);
  EXPECT_EQ(f.substr(0, 4), "FQKV");
  auto v = ParseKvFrame(Bytes(f));
  ASSERT_TRUE(v.ok()) << v.status();
  const KvFrameHeader& h = v->header;
  EXPECT_EQ(h.coords, Header().coords);
  EXPECT_EQ(h.counts, Header().counts);
  EXPECT_EQ(h.profile_digest, Header().profile_digest);
  EXPECT_EQ(h.vector_len, 3u);
  EXPECT_EQ(h.code_bytes, 5u);
  EXPECT_TRUE(v->IsRaw(0));
  EXPECT_FALSE(v->IsRaw(1));
  EXPECT_TRUE(v->IsRaw(2));
  EXPECT_EQ(v->RawRank(0), 0u);
  EXPECT_EQ(v->RawRank(1), 1u);
  EXPECT_EQ(v->RawRank(3), 2u);
  EXPECT_EQ(v->codes[0], 0xA0);
  EXPECT_EQ(v->raw.size(), 24u);
  auto ih = InspectFrame(Bytes(f));
  ASSERT_TRUE(ih.ok());
  EXPECT_EQ(ih->counts.coded, 2u);
  EXPECT_EQ(*KvFrameSize(Header()), f.size());
}

TEST(KvFrame, GoldenChecksum) {
  // Pins the byte layout of docs/format/kv.md section 5 (any field moved changes the XXH3-64).
  auto v = ParseKvFrame(Bytes(Frame()));
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->checksum, 0x99d763ef171d1c1cull) << std::hex << v->checksum;
}

TEST(KvFrame, RawRankOverManyWords) {
  KvFrameHeader h = Header();
  h.coords.token_count = 200;
  h.counts = {};
  h.counts.vector_count = 200;
  std::vector<uint8_t> bitmap(25, 0);
  uint32_t raw = 0;
  for (uint32_t i = 0; i < 200; ++i) {
    if (i % 3 == 0) {
      bitmap[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
      ++raw;
    }
  }
  h.counts.raw_policy = raw;
  h.counts.coded = 200 - raw;
  std::vector<uint8_t> codes(size_t{h.counts.coded} * 5), rawb(size_t{raw} * 3 * 4);
  auto f = BuildKvFrame(h, bitmap, codes, rawb);
  ASSERT_TRUE(f.ok());
  auto v = ParseKvFrame(Bytes(*f));
  ASSERT_TRUE(v.ok()) << v.status();
  for (uint32_t i = 0; i < 200; ++i) EXPECT_EQ(v->RawRank(i), (i + 2) / 3) << i;
}

TEST(KvFrame, BuildRejectsMismatchedSections) {
  std::vector<uint8_t> bitmap = {0x05}, codes(9), raw(24);
  EXPECT_EQ(BuildKvFrame(Header(), bitmap, codes, raw).status().code(), StatusCode::kInvalidArgument);
}

TEST(KvFrameCorrupt, Magic) {
  std::string f = Frame();
  f[0] = 'X';
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("magic"), std::string::npos);
}

TEST(KvFrameCorrupt, Version) {
  std::string f = Frame();
  f[4] = 3;
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("version"), std::string::npos);
}

TEST(KvFrameCorrupt, CenteredFlagInVersion1Frame) {
  std::string f = Frame();
  f[6] = 0x02;
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("version-1"), std::string::npos) << ParseStatus(f);
}

// Version 2, flag bit 1: a mean section of vector_len f32 after the raw section.
std::string CenteredFrame() {
  KvFrameHeader h = Header();
  h.version = 2;
  h.flags = kKvFrameFlagCentered;
  std::vector<uint8_t> bitmap = {0x05};
  std::vector<uint8_t> codes(10, 0xA5);
  std::vector<uint8_t> raw(2 * 3 * 4, 0x11);
  std::vector<uint8_t> mean;
  for (float m : {1.5f, -2.0f, 0.25f}) {
    const uint32_t u = std::bit_cast<uint32_t>(m);
    for (int b = 0; b < 4; ++b) mean.push_back(static_cast<uint8_t>(u >> (8 * b)));
  }
  auto f = BuildKvFrame(h, bitmap, codes, raw, mean);
  EXPECT_TRUE(f.ok()) << f.status();
  return *f;
}

TEST(KvFrame, CenteredVersion2RoundTripAndGolden) {
  const std::string f = CenteredFrame();
  EXPECT_EQ(f.size(), kKvFrameHeaderBytes + 1 + 10 + 24 + 12 + kKvFrameChecksumBytes);
  auto v = ParseKvFrame(Bytes(f));
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->header.version, 2);
  EXPECT_EQ(v->header.flags, kKvFrameFlagCentered);
  ASSERT_EQ(v->mean.size(), 12u);
  EXPECT_EQ(v->MeanAt(0), 1.5f);
  EXPECT_EQ(v->MeanAt(1), -2.0f);
  EXPECT_EQ(v->MeanAt(2), 0.25f);
  EXPECT_EQ(v->checksum, 0x3fdc93a9dc4a5967ull) << std::hex << v->checksum;
}

TEST(KvFrameCorrupt, CenteredMeanNotFinite) {
  std::string f = CenteredFrame();
  const size_t off = f.size() - kKvFrameChecksumBytes - 8;  // mean[1]
  PutU32(&f, off, 0x7fc00000u);                                 // NaN
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("mean section"), std::string::npos) << ParseStatus(f);
}

TEST(KvFrameCorrupt, CenteredMeanSectionMissing) {
  std::string f = CenteredFrame();
  f.erase(f.size() - kKvFrameChecksumBytes - 12, 12);
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("truncated"), std::string::npos) << ParseStatus(f);
}

TEST(KvFrame, BuildRejectsCenteredVersion1) {
  KvFrameHeader h = Header();
  h.flags = kKvFrameFlagCentered;
  std::vector<uint8_t> bitmap = {0x05}, codes(10), raw(24), mean(12);
  EXPECT_EQ(BuildKvFrame(h, bitmap, codes, raw, mean).status().code(), StatusCode::kInvalidArgument);
}

TEST(KvFrameCorrupt, ReservedFlags) {
  std::string f = Frame();
  f[6] = static_cast<char>(0x80);
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("flags"), std::string::npos);
}

TEST(KvFrameCorrupt, RawDtype) {
  std::string f = Frame();
  f[8] = 3;
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, AxisPolicy) {
  std::string f = Frame();
  f[9] = 4;
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, ReservedBytes) {
  std::string f = Frame();
  f[11] = 1;
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, CodedCount) {
  std::string f = Frame();
  PutU32(&f, 76, 3);  // coded 3 + raw 2 != 4
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("counts"), std::string::npos);
}

// Each raw count on its own: one more vector than the bitmap and sections hold.
void ExpectCountRejected(size_t off) {
  std::string f = Frame();
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<uint8_t>(f[off + i])} << (8 * i);
  PutU32(&f, off, v + 1);
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss) << "offset " << off;
}
TEST(KvFrameCorrupt, RawProtectedCount) { ExpectCountRejected(80); }
TEST(KvFrameCorrupt, RawPolicyCount) { ExpectCountRejected(84); }
TEST(KvFrameCorrupt, RawEncodeFallbackCount) { ExpectCountRejected(88); }
TEST(KvFrameCorrupt, RawQualityFallbackCount) { ExpectCountRejected(92); }

TEST(KvFrameCorrupt, RawCountsMoved) {
  // Totals still add up but the reasons shift: sizes agree, so only the content checks remain.
  std::string f = Frame();
  PutU32(&f, 80, 0);  // raw_protected 1 -> 0
  PutU32(&f, 84, 1);  // raw_policy 0 -> 1
  Reseal(&f);
  EXPECT_TRUE(ParseStatus(f).ok());  // structurally fine; KvCodec::DecodeFrame checks the reasons
}

TEST(KvFrameCorrupt, VectorCount) {
  std::string f = Frame();
  PutU32(&f, 64, 5);  // vector_count 5: counts no longer sum
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, VectorCountVsTokenCount) {
  std::string f = Frame();
  PutU32(&f, 60, 5);  // token_count 5 != vector_count 4 on the token axis
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("token_count"), std::string::npos);
}

TEST(KvFrameCorrupt, ChannelAxisVectorLen) {
  std::string f = Frame();
  f[6] = 0x01;  // channel axis: vector_len 3 must equal token_count 4
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, VectorLenChangesSize) {
  std::string f = Frame();
  PutU32(&f, 68, 4);
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);  // header now requires more bytes
  EXPECT_NE(ParseStatus(f).message().find("truncated"), std::string::npos);
}

TEST(KvFrameCorrupt, CodeBytesChangesSize) {
  std::string f = Frame();
  PutU32(&f, 72, 4);
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("trailing"), std::string::npos);
}

TEST(KvFrameCorrupt, Truncated) {
  std::string f = Frame();
  for (size_t cut : {size_t{1}, size_t{9}, f.size() - 50, f.size() - 1}) {
    std::string g = f.substr(0, f.size() - cut);
    EXPECT_EQ(ParseStatus(g).code(), StatusCode::kDataLoss) << cut;
  }
  EXPECT_EQ(ParseStatus("").code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, TrailingBytes) {
  std::string f = Frame() + "x";
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, Checksum) {
  std::string f = Frame();
  f[kKvFrameHeaderBytes + 3] ^= 0x10;  // a code byte, not re-sealed
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("checksum"), std::string::npos);
  std::string g = Frame();
  g[g.size() - 1] ^= 1;  // the checksum itself
  EXPECT_EQ(ParseStatus(g).code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, DigestByteCoveredByChecksum) {
  std::string f = Frame();
  f[20] ^= 0xFF;
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, RawMapPopcount) {
  std::string f = Frame();
  f[kKvFrameHeaderBytes] = 0x07;  // three raw vectors marked, counts say two
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("bitmap"), std::string::npos);
}

TEST(KvFrameCorrupt, RawMapPaddingBits) {
  std::string f = Frame();
  f[kKvFrameHeaderBytes] = 0x41;  // bit 6 is past vector_count 4
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("padding"), std::string::npos);
}

TEST(KvFrameCorrupt, TokenCountZero) {
  KvFrameHeader h = Header();
  h.coords.token_count = 0;
  h.counts = {};
  std::string f = *BuildKvFrame(h, {}, {}, {});
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
}

TEST(KvFrameCorrupt, TokenSpanOverflow) {
  std::string f = Frame();
  PutU32(&f, 56, 0xFFFFFFFEu);  // token_start + 4 overflows u32
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
}

TEST(KvFrameLimits, CheckedBeforeAllocation) {
  // A header claiming more than the limits inside a frame of sane length is corrupt: DataLoss, with
  // nothing allocated from the claimed counts. Only a frame really longer than max_frame_bytes is a
  // resource limit.
  std::string f = Frame();
  PutU32(&f, 64, 0xFFFFFFFFu);  // vector_count
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  EXPECT_NE(ParseStatus(f).message().find("limit"), std::string::npos);
  f = Frame();
  PutU32(&f, 68, 1u << 20);  // vector_len
  Reseal(&f);
  EXPECT_EQ(ParseStatus(f).code(), StatusCode::kDataLoss);
  KvFrameHeader big = Header();
  big.counts.vector_count = (1u << 20) + 1;
  EXPECT_EQ(KvFrameSize(big).status().code(), StatusCode::kResourceExhausted);
  KvFrameLimits small;
  small.max_frame_bytes = 64;
  EXPECT_EQ(ParseKvFrame(Bytes(Frame()), small).status().code(), StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace fibquant
