// Rotation benchmarks: the f32 batch paths (the encode/decode hot path) for both algorithms, with the
// SIMD and the forced-scalar kernel, the f64 reference Apply for comparison, and Haar construction.
// Counters: vectors/s (items), bytes/s (f32 input bytes), and max_abs_err of the batch output
// against the f64 reference on the same inputs (a quality check that the fast path is still right).
#include <algorithm>
#include <cmath>
#include <vector>

#include "benchmark/benchmark.h"
#include "core/profile.h"
#include "core/rng.h"
#include "core/rotation.h"

namespace fibquant {
namespace {

std::vector<float> RandomUnitRows(size_t n, size_t d, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> x(n * d);
  for (size_t r = 0; r < n; ++r) {
    double norm2 = 0.0;
    for (size_t c = 0; c < d; ++c) {
      const double v = rng.Normal();
      x[r * d + c] = static_cast<float>(v);
      norm2 += v * v;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(norm2));
    for (size_t c = 0; c < d; ++c) x[r * d + c] *= inv;
  }
  return x;
}

double MaxErrVsReference(const Rotation& rot, const std::vector<float>& x,
                         const std::vector<float>& y, size_t rows) {
  const size_t d = rot.dim();
  std::vector<double> xd(d), yd(d);
  double worst = 0.0;
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < d; ++c) xd[c] = x[r * d + c];
    rot.Apply(xd.data(), yd.data());
    for (size_t c = 0; c < d; ++c) worst = std::max(worst, std::fabs(yd[c] - y[r * d + c]));
  }
  return worst;
}

// Args: dim, n, hadamard (0/1), scalar (0/1), inverse (0/1).
void BM_ApplyBatch(benchmark::State& state) {
  const uint32_t d = static_cast<uint32_t>(state.range(0));
  const size_t n = static_cast<size_t>(state.range(1));
  const bool hadamard = state.range(2) != 0;
  const bool scalar = state.range(3) != 0;
  const bool inverse = state.range(4) != 0;
  absl::StatusOr<Rotation> rot = Rotation::Create(hadamard ? kRotationHadamard : kRotationHaarQr, d, 1);
  if (!rot.ok()) {
    state.SkipWithError(rot.status().ToString().c_str());
    return;
  }
  SetRotationKernelForTesting(scalar ? RotationKernel::kScalar : RotationKernel::kAuto);
  const std::vector<float> x = RandomUnitRows(n, d, 2);
  std::vector<float> y(n * d);
  for (auto _ : state) {
    if (inverse) {
      rot->ApplyInverseBatch(x.data(), y.data(), n);
    } else {
      rot->ApplyBatch(x.data(), y.data(), n);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  if (!inverse) rot->ApplyBatch(x.data(), y.data(), n);
  state.counters["max_abs_err"] = inverse ? 0.0 : MaxErrVsReference(*rot, x, y, std::min<size_t>(n, 64));
  state.counters["simd"] = (!scalar && RotationSimdAvailable()) ? 1 : 0;
  SetRotationKernelForTesting(RotationKernel::kAuto);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(n));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(n * d * sizeof(float)));
  state.SetLabel(std::string(hadamard ? "hadamard" : "haar") + (scalar ? "/scalar" : "/auto") +
                 (inverse ? "/inverse" : "/forward"));
}

void ApplyBatchArgs(benchmark::internal::Benchmark* b) {
  for (int64_t had : {0, 1}) {
    for (int64_t d : {64, 128, 256}) {
      for (int64_t scalar : {0, 1}) b->Args({d, 1024, had, scalar, 0});
      b->Args({d, 1024, had, 0, 1});
    }
  }
  b->Args({128, 256, 0, 0, 0});
  b->Args({128, 4096, 0, 0, 0});
  b->Args({128, 4096, 1, 0, 0});
}
BENCHMARK(BM_ApplyBatch)->Apply(ApplyBatchArgs)->ArgNames({"d", "n", "hadamard", "scalar", "inverse"});

// The f64 reference, one vector at a time over the same n = 1024 rows.
void BM_ApplyReference(benchmark::State& state) {
  const uint32_t d = static_cast<uint32_t>(state.range(0));
  const bool hadamard = state.range(1) != 0;
  const size_t n = 1024;
  absl::StatusOr<Rotation> rot = Rotation::Create(hadamard ? kRotationHadamard : kRotationHaarQr, d, 1);
  if (!rot.ok()) {
    state.SkipWithError(rot.status().ToString().c_str());
    return;
  }
  const std::vector<float> xf = RandomUnitRows(n, d, 2);
  const std::vector<double> x(xf.begin(), xf.end());
  std::vector<double> y(n * size_t{d});
  for (auto _ : state) {
    for (size_t r = 0; r < n; ++r) rot->Apply(x.data() + r * d, y.data() + r * d);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(n));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(n * d * sizeof(double)));
  state.SetLabel(hadamard ? "hadamard/f64" : "haar/f64");
}
BENCHMARK(BM_ApplyReference)
    ->ArgsProduct({{64, 128, 256}, {0, 1}})
    ->ArgNames({"d", "hadamard"});

void BM_CreateHaar(benchmark::State& state) {
  const uint32_t d = static_cast<uint32_t>(state.range(0));
  uint64_t seed = 0;
  for (auto _ : state) {
    absl::StatusOr<Rotation> rot = Rotation::Create(kRotationHaarQr, d, seed++);
    benchmark::DoNotOptimize(rot);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_CreateHaar)
    ->Arg(64)
    ->Arg(128)
    ->Arg(512)
    ->Arg(1024)
    ->ArgName("d")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_CreateHadamard(benchmark::State& state) {
  const uint32_t d = static_cast<uint32_t>(state.range(0));
  uint64_t seed = 0;
  for (auto _ : state) {
    absl::StatusOr<Rotation> rot = Rotation::Create(kRotationHadamard, d, seed++);
    benchmark::DoNotOptimize(rot);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_CreateHadamard)->Arg(128)->Arg(4096)->ArgName("d")->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace fibquant

BENCHMARK_MAIN();
