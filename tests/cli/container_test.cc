// Container tests (client/cli/container.h, docs/format/container.md): a round trip, then one
// corruption per field with the exact status code, the checksum re-computed after the edit so the
// check of that very field is what fires (plus one test where only the checksum catches it).
#include "client/cli/container.h"

#include <atomic>
#include <cstdlib>
#include <new>
#include <random>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

// The largest single operator-new request while g_track_alloc is set (for the allocation
// regression test below). Not under ASan/TSan, which bring their own operator new.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define FQ_TEST_NO_NEW_REPLACEMENT 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define FQ_TEST_NO_NEW_REPLACEMENT 1
#endif
namespace {
std::atomic<bool> g_track_alloc{false};
std::atomic<size_t> g_max_alloc{0};
}  // namespace
#ifndef FQ_TEST_NO_NEW_REPLACEMENT
[[gnu::noinline]] void* operator new(size_t n) {
  if (g_track_alloc.load(std::memory_order_relaxed) && n > g_max_alloc.load(std::memory_order_relaxed)) {
    g_max_alloc.store(n, std::memory_order_relaxed);
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, size_t) noexcept { std::free(p); }
#endif

namespace fibquant::cli {
namespace {

using ::testing::HasSubstr;

Container Sample() {
  Container c;
  c.metadata_json = R"({"schema":"fq_cli_container_meta_v1","pages":3})";
  c.frames = {std::string("FQKV\x01\x00frame-zero", 16), "frame-one", std::string(1000, 'x')};
  c.receipt_json = R"({"receiptId":"rcpt-1-1","operation":"compress"})";
  return c;
}

void PutLe(std::string* s, size_t at, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) (*s)[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

// Re-seals a container after an edit: recomputes the trailing checksum.
std::string Reseal(std::string s) {
  PutLe(&s, s.size() - 8, ContainerChecksum(std::string_view(s).substr(0, s.size() - 8)), 8);
  return s;
}

class ContainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto e = EncodeContainer(Sample());
    ASSERT_TRUE(e.ok()) << e.status();
    bytes_ = *e;
  }
  // Offsets of the sample's fields.
  size_t meta_len_at() const { return 8; }
  size_t frame_count_at() const { return 12; }
  size_t first_frame_len_at() const { return 16 + Sample().metadata_json.size(); }
  size_t receipt_len_at() const {
    size_t at = first_frame_len_at();
    for (const auto& f : Sample().frames) at += 4 + f.size();
    return at;
  }
  std::string bytes_;
};

TEST_F(ContainerTest, RoundTrip) {
  auto c = DecodeContainer(bytes_);
  ASSERT_TRUE(c.ok()) << c.status();
  const Container want = Sample();
  EXPECT_EQ(c->metadata_json, want.metadata_json);
  EXPECT_EQ(c->frames, want.frames);
  EXPECT_EQ(c->receipt_json, want.receipt_json);
  EXPECT_EQ(bytes_.substr(0, 4), "FQKC");
  EXPECT_EQ(bytes_.size(), 16 + want.metadata_json.size() + 3 * 4 + 16 + 9 + 1000 + 4 + want.receipt_json.size() + 8);
  Container empty;
  empty.metadata_json = "{}";
  empty.receipt_json = "{}";
  auto e = EncodeContainer(empty);
  ASSERT_TRUE(e.ok());
  auto back = DecodeContainer(*e);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->frames.empty());
}

TEST_F(ContainerTest, Magic) {
  std::string s = bytes_;
  s[0] = 'X';
  auto r = DecodeContainer(Reseal(s));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("magic"));
}

TEST_F(ContainerTest, Version) {
  std::string s = bytes_;
  PutLe(&s, 4, 2, 2);
  auto r = DecodeContainer(Reseal(s));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(r.status().message(), HasSubstr("version 2"));
}

TEST_F(ContainerTest, Flags) {
  std::string s = bytes_;
  PutLe(&s, 6, 1, 2);
  auto r = DecodeContainer(Reseal(s));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("flags"));
}

TEST_F(ContainerTest, MetadataLength) {
  std::string s = bytes_;
  PutLe(&s, meta_len_at(), 0xFFFFFFFF, 4);
  EXPECT_EQ(DecodeContainer(Reseal(s)).status().code(), absl::StatusCode::kResourceExhausted);
  PutLe(&s, meta_len_at(), 1000000, 4);  // under the limit, past the end
  auto r = DecodeContainer(Reseal(s));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("metadata_len"));
}

TEST_F(ContainerTest, FrameCount) {
  std::string s = bytes_;
  PutLe(&s, frame_count_at(), 0xFFFFFFFF, 4);
  EXPECT_EQ(DecodeContainer(Reseal(s)).status().code(), absl::StatusCode::kResourceExhausted);
  PutLe(&s, frame_count_at(), 1000, 4);  // more frames than the bytes hold
  EXPECT_EQ(DecodeContainer(Reseal(s)).status().code(), absl::StatusCode::kDataLoss);
  PutLe(&s, frame_count_at(), 2, 4);  // fewer: the third frame is read as the receipt length
  EXPECT_EQ(DecodeContainer(Reseal(s)).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(ContainerTest, FrameLength) {
  std::string s = bytes_;
  PutLe(&s, first_frame_len_at(), 0xFFFFFFFF, 4);
  auto big = DecodeContainer(Reseal(s));
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(big.status().message(), HasSubstr("frame 0"));
  PutLe(&s, first_frame_len_at(), 100000, 4);
  auto past = DecodeContainer(Reseal(s));
  EXPECT_EQ(past.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(past.status().message(), HasSubstr("frame 0"));
}

TEST_F(ContainerTest, ReceiptLength) {
  std::string s = bytes_;
  PutLe(&s, receipt_len_at(), 0xFFFFFFFF, 4);
  EXPECT_EQ(DecodeContainer(Reseal(s)).status().code(), absl::StatusCode::kResourceExhausted);
  PutLe(&s, receipt_len_at(), Sample().receipt_json.size() + 1, 4);
  auto r = DecodeContainer(Reseal(s));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("receipt_len"));
  PutLe(&s, receipt_len_at(), Sample().receipt_json.size() - 1, 4);  // leaves a stray byte
  auto trailing = DecodeContainer(Reseal(s));
  EXPECT_EQ(trailing.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(trailing.status().message(), HasSubstr("unexpected bytes"));
}

TEST_F(ContainerTest, MetadataAndReceiptMustBeJsonObjects) {
  std::string s = bytes_;
  s[16] = '[';
  auto meta = DecodeContainer(Reseal(s));
  EXPECT_EQ(meta.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(meta.status().message(), HasSubstr("metadata"));
  s = bytes_;
  s[receipt_len_at() + 4] = '?';
  auto receipt = DecodeContainer(Reseal(s));
  EXPECT_EQ(receipt.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(receipt.status().message(), HasSubstr("receipt"));
}

TEST_F(ContainerTest, Checksum) {
  std::string s = bytes_;
  s[first_frame_len_at() + 4 + 7] ^= 0x20;  // a payload byte, not re-sealed
  auto r = DecodeContainer(s);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("checksum"));
  s = bytes_;
  s.back() ^= 1;  // the checksum itself
  EXPECT_EQ(DecodeContainer(s).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(ContainerTest, TruncationAndLimits) {
  for (size_t n : {size_t{0}, size_t{10}, size_t{27}, bytes_.size() - 1}) {
    EXPECT_EQ(DecodeContainer(bytes_.substr(0, n)).status().code(), absl::StatusCode::kDataLoss) << n;
  }
  EXPECT_EQ(DecodeContainer(bytes_ + "x").status().code(), absl::StatusCode::kDataLoss);
  ContainerLimits small;
  small.max_frame_bytes = 999;
  EXPECT_EQ(DecodeContainer(bytes_, small).status().code(), absl::StatusCode::kResourceExhausted);
  small = ContainerLimits{};
  small.max_frames = 2;
  EXPECT_EQ(DecodeContainer(bytes_, small).status().code(), absl::StatusCode::kResourceExhausted);
  small = ContainerLimits{};
  small.max_container_bytes = 100;
  EXPECT_EQ(DecodeContainer(bytes_, small).status().code(), absl::StatusCode::kResourceExhausted);
  Container too_big = Sample();
  too_big.metadata_json = std::string((1u << 20) + 1, ' ');
  EXPECT_EQ(EncodeContainer(too_big).status().code(), absl::StatusCode::kInvalidArgument);
}

// Found by container_fuzz: a 32-byte file declaring 2^22 frames (under max_frames) whose first
// frame is empty made the reader reserve offsets for all 2^22 frames (64 MiB) before the second
// length field turned out to be missing. The reservation is now bounded by the bytes present.
TEST(ContainerRegression, FrameCountDoesNotDriveAllocation) {
  // preamble (metadata_len 2, frame_count 0x400000), "{}", frame 0 length 0, 2 bytes, checksum 0.
  const std::string in = std::string("FQKC\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x40\x00", 16) + "{}" +
                         std::string(14, '\0');
  g_max_alloc = 0;
  g_track_alloc = true;
  auto r = DecodeContainer(in);
  g_track_alloc = false;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(r.status().message(), "container truncated in the length of frame 1 of 4194304");
#ifndef FQ_TEST_NO_NEW_REPLACEMENT
  EXPECT_LE(g_max_alloc.load(), size_t{4096}) << "largest single allocation while decoding";
#endif
}

// Random corruption: every mutated container is either refused with one of the documented codes
// or (when the edit hit nothing checked, which the checksum makes impossible) decoded.
TEST_F(ContainerTest, RandomCorruptionNeverCrashes) {
  std::mt19937_64 rng(20261126);
  for (int trial = 0; trial < 3000; ++trial) {
    std::string s = bytes_;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) s[rng() % s.size()] = static_cast<char>(rng());
    if (trial % 3 == 0) s = Reseal(s);  // so the structural checks, not the checksum, must catch it
    if (trial % 7 == 0) s.resize(rng() % s.size());
    auto r = DecodeContainer(s);
    if (r.ok()) continue;
    const absl::StatusCode c = r.status().code();
    EXPECT_TRUE(c == absl::StatusCode::kDataLoss || c == absl::StatusCode::kResourceExhausted ||
                c == absl::StatusCode::kUnimplemented)
        << r.status();
  }
}

}  // namespace
}  // namespace fibquant::cli
