// Decoder-like synthetic Q/K/V (docs/BENCHMARKS.md, "Decoder-like synthetic KV"): the statistics
// that published measurements of decoder LLM KV caches report, in a seeded, dependency-free
// generator, so codecs can be measured on "LLM-like" data without shipping model activations.
//
// What it imitates (qualitatively; the magnitudes are this generator's parameters, not fitted to a
// particular model):
//  - Key outlier channels with large, consistent offsets (KIVI, Liu et al. 2024, Fig. 2; KVQuant,
//    Hooper et al. 2024): a few channels per head carry a fixed-sign mean of 8..14 against a bulk of
//    order 1, and keep it across tokens, so per-channel statistics are stable.
//  - RoPE on keys and queries (rotate-half convention, base 10000): channel pairs (i, i + d/2) rotate
//    by position * base^(-2i/d). The outlier channels are pairs among the lowest frequencies, where
//    post-RoPE keys still show them (KVQuant: pre-RoPE outliers are cleaner; post-RoPE they persist
//    in the slowly rotating pairs).
//  - Attention sinks (StreamingLLM, Xiao et al. 2024) and massive activations (Sun et al. 2024): the
//    first token of every sequence has a key aligned with the mean query (its logit sits about 4
//    above the others for a typical query) and a near-zero value (the sink is a no-op bias).
//  - GQA (Ainslie et al. 2023): q_per_kv query heads share each KV head (Llama-3-8B: 4).
//  - Causal attention: query t sees keys 0..t of its own sequence.
//  - Values: no fixed outlier channels (KIVI: value caches are quantized per token), a mildly
//    anisotropic log-normal channel spread, per-token norm variation.
// Layout: q [tokens, kv_heads * q_per_kv, d], k and v [tokens, kv_heads, d]; sequences are
// consecutive runs of seq_tokens tokens, positions restart at 0 in each.
// Thread safety: a plain function of its options.
#ifndef FIBQUANT_BENCH_DECODER_SYNTH_H_
#define FIBQUANT_BENCH_DECODER_SYNTH_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/rng.h"

namespace fibquant::bench {

struct DecoderSynthOptions {
  uint32_t head_dim = 128;
  uint32_t kv_heads = 2;
  uint32_t q_per_kv = 4;
  uint32_t sequences = 16;
  uint32_t seq_tokens = 128;
  uint32_t outlier_pairs = 3;      // per KV head, among the 16 lowest-frequency pairs
  double outlier_mean_lo = 8, outlier_mean_hi = 14, outlier_sd = 2.5;
  double token_gain_sd = 0.15;     // keys and values scaled by exp(sd * z) per token
  double sink_logit = 4.0;         // logit lift of the sink for the mean query
  double rope_base = 10000;
  uint64_t seed = 20260601;
};

struct DecoderSynth {
  DecoderSynthOptions opt;
  std::vector<float> q, k, v;
  uint32_t q_heads() const { return opt.kv_heads * opt.q_per_kv; }
  size_t tokens() const { return size_t{opt.sequences} * opt.seq_tokens; }
};

inline void ApplyRope(std::vector<double>& x, uint32_t pos, double base) {
  const size_t half = x.size() / 2;
  for (size_t i = 0; i < half; ++i) {
    const double th = pos * std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(x.size()));
    const double c = std::cos(th), s = std::sin(th), a = x[i], b = x[i + half];
    x[i] = a * c - b * s;
    x[i + half] = b * c + a * s;
  }
}

inline DecoderSynth MakeDecoderSynth(const DecoderSynthOptions& o) {
  DecoderSynth out;
  out.opt = o;
  const uint32_t d = o.head_dim, half = d / 2, H = o.kv_heads, QH = H * o.q_per_kv;
  Rng rng(o.seed);
  auto lognormal = [&](double sd) { return std::exp(sd * rng.Normal()); };
  // Per KV head: key mean / sd, value sd; per query head: query mean / sd.
  std::vector<std::vector<double>> kmu(H, std::vector<double>(d)), ksd(H, std::vector<double>(d)),
      vsd(H, std::vector<double>(d)), qmu(QH, std::vector<double>(d)), qsd(QH, std::vector<double>(d)),
      sink(H, std::vector<double>(d));
  for (uint32_t h = 0; h < H; ++h) {
    for (uint32_t i = 0; i < d; ++i) {
      kmu[h][i] = 0.5 * rng.Normal();
      ksd[h][i] = lognormal(0.35);
      vsd[h][i] = lognormal(0.3);
    }
    std::vector<uint32_t> pairs;
    while (pairs.size() < o.outlier_pairs) {
      const uint32_t p = half - 1 - static_cast<uint32_t>(rng.NextU64() % 16);
      bool dup = false;
      for (uint32_t x : pairs) dup |= x == p;
      if (!dup) pairs.push_back(p);
    }
    std::vector<bool> outl(d, false);
    for (uint32_t p : pairs) {
      for (uint32_t c : {p, p + half}) {
        const double m = o.outlier_mean_lo + (o.outlier_mean_hi - o.outlier_mean_lo) * rng.NextDouble();
        kmu[h][c] = rng.NextDouble() < 0.5 ? -m : m;
        ksd[h][c] = o.outlier_sd;
        outl[c] = true;
      }
    }
    for (uint32_t g = 0; g < o.q_per_kv; ++g) {
      const uint32_t qh = h * o.q_per_kv + g;
      for (uint32_t i = 0; i < d; ++i) {
        qmu[qh][i] = outl[i] ? (rng.NextDouble() < 0.5 ? -1.0 : 1.0) : 0.3 * rng.Normal();
        qsd[qh][i] = outl[i] ? 1.5 : lognormal(0.2);
      }
    }
    // Sink key: the key mean plus a lift along the group's mean query, sized so that the mean
    // query's logit rises by sink_logit (logits are q.k / sqrt(d)).
    std::vector<double> mq(d, 0);
    for (uint32_t g = 0; g < o.q_per_kv; ++g) {
      for (uint32_t i = 0; i < d; ++i) mq[i] += qmu[h * o.q_per_kv + g][i] / o.q_per_kv;
    }
    double n2 = 0;
    for (double x : mq) n2 += x * x;
    for (uint32_t i = 0; i < d; ++i) sink[h][i] = kmu[h][i] + o.sink_logit * std::sqrt(double(d)) * mq[i] / n2;
  }
  const size_t T = out.tokens();
  out.q.resize(T * QH * d);
  out.k.resize(T * H * d);
  out.v.resize(T * H * d);
  std::vector<double> x(d);
  for (size_t t = 0; t < T; ++t) {
    const uint32_t pos = static_cast<uint32_t>(t % o.seq_tokens);
    for (uint32_t h = 0; h < H; ++h) {
      const double gk = std::exp(o.token_gain_sd * rng.Normal());
      for (uint32_t i = 0; i < d; ++i) {
        x[i] = pos == 0 ? sink[h][i] : gk * (kmu[h][i] + ksd[h][i] * rng.Normal());
      }
      ApplyRope(x, pos, o.rope_base);
      for (uint32_t i = 0; i < d; ++i) out.k[(t * H + h) * d + i] = static_cast<float>(x[i]);
      const double gv = (pos == 0 ? 0.05 : 1.0) * std::exp(o.token_gain_sd * rng.Normal());
      for (uint32_t i = 0; i < d; ++i) out.v[(t * H + h) * d + i] = static_cast<float>(gv * vsd[h][i] * rng.Normal());
    }
    for (uint32_t qh = 0; qh < QH; ++qh) {
      for (uint32_t i = 0; i < d; ++i) x[i] = qmu[qh][i] + qsd[qh][i] * rng.Normal();
      ApplyRope(x, pos, o.rope_base);
      for (uint32_t i = 0; i < d; ++i) out.q[(t * QH + qh) * d + i] = static_cast<float>(x[i]);
    }
  }
  return out;
}

}  // namespace fibquant::bench

#endif  // FIBQUANT_BENCH_DECODER_SYNTH_H_
