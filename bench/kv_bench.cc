// KV page compression benchmarks on real K/V (tests/data/L1_*.f32, USE-Lite layer 1, head_dim 128):
// compress (with and without quality metrics), full-frame decode and single-vector random access,
// for the per-token and per-channel axes. Reports pages/s (items), input bytes/s and quality counters.
#include <benchmark/benchmark.h>

#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/kv_codec.h"

namespace fibquant {
namespace {

constexpr uint32_t kT = 64, kH = 4, kD = 128, kTpp = 32;

std::vector<float> Load(const std::string& name) {
  std::ifstream f(std::string(FQ_TEST_DATA_DIR) + "/" + name, std::ios::binary);
  std::vector<float> raw(size_t{kT} * kH * kD);
  f.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size() * 4));
  if (!f) return {};
  std::vector<float> out(raw.size());  // [T, H, D] -> [H, T, D]
  for (uint32_t t = 0; t < kT; ++t)
    for (uint32_t h = 0; h < kH; ++h)
      std::memcpy(&out[(size_t{h} * kT + t) * kD], &raw[(size_t{t} * kH + h) * kD], kD * 4);
  return out;
}

std::shared_ptr<const KvCodec> Codec(const std::string& axis, uint32_t tpp) {
  static std::map<std::string, std::shared_ptr<const KvCodec>> cache;
  const std::string key = axis + std::to_string(tpp);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  nlohmann::json j;
  j["profile_id"] = "bench.key." + axis;
  j["shape"] = {{"role", "key"}, {"attention_kind", "mha"}, {"batch", 1}, {"layers", 1}, {"kv_heads", kH},
                {"query_heads", kH}, {"tokens", kT}, {"head_dim", kD}, {"dtype", "f32"}, {"rope_state", "pre_rope"}};
  j["axis_policy"] = axis;
  j["tokens_per_page"] = tpp;
  j["fibquant"] = {{"block_dim", 4}, {"codebook_size", 256}, {"seed", 2026}};  // paper defaults: 2 bits/coord
  auto p = KvCompressionProfile::FromSpecJson(j.dump());
  if (!p.ok()) return nullptr;
  auto c = KvCodec::Build(*p, 0);
  if (!c.ok()) return nullptr;
  cache[key] = *c;
  return *c;
}

struct Inputs {
  std::vector<float> k, q;
};
const Inputs& Data() {
  static Inputs in{Load("L1_k.f32"), Load("L1_q.f32")};
  return in;
}

KvPageInput Page(uint32_t head, uint32_t tpp, bool queries) {
  const Inputs& d = Data();
  KvPageInput in;
  in.coords = {0, 0, head, 0, tpp};
  in.dtype = DType::kF32;
  in.data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(d.k.data() + size_t{head} * kT * kD),
                                      size_t{tpp} * kD * 4);
  if (queries) in.queries = absl::Span<const float>(d.q.data() + size_t{head} * kT * kD, size_t{kT} * kD);
  return in;
}

void BM_CompressPage(benchmark::State& state, std::string axis, uint32_t tpp, bool metrics, CodecPath path) {
  auto c = Codec(axis, tpp);
  if (!c || Data().k.empty()) {
    state.SkipWithError("codec or fixture unavailable");
    return;
  }
  KvCompressOptions opt;
  opt.compute_metrics = metrics;
  opt.path = path;
  uint32_t head = 0;
  double ratio = 0, cos = 0, tv = 0;
  size_t n = 0;
  for (auto _ : state) {
    auto cp = c->CompressPage(Page(head, tpp, true), opt);
    if (!cp.ok()) {
      state.SkipWithError(std::string(cp.status().message()).c_str());
      return;
    }
    ratio += static_cast<double>(cp->input_bytes) / static_cast<double>(cp->frame.size());
    if (cp->metrics) {
      cos += cp->metrics->cosine_similarity;
      tv += *cp->metrics->attention_tv;
    }
    ++n;
    benchmark::DoNotOptimize(cp->frame.data());
    head = (head + 1) % kH;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * tpp * kD * 4);
  state.counters["compression_ratio"] = ratio / static_cast<double>(n);
  if (metrics) {
    state.counters["recon_cosine"] = cos / static_cast<double>(n);
    state.counters["attention_tv"] = tv / static_cast<double>(n);
  }
}

void BM_DecodeFrame(benchmark::State& state, std::string axis, uint32_t tpp, CodecPath path) {
  auto c = Codec(axis, tpp);
  if (!c || Data().k.empty()) {
    state.SkipWithError("codec or fixture unavailable");
    return;
  }
  KvCompressOptions opt;
  opt.compute_metrics = false;
  auto cp = c->CompressPage(Page(0, tpp, false), opt);
  const auto frame = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(cp->frame.data()), cp->frame.size());
  for (auto _ : state) {
    auto d = c->DecodeFrame(frame, DType::kF16, path);
    benchmark::DoNotOptimize(d->data.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * tpp * kD * 4);  // f32-equivalent values
  state.counters["frame_bytes"] = static_cast<double>(cp->frame.size());
}

void BM_DecodeVector(benchmark::State& state) {
  auto c = Codec("per_token", kTpp);
  if (!c || Data().k.empty()) {
    state.SkipWithError("codec or fixture unavailable");
    return;
  }
  KvCompressOptions opt;
  opt.compute_metrics = false;
  auto cp = c->CompressPage(Page(0, kTpp, false), opt);
  const auto frame = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(cp->frame.data()), cp->frame.size());
  uint32_t i = 0;
  for (auto _ : state) {
    auto v = c->DecodeVector(frame, i, DType::kF32);
    benchmark::DoNotOptimize(v->data());
    i = (i + 7) % kTpp;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kD * 4);
}

BENCHMARK_CAPTURE(BM_CompressPage, per_token_metrics_fast, std::string("per_token"), kTpp, true, CodecPath::kFast);
BENCHMARK_CAPTURE(BM_CompressPage, per_token_nometrics_fast, std::string("per_token"), kTpp, false, CodecPath::kFast);
BENCHMARK_CAPTURE(BM_CompressPage, per_token_nometrics_reference, std::string("per_token"), kTpp, false,
                  CodecPath::kReference);
BENCHMARK_CAPTURE(BM_CompressPage, per_channel_metrics_fast, std::string("per_channel"), kT, true, CodecPath::kFast);
BENCHMARK_CAPTURE(BM_DecodeFrame, per_token_fast, std::string("per_token"), kTpp, CodecPath::kFast);
BENCHMARK_CAPTURE(BM_DecodeFrame, per_channel_fast, std::string("per_channel"), kT, CodecPath::kFast);
BENCHMARK(BM_DecodeVector);

}  // namespace
}  // namespace fibquant

BENCHMARK_MAIN();
