// The project's specified random number generator and samplers (docs/FORMAT.md, "Randomness").
//
// Every seeded object (rotations, training samples, Lloyd restarts) draws from this generator, so its
// exact output is part of every codebook and rotation digest: changing any line here changes
// kRngAlgorithm. Generator: xoshiro256** seeded by SplitMix64. Normals: Marsaglia polar method.
// Gamma: Marsaglia-Tsang, with the U^(1/a) boost for a < 1. Logs and exps are PortableLog/PortableExp
// so the bits are the same on every x86-64 CPU.
// Thread safety: an Rng is a single-threaded value; give each thread its own.
#ifndef FIBQUANT_CORE_RNG_H_
#define FIBQUANT_CORE_RNG_H_

#include <cstdint>
#include <string_view>

namespace fibquant {

inline constexpr std::string_view kRngAlgorithm =
    "fq-rng-xoshiro256starstar-splitmix64-polar-mtgamma-v1";

class Rng {
 public:
  explicit Rng(uint64_t seed);

  // Next raw 64-bit output of xoshiro256**.
  uint64_t NextU64();
  // Uniform in [0, 1): (NextU64() >> 11) * 2^-53.
  double NextDouble();
  // Uniform in (0, 1): ((NextU64() >> 11) + 0.5) * 2^-53.
  double NextOpenDouble();
  // Standard normal (polar method; the second value of each accepted pair is cached and returned by
  // the next call).
  double Normal();
  // Gamma(shape, 1) for shape > 0 (finite). Returns NaN for an invalid shape.
  double Gamma(double shape);

 private:
  uint64_t s_[4];
  bool has_cached_normal_ = false;
  double cached_normal_ = 0.0;
};

// SplitMix64 step: advances *state and returns the mixed output (used for seeding and seed derivation).
uint64_t SplitMix64(uint64_t* state);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_RNG_H_
