// Fuzz target: the `fibquant` CLI's untrusted-file parsers that run without a server.
// Byte 0 picks the mode:
//   bit 0 clear  `.fqc` container (client/cli/container.h): the rest of the input is parsed with
//                DecodeContainer as is and "resealed" (its last 8 bytes replaced by the correct
//                XXH3 of the rest, so every check behind the checksum is reached), each under the
//                default limits and (bit 1) tight ones (4 KiB metadata/receipt, 64 frames of <= 16 KiB).
//   bit 0 set    page mapping (client/cli/kv_pages.h): a tensor shape and tokens_per_page as a
//                container's metadata would give them, then a script of pages handed to
//                TensorAssembler (grid pages by index, or arbitrary coordinates as a server could send).
// Invariants, container: errors are DataLoss / Unimplemented (only for a version != 1) /
//   ResourceExhausted, as container.h documents; tightening the limits only turns results into
//   ResourceExhausted (any other result is unchanged); an accepted container matches its header
//   (metadata_len, frame_count, every frame length inside the file, the size formula of
//   docs/format/container.md, the checksum), holds JSON objects, re-encodes to the very same bytes,
//   and a byte appended or removed makes it DataLoss; no single allocation while parsing exceeds
//   8 x the input + 4 KiB (a declared length or count never drives an allocation).
// Invariants, kv_pages: LayoutOf accepts exactly ranks 2-4 with dims in [1, 2^32-1] (else
//   InvalidArgument) and maps the dims as documented; PlanPages tiles every (layer, head, token)
//   exactly once in stream order; TensorAssembler::Add accepts exactly the unseen grid pages of the
//   right size (DataLoss otherwise), Finish succeeds iff every grid page was added, and the tensor it
//   returns equals the source tensor the pages were gathered from.
#include <sanitizer/allocator_interface.h>

#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "client/cli/container.h"
#include "client/cli/kv_pages.h"
#include "core/half.h"
#include "nlohmann/json.hpp"
#include "tests/fuzz/fuzz_util.h"

using namespace fibquant;
using namespace fibquant::cli;

namespace {

// The largest single allocation made while DecodeContainer runs (a malloc hook; ASan calls it for
// operator new too). The reader promises that declared lengths and counts never drive an
// allocation, so anything above a small multiple of the input is a bug.
thread_local bool g_in_decode = false;
thread_local size_t g_max_alloc = 0;
void MallocHook(const volatile void*, size_t n) {
  if (g_in_decode && n > g_max_alloc) g_max_alloc = n;
}
void FreeHook(const volatile void*) {}

absl::StatusOr<Container> Decode(std::string_view in, const ContainerLimits& lim) {
  g_max_alloc = 0;
  g_in_decode = true;
  auto c = DecodeContainer(in, lim);
  g_in_decode = false;
  FQ_FUZZ_CHECK(g_max_alloc <= 8 * in.size() + 4096);
  return c;
}

uint64_t Le(std::string_view s, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(s[at + i]);
  return v;
}

bool IsContainerError(const absl::Status& s) {
  return s.code() == absl::StatusCode::kDataLoss || s.code() == absl::StatusCode::kUnimplemented ||
         s.code() == absl::StatusCode::kResourceExhausted;
}

bool IsJsonObject(const std::string& s) {
  auto j = nlohmann::json::parse(s, nullptr, /*allow_exceptions=*/false);
  return !j.is_discarded() && j.is_object();
}

bool Equal(const Container& a, const Container& b) {
  return a.metadata_json == b.metadata_json && a.frames == b.frames && a.receipt_json == b.receipt_json;
}

void CheckAccepted(std::string_view in, const Container& c, const ContainerLimits& lim) {
  FQ_FUZZ_CHECK(in.size() >= kContainerPreambleBytes + 4 + kContainerChecksumBytes);
  FQ_FUZZ_CHECK(in.substr(0, 4) == std::string_view(kContainerMagic.data(), 4));
  FQ_FUZZ_CHECK(Le(in, 4, 2) == kContainerVersion && Le(in, 6, 2) == 0);
  FQ_FUZZ_CHECK(Le(in, 8, 4) == c.metadata_json.size() && c.metadata_json.size() <= lim.max_metadata_bytes);
  FQ_FUZZ_CHECK(Le(in, 12, 4) == c.frames.size() && c.frames.size() <= lim.max_frames);
  FQ_FUZZ_CHECK(in.substr(16, c.metadata_json.size()) == c.metadata_json);
  // Walk the file by the lengths the container reports: every frame is where its length field says.
  size_t pos = 16 + c.metadata_json.size();
  for (const std::string& f : c.frames) {
    FQ_FUZZ_CHECK(f.size() <= lim.max_frame_bytes);
    FQ_FUZZ_CHECK(pos + 4 + f.size() <= in.size() - kContainerChecksumBytes);
    FQ_FUZZ_CHECK(Le(in, pos, 4) == f.size());
    FQ_FUZZ_CHECK(in.substr(pos + 4, f.size()) == f);
    pos += 4 + f.size();
  }
  FQ_FUZZ_CHECK(c.receipt_json.size() <= lim.max_receipt_bytes);
  FQ_FUZZ_CHECK(Le(in, pos, 4) == c.receipt_json.size());
  FQ_FUZZ_CHECK(in.substr(pos + 4, c.receipt_json.size()) == c.receipt_json);
  pos += 4 + c.receipt_json.size();
  FQ_FUZZ_CHECK(pos + kContainerChecksumBytes == in.size());  // the size formula of container.md
  FQ_FUZZ_CHECK(Le(in, pos, 8) == ContainerChecksum(in.substr(0, pos)));
  FQ_FUZZ_CHECK(IsJsonObject(c.metadata_json) && IsJsonObject(c.receipt_json));

  // Canonical encoding: the writer gives back the very bytes, which parse to an equal container.
  auto enc = EncodeContainer(c);
  FQ_FUZZ_CHECK(enc.ok());
  FQ_FUZZ_CHECK(*enc == in);
  auto back = Decode(*enc, lim);
  FQ_FUZZ_CHECK(back.ok() && Equal(*back, c));

  // One byte more or less is never a container.
  std::string longer(in);
  longer.push_back('\0');
  auto l = Decode(longer, lim);
  FQ_FUZZ_CHECK(!l.ok() && l.status().code() == absl::StatusCode::kDataLoss);
  auto s = Decode(in.substr(0, in.size() - 1), lim);
  FQ_FUZZ_CHECK(!s.ok() && s.status().code() == absl::StatusCode::kDataLoss);

  // What `fibquant decompress` does next with the metadata: the shape goes to LayoutOf.
  auto meta = nlohmann::json::parse(c.metadata_json, nullptr, false);
  if (meta.contains("source") && meta["source"].is_object() && meta["source"].contains("shape") &&
      meta["source"]["shape"].is_array()) {
    std::vector<uint64_t> shape;
    for (const auto& d : meta["source"]["shape"]) {
      if (!d.is_number_unsigned()) return;
      shape.push_back(d.get<uint64_t>());
    }
    auto layout = LayoutOf(shape, "fuzz.fqc");
    FQ_FUZZ_CHECK(layout.ok() || layout.status().code() == absl::StatusCode::kInvalidArgument);
  }
}

void CheckContainer(std::string_view in, bool tight) {
  const ContainerLimits def;
  auto d = Decode(in, def);
  if (!d.ok()) {
    FQ_FUZZ_CHECK(IsContainerError(d.status()));
    FQ_FUZZ_CHECK(!d.status().message().empty());
    if (d.status().code() == absl::StatusCode::kUnimplemented) {
      FQ_FUZZ_CHECK(in.size() >= 6 && in.substr(0, 4) == "FQKC" && Le(in, 4, 2) != kContainerVersion);
    }
  } else {
    CheckAccepted(in, *d, def);
  }
  if (!tight) return;
  ContainerLimits lim;
  lim.max_metadata_bytes = 4096;
  lim.max_frames = 64;
  lim.max_frame_bytes = 16384;
  lim.max_receipt_bytes = 4096;
  lim.max_container_bytes = 49152;
  auto t = Decode(in, lim);
  if (t.ok()) {
    CheckAccepted(in, *t, lim);
    FQ_FUZZ_CHECK(d.ok() && Equal(*d, *t));
  } else {
    FQ_FUZZ_CHECK(IsContainerError(t.status()));
    if (t.status().code() != absl::StatusCode::kResourceExhausted) {
      FQ_FUZZ_CHECK(!d.ok() && d.status() == t.status());
    }
  }
}

// Reads little-endian fields off the input; zeros once it runs out.
struct Reader {
  std::string_view s;
  uint64_t Take(int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes && !s.empty(); ++i) {
      v |= uint64_t{static_cast<uint8_t>(s[0])} << (8 * i);
      s.remove_prefix(1);
    }
    return v;
  }
};

void CheckPages(std::string_view input) {
  Reader r{input};
  const uint64_t sel = r.Take(1);
  const size_t rank = 1 + sel % 5;  // 1..5: ranks 1 and 5 must be refused
  const auto src_dtype = static_cast<DType>((sel >> 3) % 3);
  const auto page_dtype = static_cast<DType>((sel >> 5) % 3);
  const uint64_t hi = r.Take(1);  // bit i: dim i gets 2^32 added (out of range)
  std::vector<uint64_t> shape(rank);
  for (size_t i = 0; i < rank; ++i) shape[i] = r.Take(2) + ((hi >> i) & 1 ? (uint64_t{1} << 32) : 0);
  auto layout = LayoutOf(shape, "fuzz.npy");
  bool valid = rank >= 2 && rank <= 4;
  for (uint64_t d : shape) valid = valid && d >= 1 && d <= 0xffffffffull;
  FQ_FUZZ_CHECK(layout.ok() == valid);
  if (!layout.ok()) {
    FQ_FUZZ_CHECK(layout.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  const TensorLayout& L = *layout;
  FQ_FUZZ_CHECK(L.rank == rank && L.head_dim == shape.back());
  uint64_t product = 1;
  for (uint64_t d : shape) product *= d;
  FQ_FUZZ_CHECK(L.element_count() == product);
  if (rank == 2) FQ_FUZZ_CHECK(L.tokens == shape[0] && L.heads == 1 && L.layers == 1);
  if (rank == 3) FQ_FUZZ_CHECK(L.tokens == shape[0] && L.heads == shape[1] && L.layers == 1);
  if (rank == 4) FQ_FUZZ_CHECK(L.layers == shape[0] && L.heads == shape[1] && L.tokens == shape[2]);

  const uint32_t tpp = static_cast<uint32_t>(1 + r.Take(2) % kMaxKvTokensPerPage);
  const uint64_t per_seq = (uint64_t{L.tokens} + tpp - 1) / tpp;
  const uint64_t grid = uint64_t{L.layers} * L.heads * per_seq;
  if (product > (1u << 16) || grid > (1u << 12)) return;  // bounded work per input
  FQ_FUZZ_CHECK(PageCount(L, tpp) == grid);

  // PlanPages: stream order, every token of every (layer, head) exactly once.
  const std::vector<KvPageCoords> plan = PlanPages(L, tpp);
  FQ_FUZZ_CHECK(plan.size() == grid);
  uint64_t covered = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    const KvPageCoords& p = plan[i];
    FQ_FUZZ_CHECK(p.batch == 0 && p.layer < L.layers && p.kv_head < L.heads && p.token_start < L.tokens);
    FQ_FUZZ_CHECK(p.token_start % tpp == 0 && p.token_count == std::min(tpp, L.tokens - p.token_start));
    if (i > 0) {
      const KvPageCoords& q = plan[i - 1];
      FQ_FUZZ_CHECK(std::tie(q.layer, q.kv_head, q.token_start) < std::tie(p.layer, p.kv_head, p.token_start));
      if (q.layer == p.layer && q.kv_head == p.kv_head) FQ_FUZZ_CHECK(q.token_start + q.token_count == p.token_start);
    }
    covered += p.token_count;
  }
  FQ_FUZZ_CHECK(covered == uint64_t{L.layers} * L.heads * L.tokens);

  // A source tensor of small integers (exact in f32, f16 and bf16).
  Tensor src;
  src.dtype = src_dtype;
  src.shape = shape;
  src.data.assign(product * DTypeSize(src_dtype), '\0');
  for (uint64_t i = 0; i < product; ++i) {
    StoreElement(src_dtype, static_cast<float>(static_cast<int>((i * 37 + sel) % 251) - 125),
                 reinterpret_cast<uint8_t*>(src.data.data()), i);
  }
  const size_t es = DTypeSize(page_dtype);
  TensorAssembler as(L, shape, tpp, page_dtype);
  std::set<std::tuple<uint32_t, uint32_t, uint32_t>> seen;
  auto add = [&](const KvPageCoords& c, std::string_view data) {
    const bool on_grid = c.batch == 0 && c.layer < L.layers && c.kv_head < L.heads && c.token_start < L.tokens &&
                         c.token_start % tpp == 0 && c.token_count == std::min(tpp, L.tokens - c.token_start);
    const bool ok = on_grid && data.size() == size_t{c.token_count} * L.head_dim * es &&
                    !seen.count({c.layer, c.kv_head, c.token_start});
    absl::Status st = as.Add(c, data);
    FQ_FUZZ_CHECK(st.ok() == ok);
    if (!ok) FQ_FUZZ_CHECK(st.code() == absl::StatusCode::kDataLoss);
    if (ok) seen.insert({c.layer, c.kv_head, c.token_start});
  };
  // The script: 0-2 add grid page (u16 index), 3 arbitrary coordinates (and size off by a byte
  // when flagged), 4 stop here (Finish with what is there), anything else skips a byte.
  bool finish_early = false;
  while (!r.s.empty() && !finish_early) {
    const uint64_t op = r.Take(1);
    switch (op % 8) {
      case 0:
      case 1:
      case 2: {
        const KvPageCoords& p = plan[r.Take(2) % plan.size()];
        add(p, GatherPage(src, L, p, page_dtype));
        break;
      }
      case 3: {
        KvPageCoords c;
        c.batch = static_cast<uint32_t>(r.Take(1) % 2);
        c.layer = static_cast<uint32_t>(r.Take(1));
        c.kv_head = static_cast<uint32_t>(r.Take(1));
        c.token_start = static_cast<uint32_t>(r.Take(2));
        c.token_count = static_cast<uint32_t>(r.Take(2));
        if (op & 0x80) c.token_start = ~c.token_start;  // near 2^32
        // A grid page is at most product * es <= 256 KiB; a bigger claimed size gets no bytes.
        size_t want = size_t{c.token_count} * L.head_dim * es;
        if (want > (1u << 20)) want = 0;
        std::string data(want + ((op & 0x40) ? 1 : 0), '\0');
        const bool on_grid = c.batch == 0 && c.layer < L.layers && c.kv_head < L.heads &&
                             c.token_start < L.tokens && c.token_start % tpp == 0 &&
                             c.token_count == std::min(tpp, L.tokens - c.token_start);
        if (on_grid && data.size() == want) data = GatherPage(src, L, c, page_dtype);
        add(c, data);
        break;
      }
      case 4:
        finish_early = true;
        break;
      default:
        break;
    }
  }
  if (!finish_early) {
    for (const KvPageCoords& p : plan) {
      if (!seen.count({p.layer, p.kv_head, p.token_start})) add(p, GatherPage(src, L, p, page_dtype));
    }
  }
  auto out = as.Finish();
  FQ_FUZZ_CHECK(out.ok() == (seen.size() == grid));
  if (!out.ok()) {
    FQ_FUZZ_CHECK(out.status().code() == absl::StatusCode::kDataLoss);
    return;
  }
  FQ_FUZZ_CHECK(out->dtype == page_dtype && out->shape == shape && out->data.size() == product * es);
  const auto* a = reinterpret_cast<const uint8_t*>(src.data.data());
  const auto* b = reinterpret_cast<const uint8_t*>(out->data.data());
  for (uint64_t i = 0; i < product; ++i) FQ_FUZZ_CHECK(LoadElement(src_dtype, a, i) == LoadElement(page_dtype, b, i));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  __sanitizer_install_malloc_and_free_hooks(MallocHook, FreeHook);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] & 1) {
    CheckPages(rest);
    return 0;
  }
  const bool tight = (data[0] & 2) != 0;
  CheckContainer(rest, tight);
  if (rest.size() > kContainerChecksumBytes) {
    std::string sealed(rest);
    const size_t body = sealed.size() - kContainerChecksumBytes;
    const uint64_t c = ContainerChecksum(std::string_view(sealed).substr(0, body));
    for (size_t i = 0; i < kContainerChecksumBytes; ++i) sealed[body + i] = static_cast<char>(c >> (8 * i));
    CheckContainer(sealed, tight);
  }
  return 0;
}
