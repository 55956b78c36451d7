// Rate-distortion and attention-fidelity report: FibQuant against the codecs users would pick
// instead, on the same vectors in the same run. Writes one CSV row per (dataset, method).
//
// Datasets:
//  - use-lite L0 (d=64) and L1 (d=128): real Q/K/V from ../shared/data/use-lite-qkv
//    (falls back to tests/data, 64 tokens, with a message; skipped with a message if both are absent).
//    Split by chunk: the first half of the chunks trains the data-calibrated baselines (Faiss),
//    every method is evaluated on the second half.
//  - synthetic-outliers (d=128): LLM-like keys with outlier channels (generator below, fixed seed).
//  - decoder-synth (d=128): bench/decoder_synth.h (RoPE outlier pairs, sinks, GQA, causal attention).
// Calibrated FibQuant rows (core/kv_calib.h) are calibrated on the training tokens only (never on
// the tokens they are evaluated on, like Faiss training); KIVI-style rows store their per-group
// scales and zeros with the data (counted in their bytes).
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
// Usage: fidelity_report [--out=FILE.csv] [--cache-dir=DIR] [--quick] [--datasets=SUBSTR,...]
//                        [--kinds=fib,cfib,kivi,abs,f16,pq,sq]
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
#include "bench/decoder_synth.h"
#include "core/half.h"
#include "core/kv_calib.h"
#include "core/rng.h"

namespace fibquant::bench {
namespace {

struct Chunk {
  size_t offset = 0, n = 0;
};

struct Dataset {
  std::string name;
  uint32_t d = 0, heads = 0;
  uint32_t q_heads = 0;  // 0: = heads; else GQA, q is [tokens, q_heads, d]
  bool causal = false;   // query i of a chunk sees keys 0..i only
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

// The decoder-like generator (bench/decoder_synth.h): 2 KV heads x 4 query heads (GQA), d = 128,
// 16 sequences of 128 tokens (8 calibrate / train, 8 test), causal attention.
Dataset MakeDecoder() {
  DecoderSynthOptions o;
  const DecoderSynth s = MakeDecoderSynth(o);
  Dataset ds;
  ds.name = "decoder-synth d=128";
  ds.d = o.head_dim;
  ds.heads = o.kv_heads;
  ds.q_heads = s.q_heads();
  ds.causal = true;
  ds.scale = 1.0 / std::sqrt(static_cast<double>(o.head_dim));
  ds.tokens = s.tokens();
  ds.q = s.q;
  ds.k = s.k;
  ds.v = s.v;
  ds.train_tokens = ds.tokens / 2;
  for (size_t c = o.sequences / 2; c < o.sequences; ++c) ds.chunks.push_back({c * o.seq_tokens, o.seq_tokens});
  return ds;
}

// Calibration (core/kv_calib.h) of one role from the training tokens: the [tokens, heads, d]
// training block reordered to the canonical [1, 1, heads, tokens, d] layout, queries likewise.
absl::StatusOr<KvCalibration> Calibrate(const Dataset& ds, bool key, const KvCalibrationOptions& opt) {
  const uint32_t d = ds.d, H = ds.heads, QH = ds.q_heads ? ds.q_heads : H;
  const size_t T = ds.train_tokens;
  KvTensorShape shape;
  shape.role = key ? KvRole::kKey : KvRole::kValue;
  shape.attention_kind = QH == H ? KvAttentionKind::kMha : KvAttentionKind::kGqa;
  shape.batch = shape.layers = 1;
  shape.kv_heads = H;
  shape.query_heads = QH;
  shape.tokens = static_cast<uint32_t>(T);
  shape.head_dim = d;
  shape.rope_state = key ? KvRopeState::kPostRope : KvRopeState::kNotApplicable;
  const std::vector<float>& src = key ? ds.k : ds.v;
  std::vector<float> x(T * H * d), q;
  for (size_t t = 0; t < T; ++t) {
    for (uint32_t h = 0; h < H; ++h) std::memcpy(&x[(h * T + t) * d], &src[(t * H + h) * d], d * 4);
  }
  if (key) {
    q.resize(T * QH * d);
    for (size_t t = 0; t < T; ++t) {
      for (uint32_t h = 0; h < QH; ++h) std::memcpy(&q[(h * T + t) * d], &ds.q[(t * QH + h) * d], d * 4);
    }
  }
  return ComputeKvCalibration(shape, x, q, opt);
}

// KIVI-style asymmetric integer quantization (Liu et al. 2024): keys per channel over a group of
// `group` tokens (fp16 scale and zero per channel and group), values per token (fp16 scale and zero
// per vector). Applied to one chunk of one head: x [n, d] -> xh.
void KiviQuant(const float* x, size_t n, uint32_t d, int bits, bool per_channel, size_t group, float* xh) {
  const double levels = (1 << bits) - 1;
  auto quant = [&](auto get, auto put, size_t m) {
    double lo = 1e300, hi = -1e300;
    for (size_t i = 0; i < m; ++i) {
      lo = std::min(lo, double{get(i)});
      hi = std::max(hi, double{get(i)});
    }
    const float zero = HalfToFloat(FloatToHalf(static_cast<float>(lo)));
    const float scale = HalfToFloat(FloatToHalf(static_cast<float>((hi - zero) / levels)));
    for (size_t i = 0; i < m; ++i) {
      const double q = scale > 0 ? std::clamp(std::round((double{get(i)} - zero) / scale), 0.0, levels) : 0.0;
      put(i, static_cast<float>(zero + q * scale));
    }
  };
  if (per_channel) {
    for (size_t g0 = 0; g0 < n; g0 += group) {
      const size_t m = std::min(group, n - g0);
      for (uint32_t c = 0; c < d; ++c) {
        quant([&](size_t i) { return x[(g0 + i) * d + c]; }, [&](size_t i, float v) { xh[(g0 + i) * d + c] = v; }, m);
      }
    }
  } else {
    for (size_t t = 0; t < n; ++t) {
      quant([&](size_t i) { return x[t * d + i]; }, [&](size_t i, float v) { xh[t * d + i] = v; }, d);
    }
  }
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
  const uint32_t QH = ds.q_heads ? ds.q_heads : H;
  for (const Chunk& c : ds.chunks) {
    for (uint32_t qh = 0; qh < QH; ++qh) {
      const uint32_t h = qh / (QH / H);
      for (size_t qi = c.offset; qi < c.offset + c.n; ++qi) {
        const float* q = &ds.q[(qi * QH + qh) * d];
        const size_t nk = ds.causal ? qi - c.offset + 1 : c.n;
        std::vector<double> p(nk), ph(nk);
        for (size_t j = 0; j < nk; ++j) {
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
        for (size_t j = 0; j < nk; ++j) {
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
  std::string kind;  // fib, abs, f16, pq, sq, cfib (calibrated FibQuant), kivi
  uint32_t k = 0, n = 0;
  int bits = 0;
  std::string type;
  // cfib: calibration scaling, centering ("static" from calibration, "page": per-chunk f32 mean
  // stored with the page, "none"), decoded-direction renormalisation.
  KvCalibScaling scaling = KvCalibScaling::kNone;
  std::string center = "static";
  bool renorm = false;
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
  // Calibrated FibQuant (core/kv_calib.h), calibrated on the training tokens.
  const std::vector<std::pair<uint32_t, uint32_t>> cshapes =
      quick ? std::vector<std::pair<uint32_t, uint32_t>>{{4, 256}, {2, 256}}
            : std::vector<std::pair<uint32_t, uint32_t>>{{8, 256}, {8, 4096}, {4, 256}, {4, 4096}, {2, 256}};
  for (auto [k, n] : cshapes) {
    s.push_back({"cfib", k, n, 0, "", KvCalibScaling::kQueryWhiten, "static", false});
    s.push_back({"cfib", k, n, 0, "", KvCalibScaling::kNone, "static", false});
  }
  for (uint32_t n : {4u, 16u}) s.push_back({"cfib", 1, n, 0, "", KvCalibScaling::kQueryWhiten, "static", false});
  if (!quick) {
    // The alternatives measured against query_whiten + static mean (docs/BENCHMARKS.md says what lost).
    for (auto [k, n] : std::vector<std::pair<uint32_t, uint32_t>>{{4, 256}, {2, 256}}) {
      s.push_back({"cfib", k, n, 0, "", KvCalibScaling::kWhiten, "static", false});
      s.push_back({"cfib", k, n, 0, "", KvCalibScaling::kQuery, "static", false});
      s.push_back({"cfib", k, n, 0, "", KvCalibScaling::kQueryWhiten, "none", false});
      s.push_back({"cfib", k, n, 0, "", KvCalibScaling::kNone, "page", false});
      s.push_back({"cfib", k, n, 0, "", KvCalibScaling::kQueryWhiten, "static", true});
    }
  }
  s.push_back({"kivi", 0, 0, 2, ""});
  s.push_back({"kivi", 0, 0, 4, ""});
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

// FibQuant fast-path round trip of n vectors [n, d] (f32) through `c`; renorm rescales each decoded
// vector to its stored fp16 norm (the "renormalise decoded directions" option).
absl::Status RoundTrip(const VectorCodec& c, const float* x, size_t n, uint32_t d, bool renorm, float* xh) {
  std::vector<uint8_t> codes(n * c.code_bytes());
  absl::Status st = c.Encode(DType::kF32, reinterpret_cast<const uint8_t*>(x), n, codes.data());
  if (st.ok()) st = c.Decode(codes.data(), n, DType::kF32, reinterpret_cast<uint8_t*>(xh));
  if (!st.ok() || !renorm) return st;
  for (size_t v = 0; v < n; ++v) {
    double a = 0, b = 0;
    for (uint32_t i = 0; i < d; ++i) {
      a += double{x[v * d + i]} * x[v * d + i];
      b += double{xh[v * d + i]} * xh[v * d + i];
    }
    const double target = HalfToFloat(FloatToHalf(static_cast<float>(std::sqrt(a))));
    if (b > 0) {
      for (uint32_t i = 0; i < d; ++i) xh[v * d + i] = static_cast<float>(xh[v * d + i] * target / std::sqrt(b));
    }
  }
  return st;
}

int Run(int argc, char** argv) {
  std::string out = "fidelity.csv", cache, only_sets, only_methods;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--out=", 0) == 0) out = a.substr(6);
    else if (a.rfind("--cache-dir=", 0) == 0) cache = a.substr(12);
    else if (a.rfind("--datasets=", 0) == 0) only_sets = a.substr(11);
    else if (a.rfind("--kinds=", 0) == 0) only_methods = a.substr(8);
    else if (a == "--quick") quick = true;
    else {
      std::fprintf(stderr,
                   "usage: fidelity_report [--out=FILE.csv] [--cache-dir=DIR] [--quick] [--datasets=SUBSTR,...] "
                   "[--kinds=fib,cfib,kivi,abs,f16,pq,sq]\n");
      return 2;
    }
  }
  auto selected = [](const std::string& list, const std::string& name, bool exact) {
    if (list.empty()) return true;
    size_t p = 0;
    while (p <= list.size()) {
      const size_t q = std::min(list.find(',', p), list.size());
      const std::string item = list.substr(p, q - p);
      if (!item.empty() && (exact ? name == item : name.find(item) != std::string::npos)) return true;
      p = q + 1;
    }
    return false;
  };
  SetFaissThreads(1);  // deterministic training, and no OpenMP spinning on a shared machine
  std::vector<Dataset> sets;
  for (int layer : {0, 1}) {
    if (!selected(only_sets, "use-lite L" + std::to_string(layer), false)) continue;
    Dataset ds = LoadUseLite(layer);
    if (!ds.name.empty()) sets.push_back(std::move(ds));
  }
  if (selected(only_sets, "synthetic-outliers d=128", false)) sets.push_back(MakeSynthetic(128, 20260526));
  if (selected(only_sets, "decoder-synth d=128", false)) sets.push_back(MakeDecoder());

  std::ofstream csv(out);
  csv << "dataset,d,method,family,k,N,data_calibrated,index_bits_per_coord,code_bytes,total_bits_per_coord,"
         "ratio_vs_fp16,key_mse,key_rel_mse,key_cos,value_mse,value_rel_mse,value_cos,attn_out_cos,attn_tv,"
         "top8_agree,value_agg_mse,codebook_build_s\n";
  std::printf("%-22s %-44s %6s %7s %8s %8s %8s %8s %8s %6s\n", "dataset", "method", "bytes", "ratio", "k_rel",
              "v_rel", "out_cos", "tv", "top8", "build");
  for (const Dataset& ds : sets) {
    const uint32_t d = ds.d, H = ds.heads;
    const size_t n_train = ds.train_tokens * ds.heads, n_test = (ds.tokens - ds.train_tokens) * ds.heads;
    const float* ktest = Tokens(ds, ds.k, ds.train_tokens);
    const float* vtest = Tokens(ds, ds.v, ds.train_tokens);
    // Calibrations are computed once per (dataset, options) on the training tokens only.
    std::vector<std::pair<KvCalibrationOptions, std::pair<KvCalibration, KvCalibration>>> calibs;
    auto calib_for = [&](const KvCalibrationOptions& o) -> const std::pair<KvCalibration, KvCalibration>* {
      for (const auto& c : calibs) {
        if (c.first == o) return &c.second;
      }
      auto a = Calibrate(ds, true, o), b = Calibrate(ds, false, o);
      if (!a.ok() || !b.ok()) {
        std::fprintf(stderr, "calibration failed on %s: %s\n", ds.name.c_str(),
                     (a.ok() ? b.status() : a.status()).ToString().c_str());
        return nullptr;
      }
      calibs.push_back({o, {std::move(*a), std::move(*b)}});
      return &calibs.back().second;
    };
    for (const Spec& s : Specs(d, quick)) {
      if (!selected(only_methods, s.kind, true)) continue;
      std::vector<float> khat(n_test * d), vhat(n_test * d);
      std::string name, family;
      bool calibrated = false;
      double index_bits = 0, bytes = 0, build_s = 0;
      if (s.kind == "kivi") {
        // Keys per channel over one test chunk (group = chunk length, 128 tokens: the cheapest
        // KIVI grouping, fp16 scale + zero per channel); values per token.
        std::vector<float> x, xh;
        for (const Chunk& c : ds.chunks) {
          for (uint32_t h = 0; h < H; ++h) {
            for (int role = 0; role < 2; ++role) {
              const std::vector<float>& src = role == 0 ? ds.k : ds.v;
              std::vector<float>& dst = role == 0 ? khat : vhat;
              x.resize(c.n * d);
              xh.resize(c.n * d);
              for (size_t t = 0; t < c.n; ++t) std::memcpy(&x[t * d], &src[((c.offset + t) * H + h) * d], d * 4);
              KiviQuant(x.data(), c.n, d, s.bits, role == 0, c.n, xh.data());
              for (size_t t = 0; t < c.n; ++t) {
                std::memcpy(&dst[((c.offset + t - ds.train_tokens) * H + h) * d], &xh[t * d], d * 4);
              }
            }
          }
        }
        name = "kivi-style int" + std::to_string(s.bits) + " (K per-channel/128 tok; V per-token)";
        family = "kivi";
        index_bits = s.bits;
        // Per vector: d * bits / 8 + keys 4 d / 128 (channel scale+zero per chunk), values 4; mean of both.
        bytes = d * s.bits / 8.0 + 0.5 * (4.0 * d / 128.0 + 4.0);
      } else if (s.kind == "cfib") {
        FibOptions opt;
        opt.cache_dir = cache;
        opt.training_samples = std::max<uint32_t>(30 * s.n, 1u << 15);
        if (s.n >= 4096) opt.restarts = 1;
        auto c = MakeFibQuant(d, s.k, s.n, opt, &build_s);
        if (!c.ok()) {
          std::fprintf(stderr, "skip cfib k=%u N=%u: %s\n", s.k, s.n, c.status().ToString().c_str());
          continue;
        }
        KvCalibrationOptions co;
        co.center = s.center == "static";
        co.scaling = s.scaling;
        const auto* cal = calib_for(co);
        if (!cal) continue;
        for (int role = 0; role < 2; ++role) {
          const KvCalibration& kc = role == 0 ? cal->first : cal->second;
          const float* x = role == 0 ? ktest : vtest;
          std::vector<float>& dst = role == 0 ? khat : vhat;
          std::vector<float> y(n_test * d), yh(n_test * d);
          for (size_t v = 0; v < n_test; ++v) kc.Forward(0, static_cast<uint32_t>(v % H), x + v * d, &y[v * d]);
          std::vector<double> pm;
          if (s.center == "page") {  // per-(chunk, head) mean, subtracted here, added back below
            pm.assign(ds.chunks.size() * H * d, 0);
            for (size_t ci = 0; ci < ds.chunks.size(); ++ci) {
              const Chunk& ch = ds.chunks[ci];
              for (uint32_t h = 0; h < H; ++h) {
                double* m = &pm[(ci * H + h) * d];
                for (size_t t = 0; t < ch.n; ++t) {
                  for (uint32_t i = 0; i < d; ++i) m[i] += y[((ch.offset + t - ds.train_tokens) * H + h) * d + i];
                }
                for (uint32_t i = 0; i < d; ++i) m[i] = static_cast<float>(m[i] / ch.n);
                for (size_t t = 0; t < ch.n; ++t) {
                  for (uint32_t i = 0; i < d; ++i) y[((ch.offset + t - ds.train_tokens) * H + h) * d + i] -= static_cast<float>(m[i]);
                }
              }
            }
          }
          absl::Status st = RoundTrip(**c, y.data(), n_test, d, s.renorm, yh.data());
          if (!st.ok()) {
            std::fprintf(stderr, "skip cfib on %s: %s\n", ds.name.c_str(), st.ToString().c_str());
            continue;
          }
          if (!pm.empty()) {
            for (size_t ci = 0; ci < ds.chunks.size(); ++ci) {
              const Chunk& ch = ds.chunks[ci];
              for (uint32_t h = 0; h < H; ++h) {
                for (size_t t = 0; t < ch.n; ++t) {
                  for (uint32_t i = 0; i < d; ++i) {
                    yh[((ch.offset + t - ds.train_tokens) * H + h) * d + i] += static_cast<float>(pm[(ci * H + h) * d + i]);
                  }
                }
              }
            }
          }
          for (size_t v = 0; v < n_test; ++v) kc.Inverse(0, static_cast<uint32_t>(v % H), &yh[v * d], &dst[v * d]);
        }
        name = (*c)->name() + " cal=" + std::string(KvCalibScalingName(s.scaling)) + " center=" + s.center +
               (s.renorm ? " renorm" : "");
        family = "fibquant-cal-k" + std::to_string(s.k);
        calibrated = true;
        index_bits = (*c)->index_bits_per_coord();
        bytes = static_cast<double>((*c)->code_bytes());
        if (s.center == "page") bytes += 4.0 * d / 128.0;  // f32 mean per 128-token page
      } else {
        // Two codecs: keys and values (data-calibrated ones are trained separately on each).
        std::unique_ptr<VectorCodec> ck, cv;
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
        absl::Status st = RoundTrip(*ck, ktest, n_test, d, false, khat.data());
        if (st.ok()) st = RoundTrip(*cv, vtest, n_test, d, false, vhat.data());
        if (!st.ok()) {
          std::fprintf(stderr, "skip %s on %s: %s\n", ck->name().c_str(), ds.name.c_str(), st.ToString().c_str());
          continue;
        }
        name = ck->name();
        family = ck->family();
        calibrated = ck->data_calibrated();
        index_bits = ck->index_bits_per_coord();
        bytes = static_cast<double>(ck->code_bytes());
      }
      Row r;
      r.build_s = build_s;
      VectorStats(ktest, khat.data(), n_test, d, &r.key_mse, &r.key_rel, &r.key_cos);
      VectorStats(vtest, vhat.data(), n_test, d, &r.val_mse, &r.val_rel, &r.val_cos);
      Attention(ds, khat, vhat, &r);
      char line[1024];
      std::snprintf(line, sizeof line,
                    "\"%s\",%u,\"%s\",\"%s\",%u,%u,%d,%.4f,%.4g,%.4f,%.4f,%.6g,%.6g,%.6f,%.6g,%.6g,%.6f,%.6f,%.6f,"
                    "%.6f,%.6g,%.3f\n",
                    ds.name.c_str(), d, name.c_str(), family.c_str(), s.k, s.n, calibrated ? 1 : 0, index_bits,
                    bytes, bytes * 8 / d, 2.0 * d / bytes, r.key_mse, r.key_rel, r.key_cos, r.val_mse, r.val_rel,
                    r.val_cos, r.out_cos, r.tv, r.top8, r.agg_mse, r.build_s);
      csv << line;
      csv.flush();
      std::printf("%-22s %-44s %6.1f %7.2f %8.5f %8.5f %8.5f %8.5f %8.4f %6.1f\n", ds.name.c_str(), name.c_str(),
                  bytes, 2.0 * d / bytes, r.key_rel, r.val_rel, r.out_cos, r.tv, r.top8, r.build_s);
      std::fflush(stdout);
    }
  }
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

}  // namespace
}  // namespace fibquant::bench

int main(int argc, char** argv) { return fibquant::bench::Run(argc, argv); }
