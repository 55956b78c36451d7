// Vector codec throughput and quality: encode and decode of 4096-vector batches of f16 input at
// d = 64 and 128, (k, N) in {(2,16), (4,256), (8,256)}, Haar and Hadamard rotations, fast path,
// plus the reference path for one configuration as a baseline. Counters: items_per_second
// (vectors/s), bytes_per_second (f16 input bytes), and the round trip's rel_mse
// (mean ||x - x^||^2/||x||^2), mse (mean squared element error) and cosine.
// Search/...: the nearest-codeword kernel alone (blocks/s): brute (blocks across lanes), pruned
// (norm bound), structured (the k=2 grid or clustered search where the table builds one).
// Data: USE-Lite keys from FQ_SHARED_DATA_DIR if present, else the tests/data fixture (repeated),
// else Gaussian vectors.
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "benchmark/benchmark.h"
#include "bench/bench_data.h"
#include "core/codec.h"
#include "core/codec_kernels.h"
#include "core/half.h"
#include "core/rng.h"

namespace fibquant {
namespace {

constexpr size_t kBatch = 4096;

struct Data {
  std::string source;
  std::vector<float> f32;     // kBatch x d, the values exactly as the f16 input holds them
  std::vector<uint8_t> f16;   // kBatch x d binary16
};

const Data& GetData(uint32_t d) {
  static std::map<uint32_t, Data> cache;
  auto it = cache.find(d);
  if (it != cache.end()) return it->second;
  Data data;
  const char* layer = d == 64 ? "L0_k.f32" : "L1_k.f32";
  bench::UseLiteSource from;
  std::vector<float> raw = bench::ReadUseLiteF32(layer, d, &from);
  data.source = from == bench::UseLiteSource::kShared ? "use-lite-qkv/" + std::string(layer)
                                                      : "tests/data/" + std::string(layer) + " (repeated)";
  if (raw.size() < d || (d != 64 && d != 128)) {
    Rng rng(7);
    raw.resize(kBatch * d);
    for (auto& x : raw) x = static_cast<float>(rng.Normal());
    data.source = "gaussian";
  }
  const size_t have = raw.size() / d;
  data.f32.resize(kBatch * d);
  for (size_t v = 0; v < kBatch; ++v) {
    std::copy_n(raw.begin() + (v % have) * d, d, data.f32.begin() + v * d);
  }
  data.f16.resize(kBatch * d * 2);
  FromFloat(DType::kF16, data.f32.data(), data.f32.size(), data.f16.data());
  ToFloat(DType::kF16, data.f16.data(), data.f32.size(), data.f32.data());
  return cache.emplace(d, std::move(data)).first->second;
}

std::shared_ptr<const Quantizer> GetQuantizer(uint32_t d, uint32_t k, uint32_t n,
                                              std::string_view rot) {
  static std::map<std::tuple<uint32_t, uint32_t, uint32_t, std::string>,
                  std::shared_ptr<const Quantizer>>
      cache;
  auto key = std::make_tuple(d, k, n, std::string(rot));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto profile = Profile::PaperDefault(d, k, n, /*seed=*/20260512, rot);
  if (!profile.ok()) {
    std::fprintf(stderr, "profile: %s\n", profile.status().ToString().c_str());
    return nullptr;
  }
  auto cb = Codebook::Build(*profile, 0);  // paper defaults: 4 restarts x 25 iterations, 30 N
  if (!cb.ok()) {
    std::fprintf(stderr, "codebook: %s\n", cb.status().ToString().c_str());
    return nullptr;
  }
  auto q = Quantizer::Create(*std::move(cb));
  if (!q.ok()) {
    std::fprintf(stderr, "quantizer: %s\n", q.status().ToString().c_str());
    return nullptr;
  }
  return cache[key] = *q;
}

void SetQuality(benchmark::State& state, const Quantizer& q, const Data& data,
                const std::vector<uint8_t>& codes, CodecPath path) {
  const uint32_t d = q.dim();
  std::vector<float> out(kBatch * d);
  if (!q.DecodeF32(codes, kBatch, out.data(), path).ok()) {
    state.SkipWithError("decode failed");
    return;
  }
  double rel = 0, mse = 0, cos = 0;
  for (size_t v = 0; v < kBatch; ++v) {
    double e = 0, xx = 0, hh = 0, xh = 0;
    for (uint32_t i = 0; i < d; ++i) {
      const double a = data.f32[v * d + i], b = out[v * d + i];
      e += (a - b) * (a - b);
      xx += a * a;
      hh += b * b;
      xh += a * b;
    }
    rel += e / xx;
    mse += e / d;
    cos += xh / std::sqrt(xx * hh);
  }
  state.counters["rel_mse"] = rel / kBatch;
  state.counters["mse"] = mse / kBatch;
  state.counters["cosine"] = cos / kBatch;
  state.counters["code_bytes"] = static_cast<double>(q.code_bytes());
}

void BM_Encode(benchmark::State& state, uint32_t d, uint32_t k, uint32_t n, std::string rot,
               CodecPath path) {
  auto q = GetQuantizer(d, k, n, rot);
  if (!q) return state.SkipWithError("quantizer build failed");
  const Data& data = GetData(d);
  std::vector<uint8_t> codes(kBatch * q->code_bytes());
  for (auto _ : state) {
    const absl::Status st = q->Encode(DType::kF16, data.f16, kBatch, absl::MakeSpan(codes), path);
    if (!st.ok()) return state.SkipWithError(st.ToString().c_str());
    benchmark::DoNotOptimize(codes.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kBatch));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * data.f16.size()));
  SetQuality(state, *q, data, codes, path);
  state.SetLabel(data.source);
}

void BM_Decode(benchmark::State& state, uint32_t d, uint32_t k, uint32_t n, std::string rot,
               CodecPath path) {
  auto q = GetQuantizer(d, k, n, rot);
  if (!q) return state.SkipWithError("quantizer build failed");
  const Data& data = GetData(d);
  std::vector<uint8_t> codes(kBatch * q->code_bytes());
  if (!q->Encode(DType::kF16, data.f16, kBatch, absl::MakeSpan(codes), path).ok()) {
    return state.SkipWithError("encode failed");
  }
  std::vector<uint8_t> out(kBatch * d * 2);
  for (auto _ : state) {
    const absl::Status st = q->Decode(codes, kBatch, DType::kF16, absl::MakeSpan(out), path);
    if (!st.ok()) return state.SkipWithError(st.ToString().c_str());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kBatch));
  // bytes/s counts the f16 vectors produced, so encode and decode rates compare directly.
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * out.size()));
  SetQuality(state, *q, data, codes, path);
  state.SetLabel(data.source);
}

// The nearest-codeword search alone on real rotated blocks (d=128), brute force vs norm pruning and
// AVX2 vs scalar: blocks/s and groups of 8 codewords visited per block. Codebooks use a light
// training (1 restart x 5 iterations, 8 N samples): search speed barely depends on it.
// structured: with prune off, keep the k=2 grid / clustered search the table builds where they
// apply (what the codec runs); without it, the blocks-across-lanes brute force.
// variant: 0 what the table picks; 1 no int16 screening (the f32 brute force, AVX-512 where the
// CPU has it); 2 AVX2 only (no AVX-512 kernels at all: what the codec ran before them, and still
// runs on CPUs without AVX-512 VNNI).
void BM_Search(benchmark::State& state, uint32_t k, uint32_t n, bool prune,
               codec_internal::Isa isa, bool structured = false, int variant = 0) {
  const uint32_t d = 128;
  static std::map<std::pair<uint32_t, uint32_t>, std::shared_ptr<const Quantizer>> cache;
  auto& q = cache[{k, n}];
  if (!q) {
    auto profile = Profile::PaperDefault(d, k, n, 20260512, kRotationHadamard);
    if (!profile.ok()) return state.SkipWithError("profile");
    profile->lloyd_restarts = 1;
    profile->lloyd_iterations = 5;
    profile->training_samples = 8 * n;
    auto cb = Codebook::Build(*profile, 0);
    if (!cb.ok()) return state.SkipWithError("codebook");
    auto qq = Quantizer::Create(*std::move(cb));
    if (!qq.ok()) return state.SkipWithError("quantizer");
    q = *qq;
  }
  const Data& data = GetData(d);
  const size_t vectors = 1024;
  std::vector<float> u(vectors * d), y(vectors * d);
  for (size_t v = 0; v < vectors; ++v) {
    double s = 0;
    for (uint32_t i = 0; i < d; ++i) s += static_cast<double>(data.f32[v * d + i]) * data.f32[v * d + i];
    for (uint32_t i = 0; i < d; ++i) u[v * d + i] = static_cast<float>(data.f32[v * d + i] / std::sqrt(s));
  }
  q->rotation().ApplyBatch(u.data(), y.data(), vectors);
  const size_t blocks = vectors * (d / k);
  const auto& cw = q->codebook().codewords();
  auto table = codec_internal::SearchTable::Build(cw.data(), n, k, prune);
  if (!structured) table.DisableClustersForTesting();
  if (variant >= 1) table.DisableScreeningForTesting();
  codec_internal::DisableAvx512ForTesting(variant == 2);
  std::vector<uint32_t> out(blocks);
  codec_internal::SearchTable::ResetGroupsVisitedOnThisThread();
  for (auto _ : state) {
    table.Nearest(y.data(), blocks, out.data(), isa);
    benchmark::DoNotOptimize(out.data());
  }
  codec_internal::DisableAvx512ForTesting(false);
  state.counters["screen_fallback_frac"] =
      static_cast<double>(codec_internal::SearchTable::ScreenFallbacksOnThisThread()) /
      static_cast<double>(state.iterations() * blocks);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * blocks));
  state.counters["groups_per_block"] =
      static_cast<double>(codec_internal::SearchTable::GroupsVisitedOnThisThread()) /
      static_cast<double>(state.iterations() * blocks);
  state.counters["groups"] = table.group_count();
  state.counters["cost_model_prunes"] = codec_internal::SearchTable::PruningPays(cw.data(), n, k);
}

void RegisterAll() {
  using codec_internal::Isa;
  struct SearchCase {
    uint32_t k, n;
  };
  for (SearchCase c : {SearchCase{2, 16}, SearchCase{2, 256}, SearchCase{2, 1024}, SearchCase{4, 256},
                       SearchCase{4, 4096}, SearchCase{8, 256}, SearchCase{8, 4096}}) {
    for (bool prune : {false, true}) {
      const std::string name =
          absl::StrCat("Search/avx2/k", c.k, "/N", c.n, prune ? "/pruned" : "/brute");
      benchmark::RegisterBenchmark(name.c_str(), BM_Search, c.k, c.n, prune, Isa::kAvx2, false, 0)
          ->Unit(benchmark::kMicrosecond);
    }
    const std::string structured = absl::StrCat("Search/avx2/k", c.k, "/N", c.n, "/structured");
    benchmark::RegisterBenchmark(structured.c_str(), BM_Search, c.k, c.n, false, Isa::kAvx2, true, 0)
        ->Unit(benchmark::kMicrosecond);
  }
  for (uint32_t n : {256u, 4096u}) {
    benchmark::RegisterBenchmark(absl::StrCat("Search/avx2/k4/N", n, "/brute_f32").c_str(), BM_Search,
                                 4u, n, false, Isa::kAvx2, false, 1)
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(absl::StrCat("Search/avx2/k4/N", n, "/brute_avx2only").c_str(),
                                 BM_Search, 4u, n, false, Isa::kAvx2, false, 2)
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(absl::StrCat("Search/avx2/k4/N", n, "/structured_avx2only").c_str(),
                                 BM_Search, 4u, n, false, Isa::kAvx2, true, 2)
        ->Unit(benchmark::kMicrosecond);
  }
  benchmark::RegisterBenchmark("Search/scalar/k4/N256/brute", BM_Search, 4u, 256u, false,
                               Isa::kScalar, false, 0)
      ->Unit(benchmark::kMicrosecond);

  struct Kn {
    uint32_t k, n;
  };
  const std::pair<std::string, std::string_view> rots[] = {{"haar", kRotationHaarQr},
                                                           {"hadamard", kRotationHadamard}};
  for (uint32_t d : {64u, 128u}) {
    for (Kn kn : {Kn{2, 16}, Kn{4, 256}, Kn{8, 256}}) {
      for (const auto& [rname, rot] : rots) {
        const std::string cfg = absl::StrCat("d", d, "/k", kn.k, "/N", kn.n, "/", rname);
        benchmark::RegisterBenchmark(("Encode/fast/" + cfg).c_str(), BM_Encode, d, kn.k, kn.n,
                                     std::string(rot), CodecPath::kFast)
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("Decode/fast/" + cfg).c_str(), BM_Decode, d, kn.k, kn.n,
                                     std::string(rot), CodecPath::kFast)
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  // Baseline: the f64 reference path for one configuration.
  benchmark::RegisterBenchmark("Encode/reference/d128/k4/N256/haar", BM_Encode, 128u, 4u, 256u,
                               std::string(kRotationHaarQr), CodecPath::kReference)
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("Decode/reference/d128/k4/N256/haar", BM_Decode, 128u, 4u, 256u,
                               std::string(kRotationHaarQr), CodecPath::kReference)
      ->Unit(benchmark::kMillisecond);
}

}  // namespace
}  // namespace fibquant

int main(int argc, char** argv) {
  fibquant::RegisterAll();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
