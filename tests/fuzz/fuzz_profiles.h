// Small real KV profiles shared by the frame fuzzer and the seed generator (make_seeds.cc): cheap
// codebooks (N = 6 so indices 6, 7 and padding bits are reachable), 2 layers x 2 heads x 12 tokens
// x head_dim 16, pages of 8 tokens (so the last page of each head is partial); the last one is
// centred (version-2 frames with a mean section). New profiles go at the end: the seed generator
// refers to the first ones by index.
#ifndef FIBQUANT_TESTS_FUZZ_FUZZ_PROFILES_H_
#define FIBQUANT_TESTS_FUZZ_FUZZ_PROFILES_H_

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "core/kv_codec.h"
#include "core/kv_profile.h"

namespace fibquant::fuzz {

inline std::string FuzzSpec(const std::string& id, const std::string& role, const std::string& dtype,
                            const std::string& axis, int block_dim, const std::string& extra = "") {
  std::string s = "{\"profile_id\":\"" + id + "\",\"shape\":{\"role\":\"" + role +
                  "\",\"attention_kind\":\"mha\",\"batch\":1,\"layers\":2,\"kv_heads\":2,\"query_heads\":2,"
                  "\"tokens\":12,\"head_dim\":16,\"dtype\":\"" + dtype + "\",\"rope_state\":\"" +
                  (role == "key" ? "post_rope" : "not_applicable") + "\"},\"axis_policy\":\"" + axis +
                  "\",\"tokens_per_page\":8";
  if (axis != "raw") {
    s += ",\"fibquant\":{\"block_dim\":" + std::to_string(block_dim) +
         ",\"codebook_size\":6,\"seed\":11,\"training_samples\":400,\"lloyd_restarts\":1,"
         "\"lloyd_iterations\":4}";
  }
  return s + extra + "}";
}

inline std::vector<std::string> FuzzSpecs() {
  return {
      FuzzSpec("fuzz.key.f32.per_token", "key", "f32", "per_token", 4, ",\"protected\":{\"first_tokens_raw\":1}"),
      FuzzSpec("fuzz.value.bf16.per_channel", "value", "bf16", "per_channel", 2),
      FuzzSpec("fuzz.key.f16.role_aware", "key", "f16", "role_aware_kivi_style", 2),
      FuzzSpec("fuzz.value.f16.raw", "value", "f16", "raw", 0),
      // Version-2 frames: centred per-token keys (flag bit 1, a mean section after the raw one).
      FuzzSpec("fuzz.key.f32.centered", "key", "f32", "per_token", 4,
               ",\"protected\":{\"first_tokens_raw\":1},\"centering\":\"page\""),
  };
}

inline std::vector<std::shared_ptr<const KvCodec>> BuildFuzzCodecs() {
  std::vector<std::shared_ptr<const KvCodec>> out;
  for (const std::string& spec : FuzzSpecs()) {
    auto p = KvCompressionProfile::FromSpecJson(spec);
    if (!p.ok()) {
      std::fprintf(stderr, "fuzz spec rejected: %s\n%s\n", p.status().ToString().c_str(), spec.c_str());
      std::abort();
    }
    auto c = KvCodec::Build(*std::move(p), 1);
    if (!c.ok()) {
      std::fprintf(stderr, "fuzz codec build failed: %s\n", c.status().ToString().c_str());
      std::abort();
    }
    out.push_back(*std::move(c));
  }
  return out;
}

}  // namespace fibquant::fuzz

#endif  // FIBQUANT_TESTS_FUZZ_FUZZ_PROFILES_H_
