// Rate-distortion and attention-fidelity report: FibQuant against the codecs users would pick
// instead, on the same vectors in the same run. Writes one CSV row per (dataset, method).
//
// Datasets:
//  - use-lite L0 (d=64) and L1 (d=128): real Q/K/V from ../shared/data/use-lite-qkv
//    (falls back to tests/data, 64 tokens, with a message; skipped with a message if both are absent).
//    Split by chunk: the first half of the chunks trains the data-calibrated baselines (Faiss),
//    every method is evaluated on the second half.
//  - synthetic-outliers (d=128): LLM-like keys with outlier channels (generator below, fixed seed).
// Protocol: keys AND values are compressed (each vector of each head separately, as the service
// does); queries are the data's queries (uncompressed); attention is softmax(scale q.k) within
// each chunk (bidirectional, all tokens of the chunk), per head.
// Metrics (means over all test queries / vectors):
//  key_rel_mse, value_rel_mse = ||x - x^||^2 / ||x||^2 per vector; key_cos, value_cos per vector;
//  key_mse, value_mse per element; attn_out_cos = cos(sum_t p_t v_t, sum_t p^_t v^_t) (p^ from
//  compressed keys, v^ compressed values); attn_tv = 1/2 sum |p - p^|; top8_agree = |top8(p) ∩
//  top8(p^)|/8; value_agg_mse = mean over dims of (sum_t p_t v_t - sum_t p_t v^_t)^2 (original p).
// ratio_vs_fp16 = 2 d / code_bytes (everything stored per vector counted: FibQuant's fp16 norm,
// absmax scale; Faiss codes have no per-vector side information).
//
// Usage: fidelity_report [--out=FILE.csv] [--cache-dir=DIR] [--quick]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/baselines.h"
#include "bench/bench_data.h"
#include "core/rng.h"

namespace fibquant::bench {
namespace {

struct Chunk {
  size_t offset = 0, n = 0;
};

struct Dataset {
  std::string name;
  uint32_t d = 0, heads = 0;
  size_t tokens = 0;
  double scale = 0;
  std::vector<float> q, k, v;  // [tokens, heads, d]
  std::vector<Chunk> chunks;
  size_t train_tokens = 0;     // tokens [0, train_tokens) train; the rest are test chunks
};

// Loads layer `layer` of USE-Lite; empty name if unavailable.
Dataset LoadUseLite(int layer) {
  Dataset ds;
  ds.d = layer == 0 ? 64 : 128;
  ds.heads = 4;
  ds.scale = 1.0 / std::sqrt(static_cast<double>(ds.d));
  const std::string shared = UseLiteDir(UseLiteSource::kShared);
  std::ifstream hj(shared + "header.json");
  if (hj) {
    nlohmann::json h = nlohmann::json::parse(hj, nullptr, false);
    if (ReadUseLiteQkv(UseLiteSource::kShared, layer, &ds.q, &ds.k, &ds.v) && !h.is_discarded()) {
      ds.name = "use-lite L";
      ds.name += std::to_string(layer);
      ds.tokens = ds.q.size() / (ds.heads * ds.d);
      ds.scale = h["layers"][layer]["scale"].get<double>();
      for (const auto& c : h["chunks"]) ds.chunks.push_back({c["token_offset"].get<size_t>(), c["n_tokens"].get<size_t>()});
      const size_t half = ds.chunks.size() / 2;
      ds.train_tokens = ds.chunks[half].offset;
      ds.chunks.erase(ds.chunks.begin(), ds.chunks.begin() + static_cast<std::ptrdiff_t>(half));
      return ds;
    }
  }
  std::fprintf(stderr, "fidelity_report: %s absent; falling back to tests/data (64 tokens)\n", shared.c_str());
  if (!ReadUseLiteQkv(UseLiteSource::kFixture, layer, &ds.q, &ds.k, &ds.v)) {
    std::fprintf(stderr, "fidelity_report: tests/data layer %d absent too; skipping it\n", layer);
    return Dataset{};
  }
  ds.name = "use-lite L";
  ds.name += std::to_string(layer);
  ds.name += " (tests/data fixture)";
  ds.tokens = ds.q.size() / (ds.heads * ds.d);
  ds.train_tokens = ds.tokens / 2;  // first 32 tokens train Faiss, last 32 are one test chunk
  ds.chunks.push_back({ds.train_tokens, ds.tokens - ds.train_tokens});
  return ds;
}

// Synthetic LLM-like K/V/Q with outlier channels (seeded, documented in docs/BENCHMARKS.md):
// d = 128, 4 heads, 16 chunks of 128 tokens (8 train, 8 test). Per head, 4 key outlier channels
// chosen at random carry a fixed-sign offset of magnitude 10 and standard deviation 6; the other
// channels are N(0, 1); every key is multiplied by a per-token factor exp(0.25 z). Queries are
// N(0, 1) with standard deviation 2 on the key outlier channels (so outlier channels matter for
// the logits). Values are N(0, 1) with 2 outlier channels of standard deviation 5 per head.
Dataset MakeSynthetic(uint32_t d, uint64_t seed) {
  Dataset ds;
  ds.name = "synthetic-outliers d=" + std::to_string(d);
  ds.d = d;
  ds.heads = 4;
  ds.scale = 1.0 / std::sqrt(static_cast<double>(d));
  const size_t chunk = 128, nchunks = 16;
  ds.tokens = chunk * nchunks;
  Rng rng(seed);
  std::vector<std::vector<double>> kmean(ds.heads, std::vector<double>(d, 0)),
      ksd(ds.heads, std::vector<double>(d, 1)), qsd(ds.heads, std::vector<double>(d, 1)),
      vsd(ds.heads, std::vector<double>(d, 1));
  for (uint32_t h = 0; h < ds.heads; ++h) {
    for (int o = 0; o < 4; ++o) {
      const uint32_t c = static_cast<uint32_t>(rng.NextU64() % d);
      kmean[h][c] = rng.NextDouble() < 0.5 ? -10 : 10;
      ksd[h][c] = 6;
      qsd[h][c] = 2;
    }
    for (int o = 0; o < 2; ++o) vsd[h][rng.NextU64() % d] = 5;
  }
  const size_t total = ds.tokens * ds.heads * d;
  ds.q.resize(total);
  ds.k.resize(total);
  ds.v.resize(total);
  for (size_t t = 0; t < ds.tokens; ++t) {
    for (uint32_t h = 0; h < ds.heads; ++h) {
      const size_t base = (t * ds.heads + h) * d;
      const double f = std::exp(0.25 * rng.Normal());
      for (uint32_t i = 0; i < d; ++i) {
        ds.k[base + i] = static_cast<float>(f * (kmean[h][i] + ksd[h][i] * rng.Normal()));
        ds.q[base + i] = static_cast<float>(qsd[h][i] * rng.Normal());
        ds.v[base + i] = static_cast<float>(vsd[h][i] * rng.Normal());
      }
    }
  }
  ds.train_tokens = chunk * nchunks / 2;
  for (size_t c = nchunks / 2; c < nchunks; ++c) ds.chunks.push_back({c * chunk, chunk});
  return ds;
}

struct Row {
  double key_mse = 0, key_rel = 0, key_cos = 0, val_mse = 0, val_rel = 0, val_cos = 0;
  double out_cos = 0, tv = 0, top8 = 0, agg_mse = 0;
  double encode_s = 0, build_s = 0;
};

void VectorStats(const float* x, const float* y, size_t n, uint32_t d, double* mse, double* rel, double* cos) {
  double m = 0, r = 0, c = 0;
  for (size_t v = 0; v < n; ++v) {
    double e = 0, xx = 0, yy = 0, xy = 0;
    for (uint32_t i = 0; i < d; ++i) {
      const double a = x[v * d + i], b = y[v * d + i];
      e += (a - b) * (a - b);
      xx += a * a;
      yy += b * b;
      xy += a * b;
    }
    m += e / d;
    r += xx > 0 ? e / xx : 0;
    c += (xx > 0 && yy > 0) ? xy / std::sqrt(xx * yy) : (xx == yy ? 1 : 0);
  }
  *mse = m / static_cast<double>(n);
  *rel = r / static_cast<double>(n);
  *cos = c / static_cast<double>(n);
}

void Softmax(std::vector<double>& l) {
  const double mx = *std::max_element(l.begin(), l.end());
  double s = 0;
  for (double& x : l) s += (x = std::exp(x - mx));
  for (double& x : l) x /= s;
}

std::vector<size_t> TopK(const std::vector<double>& p, size_t k) {
  std::vector<size_t> idx(p.size());
  std::iota(idx.begin(), idx.end(), 0);
  k = std::min(k, p.size());
  std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(),
                    [&](size_t a, size_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

// Evaluates reconstructed test keys/values (same layout as the dataset, test tokens only).
void Attention(const Dataset& ds, const std::vector<float>& khat, const std::vector<float>& vhat, Row* row) {
  const uint32_t d = ds.d, H = ds.heads;
  double out_cos = 0, tv = 0, top8 = 0, agg = 0;
  size_t nq = 0;
  auto at = [&](const std::vector<float>& a, size_t t, uint32_t h) { return &a[(t * H + h) * d]; };
  auto at_hat = [&](const std::vector<float>& a, size_t t, uint32_t h) {
    return &a[((t - ds.train_tokens) * H + h) * d];
  };
  for (const Chunk& c : ds.chunks) {
    for (uint32_t h = 0; h < H; ++h) {
      for (size_t qi = c.offset; qi < c.offset + c.n; ++qi) {
        const float* q = at(ds.q, qi, h);
        std::vector<double> p(c.n), ph(c.n);
        for (size_t j = 0; j < c.n; ++j) {
          const float* k = at(ds.k, c.offset + j, h);
          const float* kh = at_hat(khat, c.offset + j, h);
          double s = 0, sh = 0;
          for (uint32_t i = 0; i < d; ++i) {
            s += static_cast<double>(q[i]) * k[i];
            sh += static_cast<double>(q[i]) * kh[i];
          }
          p[j] = s * ds.scale;
          ph[j] = sh * ds.scale;
        }
        Softmax(p);
        Softmax(ph);
        std::vector<double> o(d, 0), oh(d, 0), op(d, 0);
        double t = 0;
        for (size_t j = 0; j < c.n; ++j) {
          t += std::fabs(p[j] - ph[j]);
          const float* v = at(ds.v, c.offset + j, h);
          const float* vh = at_hat(vhat, c.offset + j, h);
          for (uint32_t i = 0; i < d; ++i) {
            o[i] += p[j] * v[i];
            oh[i] += ph[j] * vh[i];
            op[i] += p[j] * vh[i];
          }
        }
        double oo = 0, hh = 0, oh_ = 0, a = 0;
        for (uint32_t i = 0; i < d; ++i) {
          oo += o[i] * o[i];
          hh += oh[i] * oh[i];
          oh_ += o[i] * oh[i];
          a += (o[i] - op[i]) * (o[i] - op[i]);
        }
        out_cos += (oo > 0 && hh > 0) ? oh_ / std::sqrt(oo * hh) : 1;
        tv += 0.5 * t;
        agg += a / d;
        const auto t1 = TopK(p, 8), t2 = TopK(ph, 8);
        std::vector<size_t> common;
        std::set_intersection(t1.begin(), t1.end(), t2.begin(), t2.end(), std::back_inserter(common));
        top8 += static_cast<double>(common.size()) / static_cast<double>(t1.size());
        ++nq;
      }
    }
  }
  row->out_cos = out_cos / static_cast<double>(nq);
  row->tv = tv / static_cast<double>(nq);
  row->top8 = top8 / static_cast<double>(nq);
  row->agg_mse = agg / static_cast<double>(nq);
}

struct Spec {
  std::string kind;  // fib, abs, f16, pq, sq
  uint32_t k = 0, n = 0;
  int bits = 0;
  std::string type;
};

std::vector<Spec> Specs(uint32_t /*d*/, bool quick) {
  std::vector<Spec> s;
  // FibQuant block codes: index rates 0.5 .. 4 bits/coord at k = 2, 4, 8.
  const std::vector<std::pair<uint32_t, uint32_t>> fib =
      quick ? std::vector<std::pair<uint32_t, uint32_t>>{{8, 16}, {4, 16}, {4, 256}, {2, 16}, {2, 64}, {2, 256}}
            : std::vector<std::pair<uint32_t, uint32_t>>{{8, 16}, {8, 64}, {8, 256}, {4, 16}, {2, 4},
                                                         {8, 4096}, {4, 64}, {2, 8}, {4, 256}, {2, 16},
                                                         {4, 4096}, {2, 64}, {2, 256}, {2, 1024}};
  for (auto [k, n] : fib) s.push_back({"fib", k, n, 0, ""});
  for (uint32_t n : {2u, 4u, 8u, 16u, 32u}) s.push_back({"fib", 1, n, 0, ""});  // scalar Lloyd-Max
  // The structured rotation at a few shapes (same codebooks up to the rotation's digest).
  if (!quick) {
    for (auto [k, n] : std::vector<std::pair<uint32_t, uint32_t>>{{8, 256}, {4, 256}, {1, 4}, {2, 256}, {1, 16}}) {
      s.push_back({"fib", k, n, 0, "hadamard"});
    }
  }
  s.push_back({"abs", 0, 0, 4, ""});
  s.push_back({"abs", 0, 0, 8, ""});
  s.push_back({"f16", 0, 0, 16, "bf16"});
  s.push_back({"f16", 0, 0, 16, "fp16"});
  // Faiss PQ at the FibQuant (k, N) shapes it can train (N <= 256 with this much training data).
  for (auto [k, n] : std::vector<std::pair<uint32_t, uint32_t>>{{8, 16}, {8, 256}, {4, 16}, {2, 4}, {4, 64},
                                                                {2, 8}, {4, 256}, {2, 16}, {2, 64}, {2, 256}}) {
    s.push_back({"pq", k, n, 0, ""});
  }
  for (const char* t : {"4bit", "4bit_uniform", "6bit", "8bit"}) s.push_back({"sq", 0, 0, 0, t});
  return s;
}

// Vectors [lo, hi) tokens of one tensor, all heads: a contiguous block.
const float* Tokens(const Dataset& ds, const std::vector<float>& a, size_t lo) {
  return a.data() + lo * ds.heads * ds.d;
}

int Run(int argc, char** argv) {
  std::string out = "fidelity.csv", cache;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--out=", 0) == 0) out = a.substr(6);
    else if (a.rfind("--cache-dir=", 0) == 0) cache = a.substr(12);
    else if (a == "--quick") quick = true;
    else {
      std::fprintf(stderr, "usage: fidelity_report [--out=FILE.csv] [--cache-dir=DIR] [--quick]\n");
      return 2;
    }
  }
  SetFaissThreads(1);  // deterministic training, and no OpenMP spinning on a shared machine
  std::vector<Dataset> sets;
  for (int layer : {0, 1}) {
    Dataset ds = LoadUseLite(layer);
    if (!ds.name.empty()) sets.push_back(std::move(ds));
  }
  sets.push_back(MakeSynthetic(128, 20260526));

  std::ofstream csv(out);
  csv << "dataset,d,method,family,k,N,data_calibrated,index_bits_per_coord,code_bytes,total_bits_per_coord,"
         "ratio_vs_fp16,key_mse,key_rel_mse,key_cos,value_mse,value_rel_mse,value_cos,attn_out_cos,attn_tv,"
         "top8_agree,value_agg_mse,codebook_build_s\n";
  std::printf("%-22s %-34s %6s %7s %8s %8s %8s %8s %8s %6s\n", "dataset", "method", "bytes", "ratio", "k_rel",
              "v_rel", "out_cos", "tv", "top8", "build");
  for (const Dataset& ds : sets) {
    const uint32_t d = ds.d;
    const size_t n_train = ds.train_tokens * ds.heads, n_test = (ds.tokens - ds.train_tokens) * ds.heads;
    const float* ktest = Tokens(ds, ds.k, ds.train_tokens);
    const float* vtest = Tokens(ds, ds.v, ds.train_tokens);
    for (const Spec& s : Specs(d, quick)) {
      // Two codecs: keys and values (data-calibrated ones are trained separately on each).
      std::unique_ptr<VectorCodec> ck, cv;
      double build_s = 0;
      if (s.kind == "fib") {
        FibOptions opt;
        opt.cache_dir = cache;
        if (!s.type.empty()) opt.rotation = s.type;
        // Training: far more than the paper's 30 N samples (reference-distortion.md: 30 N
        // overfits): max(30 N, 2^15) spherical-Beta blocks; N >= 4096 uses 30 N and 1 restart.
        opt.training_samples = std::max<uint32_t>(30 * s.n, 1u << 15);
        if (s.n >= 4096) opt.restarts = 1;
        auto c = MakeFibQuant(d, s.k, s.n, opt, &build_s);
        if (!c.ok()) {
          std::fprintf(stderr, "skip fib k=%u N=%u: %s\n", s.k, s.n, c.status().ToString().c_str());
          continue;
        }
        ck = std::move(*c);
        auto c2 = MakeFibQuant(d, s.k, s.n, opt);  // cached or rebuilt: the same codebook
        cv = std::move(*c2);
      } else if (s.kind == "abs") {
        ck = MakeAbsmaxInt(d, s.bits);
        cv = MakeAbsmaxInt(d, s.bits);
      } else if (s.kind == "f16") {
        const DType t = s.type == "bf16" ? DType::kBF16 : DType::kF16;
        ck = MakeFloat16(d, t);
        cv = MakeFloat16(d, t);
      } else {
        if (!HaveFaiss()) continue;
        auto mk = [&]() {
          if (s.kind == "pq") return MakeFaissPq(d, d / s.k, static_cast<uint32_t>(std::log2(s.n) + 0.5));
          return MakeFaissSq(d, s.type);
        };
        auto a = mk(), b = mk();
        if (!a.ok() || !b.ok()) continue;
        ck = std::move(*a);
        cv = std::move(*b);
        absl::Status st = ck->Train(Tokens(ds, ds.k, 0), n_train);
        if (st.ok()) st = cv->Train(Tokens(ds, ds.v, 0), n_train);
        if (!st.ok()) {
          std::fprintf(stderr, "skip %s on %s: %s\n", ck->name().c_str(), ds.name.c_str(), st.ToString().c_str());
          continue;
        }
      }
      std::vector<uint8_t> codes(n_test * ck->code_bytes());
      std::vector<float> khat(n_test * d), vhat(n_test * d);
      absl::Status st = ck->Encode(DType::kF32, reinterpret_cast<const uint8_t*>(ktest), n_test, codes.data());
      if (st.ok()) st = ck->Decode(codes.data(), n_test, DType::kF32, reinterpret_cast<uint8_t*>(khat.data()));
      if (st.ok()) st = cv->Encode(DType::kF32, reinterpret_cast<const uint8_t*>(vtest), n_test, codes.data());
      if (st.ok()) st = cv->Decode(codes.data(), n_test, DType::kF32, reinterpret_cast<uint8_t*>(vhat.data()));
      if (!st.ok()) {
        std::fprintf(stderr, "skip %s on %s: %s\n", ck->name().c_str(), ds.name.c_str(), st.ToString().c_str());
        continue;
      }
      Row r;
      r.build_s = build_s;
      VectorStats(ktest, khat.data(), n_test, d, &r.key_mse, &r.key_rel, &r.key_cos);
      VectorStats(vtest, vhat.data(), n_test, d, &r.val_mse, &r.val_rel, &r.val_cos);
      Attention(ds, khat, vhat, &r);
      const double bytes = static_cast<double>(ck->code_bytes());
      char line[1024];
      std::snprintf(line, sizeof line,
                    "\"%s\",%u,\"%s\",\"%s\",%u,%u,%d,%.4f,%zu,%.4f,%.4f,%.6g,%.6g,%.6f,%.6g,%.6g,%.6f,%.6f,%.6f,"
                    "%.6f,%.6g,%.3f\n",
                    ds.name.c_str(), d, ck->name().c_str(), ck->family().c_str(), s.k, s.n,
                    ck->data_calibrated() ? 1 : 0, ck->index_bits_per_coord(), ck->code_bytes(), bytes * 8 / d,
                    2.0 * d / bytes, r.key_mse, r.key_rel, r.key_cos, r.val_mse, r.val_rel, r.val_cos, r.out_cos,
                    r.tv, r.top8, r.agg_mse, r.build_s);
      csv << line;
      csv.flush();
      std::printf("%-22s %-34s %6zu %7.2f %8.5f %8.5f %8.5f %8.5f %8.4f %6.1f\n", ds.name.c_str(),
                  ck->name().c_str(), ck->code_bytes(), 2.0 * d / bytes, r.key_rel, r.val_rel, r.out_cos, r.tv,
                  r.top8, r.build_s);
      std::fflush(stdout);
    }
  }
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

}  // namespace
}  // namespace fibquant::bench

int main(int argc, char** argv) { return fibquant::bench::Run(argc, argv); }
