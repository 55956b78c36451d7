// Writes the seed corpora of the fuzz targets into <out>/<target>/ (committed under
// tests/fuzz/corpus/): real frames of the fuzz profiles, real profile and KV specs (including the
// shipped server/default-profiles), real `.fqc` containers of those frames and page-mapping
// scripts (container_fuzz), and (fq_fuzz_seeds, with protobuf and the server library) real service
// requests and real registry files (registry_fuzz).
// Run by hand after a format change:
//   build-fuzz/tests/fuzz/fq_fuzz_seeds tests/fuzz/corpus        (every target)
//   build-fuzz/tests/fuzz/fq_fuzz_core_seeds tests/fuzz/corpus   (all but service_fuzz)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "client/cli/container.h"
#include "core/half.h"
#include "core/kv_codec.h"
#include "core/kv_frame.h"
#include "core/kv_frame_auth.h"
#include "core/profile.h"
#ifdef FQ_SEEDS_WITH_PROTO
#include "fibquant/v1/kv_compression.pb.h"
#include "server/registry.h"
#endif
#include "tests/fuzz/fuzz_profiles.h"

namespace fs = std::filesystem;
using namespace fibquant;

namespace {

void Write(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary) << bytes;
}

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<float> Values(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std::sin(0.37f * static_cast<float>(i) + static_cast<float>(seed)) * ((i % 16) == 3 ? 6.0f : 1.0f);
  return v;
}

[[maybe_unused]] std::string Chunk(const std::string& msg) {
  std::string out(2, '\0');
  out[0] = static_cast<char>(msg.size() & 0xFF);
  out[1] = static_cast<char>((msg.size() >> 8) & 0xFF);
  return out + msg;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  const fs::path out = argv[1];
  const fs::path src = FQ_SOURCE_DIR;
  auto codecs = fuzz::BuildFuzzCodecs();
  const std::vector<std::string> specs = fuzz::FuzzSpecs();

  // kv_frame: pages (0, l, h, 0..8) and the partial page (0, 1, 1, 8..12) of every fuzz profile.
  std::vector<std::string> frames0;  // of codecs[0], for the service corpus
  for (size_t ci = 0; ci < codecs.size(); ++ci) {
    const KvCodec& c = *codecs[ci];
    const KvTensorShape& s = c.profile().shape;
    const KvPageCoords coords[] = {{0, 0, 0, 0, 8}, {0, 1, 1, 8, 4}};
    for (const KvPageCoords& pc : coords) {
      std::vector<float> x = Values(size_t{pc.token_count} * s.head_dim, pc.layer * 7 + pc.kv_head + pc.token_start);
      std::vector<uint8_t> bytes(x.size() * DTypeSize(s.dtype));
      FromFloat(s.dtype, x.data(), x.size(), bytes.data());
      KvPageInput in;
      in.coords = pc;
      in.dtype = s.dtype;
      in.data = bytes;
      auto cp = c.CompressPage(in);
      if (!cp.ok()) {
        std::fprintf(stderr, "compress: %s\n", cp.status().ToString().c_str());
        return 1;
      }
      Write(out / "kv_frame_fuzz", c.profile().profile_id + "." + std::to_string(pc.token_start) + ".frame", cp->frame);
      if (ci == 0) frames0.push_back(cp->frame);
    }
    Write(out / "kv_profile_json_fuzz", c.profile().profile_id + ".full.json", c.profile().ToJson());
    Write(out / "kv_profile_json_fuzz", c.profile().profile_id + ".spec.json", specs[ci]);
    if (c.profile().fib_profile) {
      Write(out / "profile_json_fuzz", c.profile().profile_id + ".profile.json", c.profile().fib_profile->ToJson());
    }
  }
  // kv_frame: version-2 frames beside the centred ones the loop above wrote (flag bit 1): sealed
  // frames (flag bit 2, key id, HMAC tag) of a plain page and of a centred page (both bits), as
  // the server writes them with --frame-key-file. Each is checked for the flags it must carry, so
  // a change in the encoder cannot silently turn these seeds into version-1 frames.
  {
    auto ring = KvFrameKeyRing::FromKeys({KvFrameKey{7, std::string(32, 'k')}});
    if (!ring.ok()) {
      std::fprintf(stderr, "key ring: %s\n", ring.status().ToString().c_str());
      return 1;
    }
    const KvCodec& plain = *codecs[0];
    const KvCodec& centred = *codecs[4];
    const KvTensorShape& s = plain.profile().shape;
    struct Seed {
      const KvCodec* codec;
      KvPageCoords coords;
      bool seal;
      uint16_t want_flags;
      const char* name;
    };
    const Seed seeds[] = {
        {&centred, {0, 1, 0, 0, 8}, false, kKvFrameFlagCentered, "v2.centered.frame"},
        {&plain, {0, 0, 1, 0, 8}, true, kKvFrameFlagAuthenticated, "v2.sealed.frame"},
        {&centred, {0, 1, 1, 8, 4}, true, kKvFrameFlagCentered | kKvFrameFlagAuthenticated,
         "v2.centered.sealed.frame"},
    };
    for (const Seed& seed : seeds) {
      std::vector<float> x = Values(size_t{seed.coords.token_count} * s.head_dim, 31 + seed.coords.kv_head);
      KvPageInput in;
      in.coords = seed.coords;
      in.dtype = DType::kF32;
      in.data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(x.data()), x.size() * sizeof(float));
      auto cp = seed.codec->CompressPage(in);
      if (!cp.ok()) {
        std::fprintf(stderr, "compress %s: %s\n", seed.name, cp.status().ToString().c_str());
        return 1;
      }
      std::string frame = cp->frame;
      if (seed.seal) {
        auto sealed = SealKvFrame(
            absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(frame.data()), frame.size()), *ring);
        if (!sealed.ok()) {
          std::fprintf(stderr, "seal %s: %s\n", seed.name, sealed.status().ToString().c_str());
          return 1;
        }
        frame = *std::move(sealed);
      }
      auto header = InspectFrame(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(frame.data()), frame.size()));
      if (!header.ok() || header->version != 2 || (header->flags & seed.want_flags) != seed.want_flags) {
        std::fprintf(stderr, "%s: not a version-2 frame with flags 0x%x\n", seed.name, seed.want_flags);
        return 1;
      }
      Write(out / "kv_frame_fuzz", seed.name, frame);
    }
  }
  // container_fuzz: byte 0 = 0 (default limits) or 2 (also tight limits), then a container as
  // `fibquant compress` writes it: every page of the [2, 2, 12, 16] tensor (8 frames: per head one
  // full page of 8 tokens and the partial page 8..12) for each profile (f32 coded keys, bf16
  // per-channel values, f16 role-aware keys, f16 raw values), one [12, 16] tensor (2 frames, the
  // second partial), and an empty one. Byte 0 odd: a page-mapping script (see container_fuzz.cc).
  for (size_t ci = 0; ci < codecs.size(); ++ci) {
    const KvCodec& c = *codecs[ci];
    const KvTensorShape& s = c.profile().shape;
    const uint32_t tpp = c.profile().page_geometry.tokens_per_page;
    for (bool rank2 : {false, true}) {
      if (rank2 && ci != 0 && ci != 3) continue;
      cli::Container box;
      const uint32_t layers = rank2 ? 1 : s.layers, heads = rank2 ? 1 : s.kv_heads;
      for (uint32_t l = 0; l < layers; ++l) {
        for (uint32_t h = 0; h < heads; ++h) {
          for (uint32_t t0 = 0; t0 < s.tokens; t0 += tpp) {
            const KvPageCoords pc{0, l, h, t0, std::min(tpp, s.tokens - t0)};
            std::vector<float> x = Values(size_t{pc.token_count} * s.head_dim, l * 7 + h + t0);
            std::vector<uint8_t> bytes(x.size() * DTypeSize(s.dtype));
            FromFloat(s.dtype, x.data(), x.size(), bytes.data());
            KvPageInput in;
            in.coords = pc;
            in.dtype = s.dtype;
            in.data = bytes;
            auto cp = c.CompressPage(in);
            if (!cp.ok()) {
              std::fprintf(stderr, "compress: %s\n", cp.status().ToString().c_str());
              return 1;
            }
            box.frames.push_back(cp->frame);
          }
        }
      }
      auto digest = c.profile().Digest();
      const std::string shape = rank2 ? "[12,16]" : "[2,2,12,16]";
      box.metadata_json = "{\"pages\":" + std::to_string(box.frames.size()) +
                          ",\"page_dtype\":\"" + std::string(DTypeName(s.dtype)) + "\",\"profile_digest\":\"" +
                          (digest.ok() ? *digest : std::string("sha256:0")) + "\",\"profile_id\":\"" +
                          c.profile().profile_id + "\",\"schema\":\"fq_cli_container_meta_v1\",\"source\":{\"dtype\":\"f32\",\"file\":\"k.npy\",\"shape\":" +
                          shape + "},\"tokens_per_page\":" + std::to_string(tpp) + "}";
      box.receipt_json = "{\"receiptId\":\"rcpt-1-" + std::to_string(ci + 1) +
                         "\",\"operation\":\"compress\",\"profileDigest\":\"" + (digest.ok() ? *digest : std::string()) +
                         "\",\"pages\":\"" + std::to_string(box.frames.size()) +
                         "\",\"receiptJson\":\"{\\\"schema\\\":\\\"fq_kv_receipt_v1\\\"}\"}";
      auto enc = cli::EncodeContainer(box);
      if (!enc.ok()) {
        std::fprintf(stderr, "container: %s\n", enc.status().ToString().c_str());
        return 1;
      }
      const char mode = (ci == 1 && !rank2) ? '\2' : '\0';
      Write(out / "container_fuzz", c.profile().profile_id + (rank2 ? ".rank2" : "") + ".fqc", std::string(1, mode) + *enc);
    }
  }
  {
    cli::Container empty;
    empty.metadata_json = "{}";
    empty.receipt_json = "{}";
    auto enc = cli::EncodeContainer(empty);
    if (enc.ok()) Write(out / "container_fuzz", "empty.fqc", std::string(1, '\2') + *enc);
  }
  // Page-mapping scripts: byte 0 odd; then rank/dtypes, hi bits, dims (u16), tokens_per_page - 1
  // (u16), and ops (0 = grid page by u16 index, 3 = explicit coordinates, 4 = finish early).
  {
    auto le16 = [](uint32_t v) { return std::string{static_cast<char>(v & 0xff), static_cast<char>(v >> 8)}; };
    // rank 4 [2, 2, 12, 16] f32 -> f16 pages of 8: two grid pages out of order, then the rest.
    Write(out / "container_fuzz", "pages.rank4", std::string{'\1', static_cast<char>(48), '\0'} +
          le16(2) + le16(2) + le16(12) + le16(16) + le16(7) + std::string(1, '\0') + le16(5) +
          std::string(1, '\0') + le16(1));
    // rank 3 [5, 3, 4] bf16 pages of 2, explicit coordinates (layer 0, head 2, tokens 4+1), a
    // duplicate, then finish early.
    Write(out / "container_fuzz", "pages.rank3", std::string{'\1', static_cast<char>(72), '\0'} +
          le16(5) + le16(3) + le16(4) + le16(1) + std::string{'\3', '\0', '\0', '\2'} + le16(4) + le16(1) +
          std::string{'\3', '\0', '\0', '\2'} + le16(4) + le16(1) + std::string(1, '\4'));
    // rank 2 [12, 16] pages of 8, and a refused rank-5 shape.
    Write(out / "container_fuzz", "pages.rank2", std::string{'\1', '\1', '\0'} + le16(12) + le16(16) + le16(7));
    Write(out / "container_fuzz", "pages.rank5", std::string{'\1', '\4', '\0'} + le16(1) + le16(1) + le16(1) +
          le16(1) + le16(1) + le16(0));
  }
  for (const auto& e : fs::directory_iterator(src / "server" / "default-profiles")) {
    if (e.path().extension() == ".json") Write(out / "kv_profile_json_fuzz", e.path().filename().string(), ReadFile(e.path()));
  }
  for (auto [d, k, n] : {std::tuple{128u, 4u, 256u}, std::tuple{64u, 2u, 16u}, std::tuple{32u, 1u, 4u}}) {
    auto p = Profile::PaperDefault(d, k, n, 42);
    if (p.ok()) Write(out / "profile_json_fuzz", "paper_" + std::to_string(d) + "_" + std::to_string(k) + "_" + std::to_string(n) + ".json", p->ToJson());
  }
  Write(out / "profile_json_fuzz", "spec_hadamard.json",
        R"({"ambient_dim":64,"block_dim":4,"codebook_size":16,"seed":7,"rotation_algorithm":"hadamard","lloyd_restarts":1,"lloyd_iterations":3,"training_samples":512})");
  Write(out / "profile_json_fuzz", "spec_haar.json", R"({"ambient_dim":16,"block_dim":2,"codebook_size":6,"seed":1})");

#ifdef FQ_SEEDS_WITH_PROTO
  // service: register (spec JSON and structured), a compress stream and a decompress stream.
  {
    fibquant::v1::RegisterProfileRequest r;
    r.set_spec_json(specs[1]);
    Write(out / "service_fuzz", "register_json", std::string(1, '\0') + r.SerializeAsString());
    auto* st = r.mutable_structured();
    st->set_profile_id("fuzz.structured");
    st->set_axis_policy("per_token");
    auto* sh = st->mutable_shape();
    sh->set_role("key");
    sh->set_batch(1);
    sh->set_layers(1);
    sh->set_kv_heads(1);
    sh->set_query_heads(1);
    sh->set_tokens(8);
    sh->set_head_dim(16);
    sh->set_attention_kind("mha");
    sh->set_dtype("f32");
    sh->set_rope_state("post_rope");
    st->mutable_page_geometry()->set_tokens_per_page(8);
    auto* fq = st->mutable_fibquant();
    fq->set_block_dim(4);
    fq->set_codebook_size(6);
    fq->set_seed(3);
    fq->set_lloyd_restarts(1);
    fq->set_lloyd_iterations(2);
    fq->set_training_samples(300);
    Write(out / "service_fuzz", "register_structured", std::string(1, '\0') + r.SerializeAsString());
  }
  {
    std::string in(1, '\1');
    fibquant::v1::CompressPagesRequest h;
    h.mutable_header()->set_profile_digest("@");
    h.mutable_header()->set_input_dtype(fibquant::v1::DTYPE_F32);
    h.mutable_header()->set_return_page_metrics(true);
    in += Chunk(h.SerializeAsString());
    for (uint32_t t0 : {0u, 8u}) {
      const uint32_t n = t0 == 0 ? 8 : 4;
      std::vector<float> x = Values(size_t{n} * 16, t0);
      fibquant::v1::CompressPagesRequest p;
      auto* c = p.mutable_page()->mutable_coordinates();
      c->set_layer(1);
      c->set_kv_head(0);
      c->set_token_start(t0);
      c->set_token_count(n);
      p.mutable_page()->set_data(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float));
      p.mutable_page()->set_client_sequence(t0);
      in += Chunk(p.SerializeAsString());
    }
    Write(out / "service_fuzz", "compress_stream", in);
  }
  {
    std::string in(1, '\2');
    fibquant::v1::DecompressPagesRequest h;
    h.mutable_header()->set_output_dtype(fibquant::v1::DTYPE_F32);
    h.mutable_header()->set_profile_digest("@");
    in += Chunk(h.SerializeAsString());
    for (size_t i = 0; i < frames0.size(); ++i) {
      fibquant::v1::DecompressPagesRequest f;
      f.mutable_frame()->set_frame(frames0[i]);
      f.mutable_frame()->set_client_sequence(i);
      in += Chunk(f.SerializeAsString());
    }
    Write(out / "service_fuzz", "decompress_stream", in);
  }
  // registry: the files a Registry writes for the fuzz profiles and one receipt, each prefixed
  // with the kind byte (0 profile, 1 receipt; +2 = reseal).
  {
    const fs::path dir = fs::temp_directory_path() / "fq_registry_seeds";
    fs::remove_all(dir);
    server::RegistryOptions ro;
    ro.data_dir = dir.string();
    auto reg = server::Registry::Open(ro, nullptr);
    if (!reg.ok()) {
      std::fprintf(stderr, "registry: %s\n", reg.status().ToString().c_str());
      return 1;
    }
    for (const auto& c : codecs) {
      server::ProfileEntry e;
      e.digest = c->profile_digest();
      e.profile_json = c->profile().ToJson();
      e.codec = c;
      e.build_seconds = 0.25;
      e.build_threads = 1;
      bool inserted = false;
      if (!(*reg)->Insert(std::move(e), &inserted).ok()) return 1;
    }
    fibquant::v1::Receipt r;
    r.set_profile_digest(codecs[0]->profile_digest());
    r.set_operation("compress");
    r.set_pages(2);
    r.set_compressed_vectors(32);
    if (!(*reg)->AddReceipt(r).ok()) return 1;
    int i = 0;
    for (const char* kind : {"profiles", "receipts"}) {
      for (const auto& f : fs::directory_iterator(dir / kind)) {
        const std::string bytes = ReadFile(f.path());
        const char k = kind[0] == 'p' ? '\0' : '\1';
        Write(out / "registry_fuzz", std::string(kind) + "_" + std::to_string(i++), std::string(1, k) + bytes);
      }
    }
    fs::remove_all(dir);
  }
#else
  (void)frames0;
#endif
  std::printf("seeds written to %s\n", out.c_str());
  return 0;
}
