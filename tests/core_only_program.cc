// Built against fibquant::core alone (see core_link_check.sh): builds a small codebook, encodes and
// decodes one vector and parses a KV profile spec, so the linker must resolve every core module
// (profile, rotation, codebook, codec, kv) without any network-stack library.
#include <cstdio>
#include <vector>

#include "core/codebook.h"
#include "core/codec.h"
#include "core/kv_profile.h"
#include "core/profile.h"

int main() {
  auto profile = fibquant::Profile::PaperDefault(8, 2, 8, 7);
  if (!profile.ok()) return 1;
  profile->training_samples = 64;
  profile->lloyd_restarts = 1;
  profile->lloyd_iterations = 2;
  auto codebook = fibquant::Codebook::Build(*profile, 1);
  if (!codebook.ok()) return 2;
  auto quantizer = fibquant::Quantizer::Create(*codebook);
  if (!quantizer.ok()) return 3;
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<uint8_t> code((*quantizer)->code_bytes());
  const auto* bytes = reinterpret_cast<const uint8_t*>(x.data());
  if (!(*quantizer)->Encode(fibquant::DType::kF32, {bytes, 32}, 1, absl::MakeSpan(code),
                            fibquant::CodecPath::kReference).ok()) {
    return 4;
  }
  auto kv = fibquant::KvCompressionProfile::FromSpecJson("{}");  // malformed on purpose
  std::printf("%s %s\n", codebook->digest().c_str(), kv.ok() ? "?" : "kv-spec-rejected");
  return kv.ok() ? 5 : 0;
}
