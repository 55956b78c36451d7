// Codebook build benchmark: wall time of Codebook::Build (initial codebook, training-set sampling,
// multi-restart Lloyd-Max) at d = 128 by (k, N), with throughput and held-out quality counters.
//   items/s        = training sample-iterations per second (M * restarts * iterations / time)
//   bytes/s        = the same in bytes of f64 training blocks (x k * 8)
//   seconds        = wall time of one build
//   rel_mse        = held-out source rel-MSE (d/k) * E[block distortion] on 2^16 fresh blocks
//   rel_mse_init   = the same for the initial (untrained) codebook
//   train_rel_mse  = training-set rel-MSE of the kept codebook
// Compare with /work/shared/reference-distortion.md (d = 128 rows).
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "core/codebook.h"
#include "core/lloyd.h"
#include "core/parallel.h"
#include "core/radii.h"

namespace fibquant {
namespace {

constexpr uint32_t kDim = 128;

void BM_CodebookBuild(benchmark::State& state) {
  const uint32_t k = static_cast<uint32_t>(state.range(0));
  const uint32_t n = static_cast<uint32_t>(state.range(1));
  const uint32_t restarts = static_cast<uint32_t>(state.range(2));
  const int threads = static_cast<int>(state.range(3));
  absl::StatusOr<Profile> p = Profile::PaperDefault(kDim, k, n, 1);
  if (!p.ok()) {
    state.SkipWithError(p.status().ToString().c_str());
    return;
  }
  p->lloyd_restarts = restarts;
  absl::StatusOr<Codebook> cb = absl::UnknownError("not built");
  double seconds = 0;
  for (auto _ : state) {
    cb = Codebook::Build(*p, threads);
    if (!cb.ok()) {
      state.SkipWithError(cb.status().ToString().c_str());
      return;
    }
    seconds += cb->build_stats().seconds;
  }
  const double iters = static_cast<double>(state.iterations());
  const int64_t sample_iters = static_cast<int64_t>(p->training_samples) * p->lloyd_restarts *
                               p->lloyd_iterations;
  state.SetItemsProcessed(sample_iters * state.iterations());
  state.SetBytesProcessed(sample_iters * state.iterations() * k * 8);
  const double scale = static_cast<double>(kDim) / k;
  const std::vector<double> held = *SphericalBetaSamples(kDim, k, 1 << 16, 0xBE7C4);
  const std::vector<double> cw(cb->codewords().begin(), cb->codewords().end());
  state.counters["seconds"] = seconds / iters;
  state.counters["threads"] = threads == 0 ? DefaultThreadCount() : threads;
  state.counters["M"] = p->training_samples;
  state.counters["rel_mse"] = MeanDistortion(held, cw, k) * scale;
  state.counters["rel_mse_init"] = MeanDistortion(held, *InitialCodebook(*p), k) * scale;
  state.counters["train_rel_mse"] = cb->report().best_mse * scale;
  state.SetLabel("d=128 k=" + std::to_string(k) + " N=" + std::to_string(n) + " R=" +
                 std::to_string(restarts) + " T=25");
}

// Args: k, N, restarts, threads (0 = all cores).
BENCHMARK(BM_CodebookBuild)
    ->ArgNames({"k", "N", "R", "threads"})
    ->Args({2, 16, 4, 0})
    ->Args({2, 256, 4, 0})
    ->Args({4, 256, 4, 0})
    ->Args({8, 256, 4, 0})
    ->Args({8, 256, 4, 1})
    ->Args({8, 4096, 1, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MeasureProcessCPUTime();

}  // namespace
}  // namespace fibquant

BENCHMARK_MAIN();
