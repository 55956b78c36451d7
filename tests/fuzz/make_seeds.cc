// Writes the seed corpora of the fuzz targets into <out>/<target>/ (committed under
// tests/fuzz/corpus/): real frames of the fuzz profiles, real profile and KV specs (including the
// shipped server/default-profiles), and (fq_fuzz_seeds, with protobuf) real service requests.
// Run by hand after a format change:
//   build-fuzz/tests/fuzz/fq_fuzz_seeds tests/fuzz/corpus        (every target)
//   build-fuzz/tests/fuzz/fq_fuzz_core_seeds tests/fuzz/corpus   (all but service_fuzz)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "core/half.h"
#include "core/kv_codec.h"
#include "core/profile.h"
#ifdef FQ_SEEDS_WITH_PROTO
#include "fibquant/v1/kv_compression.pb.h"
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
#else
  (void)frames0;
#endif
  std::printf("seeds written to %s\n", out.c_str());
  return 0;
}
