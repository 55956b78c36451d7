// Speed of FibQuant against the baselines at equal code bytes, one thread, f16 input and output
// (bench/baselines.h): encode and decode of 4096-vector batches at d = 128 (USE-Lite layer-1 keys,
// falls back to tests/data repeated, then Gaussian). Faiss PQ/SQ are trained on the other key
// vectors of the same file (not the timed ones) and run with one OpenMP thread.
// Scaling/...: FibQuant encode cost against head_dim (Gaussian data), codebook size (k, N) and KV
// page size (KvCodec::CompressPage, per-token pages of T tokens, with and without metrics).
// Codebooks: max(30 N, 2^15) training samples, 4 restarts (1 for N >= 4096), as in
// fidelity_report; set FQ_CODEBOOK_CACHE=<dir> to reuse the report's cached codebooks.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "benchmark/benchmark.h"
#include "bench/baselines.h"
#include "bench/bench_data.h"
#include "core/codec_kernels.h"
#include "core/kv_codec.h"
#include "core/rng.h"

namespace fibquant::bench {
namespace {

constexpr size_t kBatch = 4096;

struct Data {
  std::string source;
  std::vector<float> f32;     // kBatch x d timed vectors (f16-rounded)
  std::vector<uint8_t> f16;   // the same as binary16
  std::vector<float> train;   // other vectors, for the data-calibrated baselines
};

// d = 128: USE-Lite L1 keys; other d: Gaussian with a per-token scale (scaling runs only).
const Data& GetData(uint32_t d) {
  static std::map<uint32_t, Data> cache;
  if (auto it = cache.find(d); it != cache.end()) return it->second;
  Data data;
  std::vector<float> raw;
  if (d == 128) {
    UseLiteSource from;
    raw = ReadUseLiteF32("L1_k.f32", d, &from);
    data.source = from == UseLiteSource::kShared ? "use-lite L1_k" : "tests/data L1_k (repeated)";
  }
  if (raw.size() < d) {
    Rng rng(7);
    raw.resize(2 * kBatch * d);
    for (auto& x : raw) x = static_cast<float>(rng.Normal());
    data.source = "gaussian";
  }
  const size_t have = raw.size() / d;
  data.f32.resize(kBatch * d);
  for (size_t v = 0; v < kBatch; ++v) std::copy_n(raw.begin() + (v % have) * d, d, data.f32.begin() + v * d);
  if (have > kBatch) {
    data.train.assign(raw.begin() + kBatch * d, raw.begin() + have * d);
  } else {
    data.train.assign(raw.begin(), raw.begin() + have * d);  // fixture: trains on the timed vectors
  }
  data.f16.resize(kBatch * d * 2);
  FromFloat(DType::kF16, data.f32.data(), data.f32.size(), data.f16.data());
  ToFloat(DType::kF16, data.f16.data(), data.f32.size(), data.f32.data());
  return cache.emplace(d, std::move(data)).first->second;
}

FibOptions Options(uint32_t n, const std::string& rot) {
  FibOptions o;
  o.rotation = rot;
  o.training_samples = std::max<uint32_t>(30 * n, 1u << 15);
  if (n >= 4096) o.restarts = 1;
  if (const char* c = std::getenv("FQ_CODEBOOK_CACHE")) o.cache_dir = c;
  return o;
}

// Codecs by id, built once. id forms: fib:d:k:N:rot, absmax:d:bits, f16:d, bf16:d, pq:d:m:nbits, sq:d:type.
const VectorCodec* GetCodec(const std::string& id) {
  static std::map<std::string, std::unique_ptr<VectorCodec>> cache;
  if (auto it = cache.find(id); it != cache.end()) return it->second.get();
  std::vector<std::string> f;
  size_t s = 0;
  for (size_t p; (p = id.find(':', s)) != std::string::npos; s = p + 1) f.push_back(id.substr(s, p - s));
  f.push_back(id.substr(s));
  const uint32_t d = static_cast<uint32_t>(std::stoul(f[1]));
  std::unique_ptr<VectorCodec> c;
  if (f[0] == "fib") {
    const uint32_t n = static_cast<uint32_t>(std::stoul(f[3]));
    auto r = MakeFibQuant(d, static_cast<uint32_t>(std::stoul(f[2])), n, Options(n, f[4]));
    if (!r.ok()) {
      std::fprintf(stderr, "%s: %s\n", id.c_str(), r.status().ToString().c_str());
      return nullptr;
    }
    c = std::move(*r);
  } else if (f[0] == "absmax") {
    c = MakeAbsmaxInt(d, std::stoi(f[2]));
  } else if (f[0] == "f16" || f[0] == "bf16") {
    c = MakeFloat16(d, f[0] == "f16" ? DType::kF16 : DType::kBF16);
  } else {
    SetFaissThreads(1);
    auto r = f[0] == "pq" ? MakeFaissPq(d, static_cast<uint32_t>(std::stoul(f[2])),
                                        static_cast<uint32_t>(std::stoul(f[3])))
                          : MakeFaissSq(d, f[2]);
    if (!r.ok()) return nullptr;
    c = std::move(*r);
    const Data& data = GetData(d);
    if (!c->Train(data.train.data(), data.train.size() / d).ok()) return nullptr;
  }
  return (cache[id] = std::move(c)).get();
}

void Quality(benchmark::State& state, const VectorCodec& c, const Data& data, const std::vector<uint8_t>& codes) {
  const uint32_t d = c.dim();
  std::vector<float> out(kBatch * d);
  if (!c.Decode(codes.data(), kBatch, DType::kF32, reinterpret_cast<uint8_t*>(out.data())).ok()) return;
  double rel = 0;
  for (size_t v = 0; v < kBatch; ++v) {
    double e = 0, xx = 0;
    for (uint32_t i = 0; i < d; ++i) {
      const double a = data.f32[v * d + i], b = out[v * d + i];
      e += (a - b) * (a - b);
      xx += a * a;
    }
    rel += e / xx;
  }
  state.counters["rel_mse"] = rel / kBatch;
  state.counters["code_B"] = static_cast<double>(c.code_bytes());
  state.counters["ratio_fp16"] = 2.0 * d / static_cast<double>(c.code_bytes());
}

void BM_Encode(benchmark::State& state, std::string id) {
  const VectorCodec* c = GetCodec(id);
  if (!c) return state.SkipWithError("codec unavailable");
  const Data& data = GetData(c->dim());
  std::vector<uint8_t> codes(kBatch * c->code_bytes());
  for (auto _ : state) {
    const absl::Status st = c->Encode(DType::kF16, data.f16.data(), kBatch, codes.data());
    if (!st.ok()) return state.SkipWithError(st.ToString().c_str());
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kBatch));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * data.f16.size()));
  Quality(state, *c, data, codes);
  state.SetLabel(c->name() + " | " + data.source);
}

// The same encode with the AVX-512 search kernels switched off (the AVX2 path every x86-64 CPU
// with AVX2 runs): the "before" of the issue-16 k = 4 search work, in the same run.
void BM_EncodeAvx2Only(benchmark::State& state, std::string id) {
  codec_internal::DisableAvx512ForTesting(true);
  BM_Encode(state, std::move(id));
  codec_internal::DisableAvx512ForTesting(false);
}

void BM_Decode(benchmark::State& state, std::string id) {
  const VectorCodec* c = GetCodec(id);
  if (!c) return state.SkipWithError("codec unavailable");
  const Data& data = GetData(c->dim());
  std::vector<uint8_t> codes(kBatch * c->code_bytes());
  if (!c->Encode(DType::kF16, data.f16.data(), kBatch, codes.data()).ok()) return state.SkipWithError("encode");
  std::vector<uint8_t> out(kBatch * c->dim() * 2);
  for (auto _ : state) {
    const absl::Status st = c->Decode(codes.data(), kBatch, DType::kF16, out.data());
    if (!st.ok()) return state.SkipWithError(st.ToString().c_str());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kBatch));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * out.size()));
  Quality(state, *c, data, codes);
  state.SetLabel(c->name() + " | " + data.source);
}

// KV page compression cost against page size: per-token pages of `tpp` tokens of USE-Lite L1 keys
// (head 0), FibQuant k=4 N=256 (paper-default codebook, Haar), f32 input.
void BM_PageSize(benchmark::State& state, uint32_t tpp, bool metrics) {
  constexpr uint32_t kD = 128, kH = 4;
  static std::vector<float> k = ReadF32(UseLiteDir(UseLiteSource::kShared) + "L1_k.f32");
  static std::vector<float> q = ReadF32(UseLiteDir(UseLiteSource::kShared) + "L1_q.f32");
  const uint32_t tokens = static_cast<uint32_t>(k.size() / (kD * kH));
  if (tokens < tpp) return state.SkipWithError("use-lite data absent or too short");
  static std::map<uint32_t, std::shared_ptr<const KvCodec>> codecs;
  static std::vector<float> head0_k, head0_q;
  if (head0_k.empty()) {
    head0_k.resize(size_t{tokens} * kD);
    head0_q.resize(size_t{tokens} * kD);
    for (uint32_t t = 0; t < tokens; ++t) {
      std::memcpy(&head0_k[size_t{t} * kD], &k[size_t{t} * kH * kD], kD * 4);
      std::memcpy(&head0_q[size_t{t} * kD], &q[size_t{t} * kH * kD], kD * 4);
    }
  }
  auto& codec = codecs[tpp];
  if (!codec) {
    nlohmann::json j;
    j["profile_id"] = "bench.pages";
    j["shape"] = {{"role", "key"}, {"attention_kind", "mha"}, {"batch", 1}, {"layers", 1}, {"kv_heads", 1},
                  {"query_heads", 1}, {"tokens", tokens}, {"head_dim", kD}, {"dtype", "f32"},
                  {"rope_state", "pre_rope"}};
    j["axis_policy"] = "per_token";
    j["tokens_per_page"] = tpp;
    j["fibquant"] = {{"block_dim", 4}, {"codebook_size", 256}, {"seed", 2026}};
    auto p = KvCompressionProfile::FromSpecJson(j.dump());
    if (!p.ok()) return state.SkipWithError(std::string(p.status().message()).c_str());
    auto c = KvCodec::Build(*p, 0);
    if (!c.ok()) return state.SkipWithError(std::string(c.status().message()).c_str());
    codec = *c;
  }
  KvCompressOptions opt;
  opt.compute_metrics = metrics;
  const uint32_t pages = tokens / tpp;
  uint32_t page = 0;
  for (auto _ : state) {
    KvPageInput in;
    in.coords = {0, 0, 0, page * tpp, tpp};
    in.dtype = DType::kF32;
    in.data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(&head0_k[size_t{page} * tpp * kD]),
                                        size_t{tpp} * kD * 4);
    if (metrics) in.queries = absl::Span<const float>(&head0_q[size_t{page} * tpp * kD], size_t{tpp} * kD);
    auto cp = codec->CompressPage(in, opt);
    if (!cp.ok()) return state.SkipWithError(std::string(cp.status().message()).c_str());
    benchmark::DoNotOptimize(cp->frame.data());
    page = (page + 1) % pages;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * tpp);  // vectors/s
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * tpp * kD * 4);
  state.counters["tokens_per_page"] = tpp;
}

void Register() {
  // Equal code bytes at d = 128: 34 B (2 bits/coord + fp16 norm) vs 32 B PQ; 18 B vs 16 B PQ;
  // 66 B (4 bits) vs int4 absmax 66 B and SQ4 64 B; int8 130 B vs SQ8 128 B; 256 B fp16/bf16.
  std::vector<std::string> ids = {
      "fib:128:4:256:haar", "fib:128:4:256:hadamard", "fib:128:2:16:haar", "fib:128:2:16:hadamard",
      "fib:128:1:4:haar", "fib:128:1:4:hadamard", "pq:128:32:8", "pq:128:64:4",
      "fib:128:8:256:haar", "fib:128:8:256:hadamard", "pq:128:16:8",
      "fib:128:2:256:haar", "fib:128:2:256:hadamard", "fib:128:1:16:hadamard", "absmax:128:4", "sq:128:4bit", "pq:128:64:8",
      "absmax:128:8", "sq:128:8bit", "bf16:128", "f16:128"};
  for (const std::string& id : ids) {
    if ((id.rfind("pq:", 0) == 0 || id.rfind("sq:", 0) == 0) && !HaveFaiss()) continue;
    benchmark::RegisterBenchmark(("Encode/" + id).c_str(), BM_Encode, id);
    benchmark::RegisterBenchmark(("Decode/" + id).c_str(), BM_Decode, id);
  }
  for (const char* id : {"fib:128:4:256:hadamard", "fib:128:4:4096:haar", "fib:128:8:256:hadamard"}) {
    benchmark::RegisterBenchmark((std::string("Avx2only/Encode/") + id).c_str(), BM_EncodeAvx2Only,
                                 std::string(id));
  }
  // Scaling: head_dim (Gaussian data) at k=4 N=256 for both rotations, including head_dims that are
  // not powers of two (two-window Hadamard: 80, 96, 100, 112) and block sizes that do not divide
  // head_dim (k=8 at d=100: padded to 104; k=3 at d=128: padded to 129).
  for (const char* rot : {"haar", "hadamard"}) {
    for (uint32_t d : {64u, 80u, 96u, 100u, 112u, 256u, 512u}) {
      const std::string id = "fib:" + std::to_string(d) + ":4:256:" + rot;
      benchmark::RegisterBenchmark(("Scaling/head_dim/Encode/" + id).c_str(), BM_Encode, id);
      benchmark::RegisterBenchmark(("Scaling/head_dim/Decode/" + id).c_str(), BM_Decode, id);
    }
  }
  for (const char* id : {"fib:100:8:256:hadamard", "fib:104:8:256:hadamard", "fib:128:3:256:hadamard"}) {
    benchmark::RegisterBenchmark((std::string("Scaling/padding/Encode/") + id).c_str(), BM_Encode, id);
    benchmark::RegisterBenchmark((std::string("Scaling/padding/Decode/") + id).c_str(), BM_Decode, id);
  }
  // Scaling: codebook size at d = 128 (Haar; d = 128 data).
  for (auto [k, n] : std::vector<std::pair<uint32_t, uint32_t>>{
           {2, 16}, {2, 64}, {2, 256}, {2, 1024}, {4, 16}, {4, 64}, {4, 1024}, {4, 4096}, {8, 16}, {8, 4096}}) {
    const std::string id = "fib:128:" + std::to_string(k) + ":" + std::to_string(n) + ":haar";
    benchmark::RegisterBenchmark(("Scaling/codebook/Encode/" + id).c_str(), BM_Encode, id);
  }
  for (uint32_t tpp : {16u, 64u, 256u, 1024u}) {
    for (bool m : {false, true}) {
      benchmark::RegisterBenchmark(("Scaling/page/" + std::to_string(tpp) + (m ? "/metrics" : "/nometrics")).c_str(),
                                   BM_PageSize, tpp, m);
    }
  }
}

}  // namespace
}  // namespace fibquant::bench

int main(int argc, char** argv) {
  fibquant::bench::Register();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
