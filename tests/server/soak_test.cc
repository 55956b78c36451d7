// Soak test (issue 7), bounded in count and time, loopback only: the real fibquant-server binary as
// a child on 127.0.0.1:0, 4 profiles mixing roles (key, value), dtypes (f32, f16, bf16), axis
// policies (per_token, per_channel), codebook sizes (k=2 N=16/256, k=4 N=256), a partial last page,
// protected tokens and a quality budget; 8 concurrent streams (2 per profile, on 2 connections), each
// sending rounds of CompressPages then DecompressPages of everything it got back. Checked for every
// page:
//   * no RPC error; every response in order (sequence, echoed client_sequence, coordinates), none
//     lost or duplicated; a receipt per stream counting exactly the pages sent;
//   * the frame equals, byte for byte, the frame the local core codec (KvCodec built here from the
//     same spec; its profile digest must equal the server's) produces for the same input on the
//     path the server uses (CodecPath::kFast), and its frame_digest is the SHA-256 of the frame;
//   * DecompressPages returns exactly the bytes the local DecodeFrame gives for that frame
//     (native dtype or f32 output); the reference path (CodecPath::kReference) decodes the frame
//     to the same values within 1e-5 of the vector norm; how often a reference-path encode of the input
//     gives the very same frame is reported (the paths may differ on near-ties, docs/FORMAT.md);
//   * RSS (VmRSS of the child) sampled through the run: growth after warm-up (the first 20% of
//     the pages) stays under kMaxRssGrowthKib. Samples are printed and recorded as properties.
// Sizes: FQ_SOAK_PAGES_PER_STREAM (default 1500; 500 under ASan), FQ_SOAK_MAX_SECONDS (default 240): when the time
// budget ends the streams stop sending, everything already sent is still verified, and the number of
// pages that ran is reported. No assertion on speed.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "core/digest.h"
#include "core/half.h"
#include "core/kv_codec.h"
#include "core/kv_profile.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::fibquant::v1;
using ::fibquant::server::testing::ServerProcess;
using ::fibquant::server::testing::TempDir;
using Clock = std::chrono::steady_clock;

constexpr int kStreams = 8;
// Under AddressSanitizer (the CI sanitizer build) the server keeps freed memory in ASan's quarantine
// (256 MiB by default) and RSS climbs until it is full, so flat RSS is not a property of that build:
// it reports RSS but does not bound it (LeakSanitizer checks the server's leaks at exit instead),
// and it sends fewer pages by default (each costs ~5x the Release time).
#if defined(__SANITIZE_ADDRESS__)
#define FQ_SOAK_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FQ_SOAK_UNDER_ASAN 1
#endif
#endif
#ifdef FQ_SOAK_UNDER_ASAN
constexpr bool kRssIsMeaningful = false;
constexpr uint64_t kDefaultPagesPerStream = 500;
#else
constexpr bool kRssIsMeaningful = true;
constexpr uint64_t kDefaultPagesPerStream = 1500;
#endif
constexpr double kDefaultMaxSeconds = 240;
constexpr uint64_t kPagesPerRound = 250;  // pages per CompressPages / DecompressPages stream
constexpr uint64_t kMaxRssGrowthKib = 32 * 1024;  // generous: a leak of ~1 KiB/page still trips it
constexpr auto kStreamDeadline = std::chrono::seconds(300);  // bounds a hang, not a speed check
constexpr size_t kMaxMessagesPerStream = 5;

uint64_t EnvU64(const char* name, uint64_t def) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return def;
  return std::strtoull(v, nullptr, 10);
}
double EnvDouble(const char* name, double def) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return def;
  return std::strtod(v, nullptr);
}

// One profile of the soak: its spec, dtype, and (optionally) a real fixture feeding its pages.
struct Def {
  std::string id;
  std::string role;
  DType dtype;
  v1::DType proto_dtype;
  std::string axis;
  uint32_t layers, kv_heads, tokens, head_dim, tpp, block_dim, codebook_size;
  std::string extra;    // extra spec members (protected, budget), with a leading comma
  std::string fixture;  // tests/data file [64 tokens, 4 heads, head_dim] f32; "" = synthetic only

  std::string Spec() const {
    return absl::StrCat(
        R"({"profile_id":")", id, R"(","shape":{"role":")", role,
        R"(","attention_kind":"mha","batch":1,"layers":)", layers, R"(,"kv_heads":)", kv_heads,
        R"(,"query_heads":)", kv_heads, R"(,"tokens":)", tokens, R"(,"head_dim":)", head_dim,
        R"(,"dtype":")", std::string(DTypeName(dtype)), R"(","rope_state":")",
        role == "key" ? "post_rope" : "not_applicable", R"("},"axis_policy":")", axis,
        R"(","tokens_per_page":)", tpp, R"(,"fibquant":{"block_dim":)", block_dim,
        R"(,"codebook_size":)", codebook_size,
        R"(,"seed":)", 7000 + codebook_size + block_dim + head_dim,
        R"(,"training_samples":2000,"lloyd_restarts":1,"lloyd_iterations":8})", extra, "}");
  }
  uint32_t pages_per_seq() const { return (tokens + tpp - 1) / tpp; }
  uint64_t grid() const { return uint64_t{layers} * kv_heads * pages_per_seq(); }
};

std::vector<Def> Defs() {
  return {
      // Keys, f32, per token, d=128, k=4 N=256; real L1 keys (with per-round jitter) on one stream.
      {"soak.key.f32.token.d128.k4n256", "key", DType::kF32, v1::DTYPE_F32, "per_token", 1, 4, 64, 128,
       16, 4, 256, "", "L1_k.f32"},
      // Values, f16, per channel (vectors of 32 tokens), d=64, k=2 N=16; real L0 values on one stream.
      {"soak.value.f16.channel.d64.k2n16", "value", DType::kF16, v1::DTYPE_F16, "per_channel", 1, 4, 64,
       64, 32, 2, 16, "", "L0_v.f32"},
      // Keys, bf16, per channel, d=64, k=2 N=256; 72 tokens: the last page of 8 tokens is stored raw.
      {"soak.key.bf16.channel.d64.k2n256", "key", DType::kBF16, v1::DTYPE_BF16, "per_channel", 2, 2, 72,
       64, 16, 2, 256, "", ""},
      // Values, f16, per token, d=128, k=2 N=256; 100 tokens (last page 4 tokens), first 4 tokens
      // protected, a value-aggregation budget with keep_raw fallback (metrics always computed).
      {"soak.value.f16.token.d128.k2n256", "value", DType::kF16, v1::DTYPE_F16, "per_token", 2, 2, 100,
       128, 16, 2, 256,
       R"(,"protected":{"first_tokens_raw":4},"quality_budget":{"max_value_aggregation_mse":0.05,"fallback_on_violation":"keep_raw"})",
       ""},
  };
}

std::vector<float> LoadFixture(const std::string& name) {
  std::ifstream in(fs::path(FQ_TEST_DATA_DIR) / name, std::ios::binary);
  std::vector<float> v;
  if (!in) return v;
  in.seekg(0, std::ios::end);
  const size_t n = static_cast<size_t>(in.tellg()) / sizeof(float);
  in.seekg(0);
  v.resize(n);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(float)));
  return v;
}

// A stream's page `index`: coordinates walk the page grid (offset per stream), data is a pure
// function of (stream, index) so the checker can regenerate it instead of keeping it.
struct PageGen {
  const Def* def = nullptr;
  const std::vector<float>* fixture = nullptr;  // null: synthetic
  int stream = 0;

  KvPageCoords Coords(uint64_t index) const {
    const uint64_t g = (index + static_cast<uint64_t>(stream) * 7) % def->grid();
    const uint32_t pps = def->pages_per_seq();
    const uint32_t p = static_cast<uint32_t>(g % pps);
    const uint32_t h = static_cast<uint32_t>((g / pps) % def->kv_heads);
    const uint32_t l = static_cast<uint32_t>(g / (uint64_t{pps} * def->kv_heads));
    const uint32_t start = p * def->tpp;
    return KvPageCoords{0, l, h, start, std::min(def->tpp, def->tokens - start)};
  }

  std::string Data(uint64_t index) const {
    const KvPageCoords c = Coords(index);
    const uint32_t d = def->head_dim;
    std::mt19937_64 rng(0x5eedULL * 1000003 + static_cast<uint64_t>(stream) * 0x9E3779B97F4A7C15ull + index);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t n = size_t{c.token_count} * d;
    std::string bytes(n * DTypeSize(def->dtype), '\0');
    auto* out = reinterpret_cast<uint8_t*>(bytes.data());
    const float scale = std::exp2(static_cast<float>(static_cast<int>(rng() % 9) - 4));  // 1/16 .. 16
    for (uint32_t t = 0; t < c.token_count; ++t) {
      for (uint32_t k = 0; k < d; ++k) {
        float v;
        if (fixture != nullptr) {
          // [64 tokens, 4 heads, d]; a 1% multiplicative jitter makes each cycle a new page.
          const size_t src = (size_t{c.token_start + t} % 64) * 4 * d + (c.kv_head % 4) * d + k;
          v = (*fixture)[src] * (1.0f + 0.01f * normal(rng));
        } else {
          // Gaussian with a few outlier channels (as real keys have), scaled per page.
          v = scale * (normal(rng) + (k % 11 == 3 ? 4.0f : 0.0f));
        }
        StoreElement(def->dtype, v, out, size_t{t} * d + k);
      }
    }
    // Now and then a zero token: on a token-axis profile it cannot be encoded (zero norm) and is
    // stored raw (keep_raw fallback).
    if (fixture == nullptr && index % 29 == 3 && c.token_count > 5) {
      std::memset(out + size_t{5} * d * DTypeSize(def->dtype), 0, d * DTypeSize(def->dtype));
    }
    return bytes;
  }
};

// VmRSS of `pid` in KiB (0 if unreadable).
uint64_t RssKib(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::strtoull(line.c_str() + 6, nullptr, 10);
  }
  return 0;
}

struct StreamStats {
  uint64_t pages_sent = 0, pages_compressed = 0, pages_verified = 0;
  uint64_t compress_streams = 0, decompress_streams = 0;
  uint64_t ref_identical_frames = 0, ref_checked = 0;
  uint64_t vectors = 0, coded = 0, raw = 0;
  uint64_t errors = 0;
  bool stopped_by_time = false;  // the time budget ended the stream before all its pages
  std::vector<std::string> messages;
  void Fail(const std::string& m) {
    ++errors;
    if (messages.size() < kMaxMessagesPerStream) messages.push_back(m);
  }
};

bool SameCoords(const v1::PageCoordinates& a, const KvPageCoords& b) {
  return a.batch() == b.batch && a.layer() == b.layer && a.kv_head() == b.kv_head &&
         a.token_start() == b.token_start && a.token_count() == b.token_count;
}

std::string Str(const KvPageCoords& c) {
  return absl::StrCat("(b", c.batch, " l", c.layer, " h", c.kv_head, " t", c.token_start, "+", c.token_count, ")");
}

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

class SoakRunner {
 public:
  SoakRunner(const Def& def, std::shared_ptr<const KvCodec> codec, std::string digest, PageGen gen,
             v1::KvCompressionService::Stub* stub, v1::DType out_dtype, bool restrict_profile,
             bool page_metrics, Clock::time_point deadline, std::atomic<uint64_t>* progress)
      : def_(def), codec_(std::move(codec)), digest_(std::move(digest)), gen_(gen), stub_(stub),
        out_dtype_(out_dtype), restrict_(restrict_profile), page_metrics_(page_metrics),
        deadline_(deadline), progress_(progress) {}

  void Run(uint64_t pages) {
    uint64_t next = 0;
    while (next < pages && Clock::now() < deadline_ && stats.errors == 0) {
      const uint64_t n = std::min(kPagesPerRound, pages - next);
      std::vector<std::string> frames;
      const uint64_t sent = CompressRound(next, n, &frames);
      if (stats.errors != 0) break;
      DecompressRound(next, frames);
      next += sent;
      if (sent < n) break;  // time budget ended mid-round
    }
    stats.stopped_by_time = stats.errors == 0 && next < pages;
  }

  StreamStats stats;

 private:
  uint64_t ClientSeq(uint64_t index) const { return (uint64_t{1} << 40) * (gen_.stream + 1) + index; }
  std::string Where(uint64_t index) const {
    return absl::StrCat("stream ", gen_.stream, " (", def_.id, ") page ", index, " ", Str(gen_.Coords(index)));
  }

  // Sends pages [first, first + n) (fewer if the time budget ends); returns how many were sent.
  uint64_t CompressRound(uint64_t first, uint64_t n, std::vector<std::string>* frames) {
    ++stats.compress_streams;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kStreamDeadline);
    auto stream = stub_->CompressPages(&ctx);
    std::atomic<uint64_t> sent{0};
    std::thread writer([&] {
      v1::CompressPagesRequest h;
      h.mutable_header()->set_profile_digest(digest_);
      h.mutable_header()->set_input_dtype(def_.proto_dtype);
      h.mutable_header()->set_return_page_metrics(page_metrics_);
      h.mutable_header()->set_label(absl::StrCat("soak-", gen_.stream));
      if (stream->Write(h)) {
        for (uint64_t j = 0; j < n && Clock::now() < deadline_; ++j) {
          const KvPageCoords c = gen_.Coords(first + j);
          v1::CompressPagesRequest r;
          v1::RawPage* p = r.mutable_page();
          p->mutable_coordinates()->set_batch(c.batch);
          p->mutable_coordinates()->set_layer(c.layer);
          p->mutable_coordinates()->set_kv_head(c.kv_head);
          p->mutable_coordinates()->set_token_start(c.token_start);
          p->mutable_coordinates()->set_token_count(c.token_count);
          p->set_data(gen_.Data(first + j));
          p->set_client_sequence(ClientSeq(first + j));
          if (!stream->Write(r)) break;
          sent.fetch_add(1);
        }
      }
      stream->WritesDone();
    });
    v1::CompressPagesResponse resp;
    std::optional<v1::Receipt> receipt;
    uint64_t got = 0;
    while (stream->Read(&resp)) {
      if (resp.has_receipt()) {
        if (receipt) stats.Fail(absl::StrCat("stream ", gen_.stream, ": two compress receipts"));
        receipt = resp.receipt();
        continue;
      }
      const v1::CompressedPage& p = resp.page();
      const uint64_t index = first + got;
      if (receipt) stats.Fail(absl::StrCat(Where(index), ": page after the receipt"));
      if (p.sequence() != got || p.client_sequence() != ClientSeq(index)) {
        stats.Fail(absl::StrCat(Where(index), ": got sequence ", p.sequence(), " client_sequence ",
                                p.client_sequence(), ", expected ", got, " / ", ClientSeq(index),
                                " (lost, duplicated or reordered)"));
      }
      if (!SameCoords(p.coordinates(), gen_.Coords(index))) {
        stats.Fail(absl::StrCat(Where(index), ": response coordinates ", p.coordinates().ShortDebugString()));
      }
      if (p.frame_digest() != Sha256Digest(p.frame())) {
        stats.Fail(absl::StrCat(Where(index), ": frame_digest is not the SHA-256 of the frame"));
      }
      if (page_metrics_ && !p.has_metrics()) stats.Fail(absl::StrCat(Where(index), ": metrics missing"));
      frames->push_back(p.frame());
      ++got;
    }
    writer.join();
    const grpc::Status st = stream->Finish();
    stats.pages_sent += sent;
    if (!st.ok()) {
      stats.Fail(absl::StrCat("stream ", gen_.stream, " CompressPages from page ", first, ": ",
                              static_cast<int>(st.error_code()), " ", st.error_message()));
      return sent;
    }
    if (got != sent) {
      stats.Fail(absl::StrCat("stream ", gen_.stream, " CompressPages from page ", first, ": sent ", sent.load(),
                              " pages, got ", got, " back"));
    }
    if (!receipt) {
      stats.Fail(absl::StrCat("stream ", gen_.stream, ": no compress receipt"));
    } else if (receipt->pages() != sent || receipt->profile_digest() != digest_ ||
               receipt->operation() != "compress") {
      stats.Fail(absl::StrCat("stream ", gen_.stream, ": compress receipt ", receipt->operation(), " ",
                              receipt->pages(), " pages of ", receipt->profile_digest()));
    }
    stats.pages_compressed += got;
    return sent;
  }

  // Decompresses `frames` (pages first, first + 1, ...) and checks every page against the core.
  void DecompressRound(uint64_t first, const std::vector<std::string>& frames) {
    ++stats.decompress_streams;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kStreamDeadline);
    auto stream = stub_->DecompressPages(&ctx);
    std::thread writer([&] {
      v1::DecompressPagesRequest h;
      h.mutable_header()->set_output_dtype(out_dtype_);
      if (restrict_) h.mutable_header()->set_profile_digest(digest_);
      if (stream->Write(h)) {
        for (size_t j = 0; j < frames.size(); ++j) {
          v1::DecompressPagesRequest r;
          r.mutable_frame()->set_frame(frames[j]);
          r.mutable_frame()->set_client_sequence(ClientSeq(first + j) + (uint64_t{1} << 39));
          if (!stream->Write(r)) break;
        }
      }
      stream->WritesDone();
    });
    v1::DecompressPagesResponse resp;
    std::optional<v1::Receipt> receipt;
    uint64_t got = 0;
    while (stream->Read(&resp)) {
      if (resp.has_receipt()) {
        receipt = resp.receipt();
        continue;
      }
      const v1::DecodedPage& p = resp.page();
      const uint64_t index = first + got;
      if (got >= frames.size()) {
        stats.Fail(absl::StrCat(Where(index), ": more decoded pages than frames sent"));
        break;
      }
      if (p.sequence() != got || p.client_sequence() != ClientSeq(index) + (uint64_t{1} << 39)) {
        stats.Fail(absl::StrCat(Where(index), ": decoded page has sequence ", p.sequence(), " client_sequence ",
                                p.client_sequence(), " (lost, duplicated or reordered)"));
      }
      if (p.profile_digest() != digest_ || !SameCoords(p.coordinates(), gen_.Coords(index))) {
        stats.Fail(absl::StrCat(Where(index), ": decoded page of ", p.profile_digest(), " at ",
                                p.coordinates().ShortDebugString()));
      }
      Verify(index, frames[got], p.data());
      ++got;
      progress_->fetch_add(1);
    }
    writer.join();
    const grpc::Status st = stream->Finish();
    if (!st.ok()) {
      stats.Fail(absl::StrCat("stream ", gen_.stream, " DecompressPages from page ", first, ": ",
                              static_cast<int>(st.error_code()), " ", st.error_message()));
      return;
    }
    if (got != frames.size()) {
      stats.Fail(absl::StrCat("stream ", gen_.stream, " DecompressPages from page ", first, ": sent ",
                              frames.size(), " frames, got ", got, " pages"));
    }
    if (receipt && (receipt->pages() != frames.size() || receipt->operation() != "decompress")) {
      stats.Fail(absl::StrCat("stream ", gen_.stream, ": decompress receipt ", receipt->operation(), " ",
                              receipt->pages(), " pages"));
    }
  }

  // One page: server frame == local fast-path frame of the same input; server decode == local
  // decode; reference-path decode == fast-path decode within 1e-5 relative.
  void Verify(uint64_t index, const std::string& frame, const std::string& server_data) {
    const uint64_t errors_before = stats.errors;
    const std::string input = gen_.Data(index);
    KvPageInput in;
    in.coords = gen_.Coords(index);
    in.dtype = def_.dtype;
    in.data = Bytes(input);
    KvCompressOptions fast;
    fast.compute_metrics = false;  // forced on by a quality budget, as on the server
    fast.path = CodecPath::kFast;
    auto mine = codec_->CompressPage(in, fast);
    if (!mine.ok()) {
      stats.Fail(absl::StrCat(Where(index), ": local compress failed: ", mine.status().ToString()));
      return;
    }
    if (mine->frame != frame) {
      stats.Fail(absl::StrCat(Where(index), ": the server's frame (", frame.size(),
                              " bytes) differs from the local fast-path frame (", mine->frame.size(), " bytes)"));
    }
    stats.vectors += mine->counts.vector_count;
    stats.coded += mine->counts.coded;
    stats.raw += mine->counts.raw_total();
    const DType out = out_dtype_ == v1::DTYPE_F32 ? DType::kF32 : def_.dtype;
    auto local = codec_->DecodeFrame(Bytes(frame), out, CodecPath::kFast);
    if (!local.ok()) {
      stats.Fail(absl::StrCat(Where(index), ": local decode of the server's frame failed: ",
                              local.status().ToString()));
      return;
    }
    if (local->coords != in.coords || local->data.size() != server_data.size() ||
        std::memcmp(local->data.data(), server_data.data(), server_data.size()) != 0) {
      stats.Fail(absl::StrCat(Where(index), ": DecompressPages returned ", server_data.size(),
                              " bytes that differ from the local decode (", local->data.size(), " bytes)"));
    }
    // Reference path: decoding the same frame agrees with the fast decode.
    auto ref = codec_->DecodeFrame(Bytes(frame), DType::kF32, CodecPath::kReference);
    auto f32 = codec_->DecodeFrame(Bytes(frame), DType::kF32, CodecPath::kFast);
    if (!ref.ok() || !f32.ok() || ref->data.size() != f32->data.size()) {
      stats.Fail(absl::StrCat(Where(index), ": reference/f32 decode failed"));
      return;
    }
    // The two paths differ by f32 vs f64 rotation rounding, which scales with the decoded
    // vector's norm (a token row, or a channel column on the channel axis): |a - b| <= 1e-5 x
    // (|a| + norm of the row and of the column through the element).
    const uint32_t d = def_.head_dim, tc = in.coords.token_count;
    std::vector<float> a(size_t{tc} * d), b(a.size());
    ToFloat(DType::kF32, ref->data.data(), a.size(), a.data());
    ToFloat(DType::kF32, f32->data.data(), b.size(), b.data());
    std::vector<double> row(tc, 0.0), col(d, 0.0);
    for (uint32_t t = 0; t < tc; ++t) {
      for (uint32_t k = 0; k < d; ++k) {
        const double v = a[size_t{t} * d + k];
        row[t] += v * v;
        col[k] += v * v;
      }
    }
    for (uint32_t t = 0; t < tc; ++t) {
      for (uint32_t k = 0; k < d; ++k) {
        const size_t i = size_t{t} * d + k;
        const double tol = 1e-5 * (std::fabs(a[i]) + std::sqrt(std::max(row[t], col[k])));
        if (!(std::fabs(static_cast<double>(a[i]) - b[i]) <= tol)) {
          stats.Fail(absl::StrCat(Where(index), ": reference decode ", a[i], " vs fast decode ", b[i],
                                  " at token ", t, " channel ", k, " (tolerance ", tol, ")"));
          t = tc;
          break;
        }
      }
    }
    // Reference-path encode of the same input: reported (near-ties may pick another codeword).
    KvCompressOptions reference = fast;
    reference.path = CodecPath::kReference;
    auto rframe = codec_->CompressPage(in, reference);
    if (!rframe.ok()) {
      stats.Fail(absl::StrCat(Where(index), ": local reference compress failed: ", rframe.status().ToString()));
      return;
    }
    ++stats.ref_checked;
    if (rframe->frame == frame) ++stats.ref_identical_frames;
    if (stats.errors == errors_before) ++stats.pages_verified;
  }

  const Def& def_;
  std::shared_ptr<const KvCodec> codec_;
  std::string digest_;
  PageGen gen_;
  v1::KvCompressionService::Stub* stub_;
  v1::DType out_dtype_;
  bool restrict_;
  bool page_metrics_;
  Clock::time_point deadline_;
  std::atomic<uint64_t>* progress_;
};

struct RssSample {
  double seconds;
  uint64_t pages;
  uint64_t kib;
};

TEST(Soak, EightStreamsMixedProfilesDecodeExactlyAndRssStaysFlat) {
  const uint64_t pages_per_stream = std::max<uint64_t>(1, EnvU64("FQ_SOAK_PAGES_PER_STREAM", kDefaultPagesPerStream));
  const double max_seconds = EnvDouble("FQ_SOAK_MAX_SECONDS", kDefaultMaxSeconds);
  const auto t0 = Clock::now();

  TempDir tmp;
  const fs::path data = tmp.path() / "data";
  fs::create_directories(data);
  ServerProcess server;
  server.Start({"--listen=127.0.0.1:0", "--metrics-listen=", "--workers=2", "--build-threads=1",
                "--data-dir=" + data.string(), "--drain-seconds=5"},
               tmp.path());
  const std::optional<int> port = server.WaitForPort();
  ASSERT_TRUE(port.has_value()) << server.Log();
  const pid_t pid = server.pid();
  ASSERT_GT(pid, 0);

  // Two connections (distinct channel args keep gRPC from sharing one subchannel).
  std::vector<std::unique_ptr<v1::KvCompressionService::Stub>> stubs;
  for (int c = 0; c < 2; ++c) {
    grpc::ChannelArguments args;
    args.SetInt("fq.soak.connection", c);
    args.SetMaxReceiveMessageSize(64 << 20);
    stubs.push_back(v1::KvCompressionService::NewStub(grpc::CreateCustomChannel(
        absl::StrCat("127.0.0.1:", *port), grpc::InsecureChannelCredentials(), args)));
  }

  // Register every profile on the server and build the same codec locally: the digests must agree.
  const std::vector<Def> defs = Defs();
  std::vector<std::string> digests(defs.size());
  std::vector<std::shared_ptr<const KvCodec>> codecs(defs.size());
  {
    std::vector<std::thread> builders;
    for (size_t i = 0; i < defs.size(); ++i) {
      builders.emplace_back([&, i] {
        auto p = KvCompressionProfile::FromSpecJson(defs[i].Spec());
        if (!p.ok()) return;
        auto c = KvCodec::Build(*std::move(p), 1);
        if (c.ok()) codecs[i] = *std::move(c);
      });
    }
    for (size_t i = 0; i < defs.size(); ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(300));
      v1::RegisterProfileRequest req;
      req.set_spec_json(defs[i].Spec());
      v1::RegisterProfileResponse resp;
      const grpc::Status s = stubs[0]->RegisterProfile(&ctx, req, &resp);
      ASSERT_TRUE(s.ok()) << defs[i].id << ": " << s.error_message();
      digests[i] = resp.profile().digest();
    }
    for (auto& b : builders) b.join();
  }
  for (size_t i = 0; i < defs.size(); ++i) {
    ASSERT_NE(codecs[i], nullptr) << defs[i].id << ": local build failed";
    ASSERT_EQ(codecs[i]->profile_digest(), digests[i]) << defs[i].id << ": local profile digest differs";
  }
  std::vector<std::vector<float>> fixtures(defs.size());
  for (size_t i = 0; i < defs.size(); ++i) {
    if (defs[i].fixture.empty()) continue;
    fixtures[i] = LoadFixture(defs[i].fixture);
    ASSERT_EQ(fixtures[i].size(), size_t{64} * 4 * defs[i].head_dim) << defs[i].fixture;
  }

  // RSS sampler: every 200 ms while the streams run (pages verified so far, VmRSS of the child).
  std::atomic<uint64_t> progress{0};
  std::atomic<bool> done{false};
  std::mutex samples_mu;
  std::vector<RssSample> samples;
  const auto run0 = Clock::now();
  auto sample = [&] {
    const RssSample s{std::chrono::duration<double>(Clock::now() - run0).count(), progress.load(), RssKib(pid)};
    std::lock_guard<std::mutex> lock(samples_mu);
    samples.push_back(s);
  };
  sample();
  std::thread sampler([&] {
    while (!done.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      sample();
    }
  });

  const auto deadline =
      t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(max_seconds));
  std::vector<std::unique_ptr<SoakRunner>> runners;
  for (int s = 0; s < kStreams; ++s) {
    const size_t pi = static_cast<size_t>(s) % defs.size();
    // The first stream of each profile uses the real fixture when the profile has one.
    PageGen gen{&defs[pi], (s < static_cast<int>(defs.size()) && !fixtures[pi].empty()) ? &fixtures[pi] : nullptr, s};
    // Streams 0-3 decode to the native dtype, 4-7 to f32; odd streams restrict DecompressPages to
    // the profile; streams 4-7 ask for page metrics.
    runners.push_back(std::make_unique<SoakRunner>(
        defs[pi], codecs[pi], digests[pi], gen, stubs[s % 2].get(),
        s < kStreams / 2 ? defs[pi].proto_dtype : v1::DTYPE_F32, s % 2 == 1, s >= kStreams / 2, deadline,
        &progress));
  }
  {
    std::vector<std::thread> threads;
    for (auto& r : runners) threads.emplace_back([&r, pages_per_stream] { r->Run(pages_per_stream); });
    for (auto& t : threads) t.join();
  }
  done = true;
  sampler.join();
  sample();  // end
  const double run_seconds = std::chrono::duration<double>(Clock::now() - run0).count();

  // Totals and every failure.
  StreamStats total;
  for (size_t s = 0; s < runners.size(); ++s) {
    const StreamStats& st = runners[s]->stats;
    total.pages_sent += st.pages_sent;
    total.pages_compressed += st.pages_compressed;
    total.pages_verified += st.pages_verified;
    total.compress_streams += st.compress_streams;
    total.decompress_streams += st.decompress_streams;
    total.ref_identical_frames += st.ref_identical_frames;
    total.ref_checked += st.ref_checked;
    total.vectors += st.vectors;
    total.coded += st.coded;
    total.raw += st.raw;
    total.errors += st.errors;
    total.stopped_by_time = total.stopped_by_time || st.stopped_by_time;
    for (const auto& m : st.messages) ADD_FAILURE() << m;
    std::printf("soak: stream %zu %s: %llu pages in %llu+%llu streams, vectors %llu coded / %llu raw\n", s,
                defs[s % defs.size()].id.c_str(), static_cast<unsigned long long>(st.pages_verified),
                static_cast<unsigned long long>(st.compress_streams),
                static_cast<unsigned long long>(st.decompress_streams), static_cast<unsigned long long>(st.coded),
                static_cast<unsigned long long>(st.raw));
    EXPECT_EQ(st.pages_verified, st.pages_sent) << "stream " << s << ": pages sent but not verified";
  }
  EXPECT_EQ(total.errors, 0u);
  EXPECT_GT(total.pages_verified, 0u);
  const bool cut_short = total.stopped_by_time;
  if (cut_short) {
    std::printf("soak: the time budget (%.0f s) ended the run after %llu of %llu pages\n", max_seconds,
                static_cast<unsigned long long>(total.pages_sent),
                static_cast<unsigned long long>(pages_per_stream * kStreams));
  }

  // RSS: warm-up = the first sample once 20% of the pages that ran were verified; growth = the
  // largest sample from there on (including the end) minus the warm-up sample.
  const uint64_t warm_pages = (total.pages_verified + 4) / 5;
  size_t warm = samples.size() - 1;
  for (size_t i = 0; i < samples.size(); ++i) {
    if (samples[i].pages >= warm_pages) {
      warm = i;
      break;
    }
  }
  uint64_t max_after = 0;
  for (size_t i = warm; i < samples.size(); ++i) max_after = std::max(max_after, samples[i].kib);
  const RssSample& w = samples[warm];
  const RssSample& end = samples.back();
  ASSERT_GT(w.kib, 0u) << "cannot read /proc/" << pid << "/status";
  const uint64_t growth = max_after > w.kib ? max_after - w.kib : 0;
  std::printf("soak: %d streams, %zu profiles, %llu pages sent, %llu verified bit-exact, %llu+%llu streams, "
              "%.1f s\n",
              kStreams, defs.size(), static_cast<unsigned long long>(total.pages_sent),
              static_cast<unsigned long long>(total.pages_verified),
              static_cast<unsigned long long>(total.compress_streams),
              static_cast<unsigned long long>(total.decompress_streams), run_seconds);
  std::printf("soak: vectors %llu (coded %llu, raw %llu); reference-path encode gave the identical frame for "
              "%llu of %llu pages\n",
              static_cast<unsigned long long>(total.vectors), static_cast<unsigned long long>(total.coded),
              static_cast<unsigned long long>(total.raw), static_cast<unsigned long long>(total.ref_identical_frames),
              static_cast<unsigned long long>(total.ref_checked));
  // About ten samples spread over the run, plus warm-up and end.
  std::printf("soak: server VmRSS (KiB) by pages verified:");
  const size_t stride = std::max<size_t>(1, samples.size() / 10);
  for (size_t i = 0; i < samples.size(); ++i) {
    if (i % stride == 0 || i == warm || i + 1 == samples.size()) {
      std::printf(" %llu@%llu%s", static_cast<unsigned long long>(samples[i].kib),
                  static_cast<unsigned long long>(samples[i].pages), i == warm ? "(warm-up)" : "");
    }
  }
  std::printf("\nsoak: RSS start %llu KiB, warm-up %llu KiB (%llu pages, %.1f s), end %llu KiB, max after "
              "warm-up %llu KiB, growth %llu KiB (bound %llu KiB)\n",
              static_cast<unsigned long long>(samples.front().kib), static_cast<unsigned long long>(w.kib),
              static_cast<unsigned long long>(w.pages), w.seconds, static_cast<unsigned long long>(end.kib),
              static_cast<unsigned long long>(max_after), static_cast<unsigned long long>(growth),
              static_cast<unsigned long long>(kMaxRssGrowthKib));
  std::fflush(stdout);
  RecordProperty("streams", kStreams);
  RecordProperty("profiles", static_cast<int>(defs.size()));
  RecordProperty("pages_sent", std::to_string(total.pages_sent));
  RecordProperty("pages_verified", std::to_string(total.pages_verified));
  RecordProperty("cut_short_by_time_budget", cut_short ? "yes" : "no");
  RecordProperty("seconds", absl::StrCat(run_seconds));
  RecordProperty("rss_start_kib", std::to_string(samples.front().kib));
  RecordProperty("rss_warmup_kib", std::to_string(w.kib));
  RecordProperty("rss_end_kib", std::to_string(end.kib));
  RecordProperty("rss_max_after_warmup_kib", std::to_string(max_after));
  RecordProperty("rss_growth_kib", std::to_string(growth));
  RecordProperty("ref_identical_frames", absl::StrCat(total.ref_identical_frames, "/", total.ref_checked));
  if (kRssIsMeaningful) {
    EXPECT_LT(growth, kMaxRssGrowthKib) << "server RSS grew after warm-up";
  } else {
    std::printf("soak: AddressSanitizer build: RSS reported, not bounded (quarantine)\n");
  }

  // The server is still healthy and drains cleanly.
  server.Signal(SIGTERM);
  const std::optional<int> code = server.WaitForExit();
  EXPECT_EQ(code, std::optional<int>(0)) << server.Log();
}

}  // namespace
}  // namespace fibquant::server
