// Multi-restart Lloyd-Max refinement of a block codebook on raw arrays, and the exact
// nearest-codeword search it is built on (docs/FORMAT.md, "Codebook: Lloyd-Max").
//
// Semantics are those of the sequential reference: nearest = smallest f64 squared distance
// sum_i (x_i - c_i)^2 (left to right), lowest index on ties; per-cell sums, distortions and far
// points accumulated in sample order. The implementation is parallel (ParallelFor over fixed
// 4096-sample chunks and fixed cell ranges), vectorised (8 codewords per AVX2/SSE2 kernel call,
// lane-wise the same operations as the scalar distance) and pruned (Yinyang group bounds across
// Lloyd passes, norm-sorted blocks for one-shot searches, with conservative floating-point
// margins), but every chosen index and every distance is bit-identical to the brute-force scan, so
// results do not depend on the thread count or the CPU.
// Owner: codebook module. Thread safety: the functions may be called concurrently (each spawns its
// own workers); SetLloydAvx2ForTesting is for single-threaded tests only.
#ifndef FIBQUANT_CORE_LLOYD_H_
#define FIBQUANT_CORE_LLOYD_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/cancel.h"
#include "core/codebook.h"
#include "core/profile.h"

namespace fibquant {

// Samples per ParallelFor chunk (fixed, independent of the thread count).
inline constexpr size_t kLloydChunk = 4096;
// Empty-cell split: the donor and the empty cell are placed +-kSplitEpsilon along the unit residual.
inline constexpr double kSplitEpsilon = 1e-6;
// Residual norms at or below this (f64 machine epsilon) cannot be split.
inline constexpr double kMinSplitResidual = 2.220446049250313e-16;

// Brute-force reference: the first n in 0..N-1 with the strictly smallest squared distance.
struct Nearest {
  uint32_t index = 0;
  double distance = 0;  // f64 squared Euclidean distance
};
Nearest NearestCodewordBruteForce(const double* x, const double* codewords, uint32_t n, uint32_t k);

// Exact nearest codeword of every sample (m x k row-major) with the pruned parallel search; index
// and distance are identical to NearestCodewordBruteForce. `threads` = 0 uses every core.
void AssignNearest(const double* samples, size_t m, const double* codewords, uint32_t n, uint32_t k,
                   int threads, uint32_t* index, double* distance);

// Mean over the samples of the nearest squared distance (sum in sample order, divided by m).
double MeanDistortion(const std::vector<double>& samples, const std::vector<double>& codewords,
                      uint32_t k, int threads = 0);

// Selects the AVX2 or the baseline (SSE2) distance kernel (both give bit-identical results; AVX2
// is used when the CPU has it). For tests; not synchronised with running searches. Returns the
// previous setting.
bool SetLloydAvx2ForTesting(bool enabled);

// Forces the stateless norm-sorted search in every Lloyd pass (normally used only when the
// codebook is too large for bounded search). For tests, like the above. Returns the previous setting.
bool SetLloydPlainSearchForTesting(bool enabled);

struct LloydParams {
  uint32_t block_dim = 0;
  uint32_t restarts = 1;
  uint32_t iterations = 1;
  EmptyCellPolicy empty_cell_policy = EmptyCellPolicy::kSplitHighestDistortion;
  int threads = 0;
  // Polled before every iteration: a cancelled build returns Cancelled within one Lloyd pass
  // (shutdown, a caller that went away). Never changes the result of a build that completes.
  const CancelToken* cancel = nullptr;
};

// Returns the starting codebook (N x k) of restart r >= 1.
using RestartStartFn = std::function<absl::StatusOr<std::vector<double>>(uint32_t restart)>;

struct LloydResult {
  std::vector<double> codewords;  // the kept codebook, f64 (caller rounds)
  LloydReport report;             // seed left 0: the caller fills it
};

// Runs the refinement. InvalidArgument for inconsistent sizes (empty, not multiples of k, fewer
// samples than codewords) or a missing restart function when restarts > 1; FailedPrecondition when
// an empty cell occurs under kFailClosed or cannot be repaired; Internal for a non-finite MSE;
// Cancelled when params.cancel was cancelled.
[[nodiscard]] absl::StatusOr<LloydResult> RunLloyd(const std::vector<double>& initial,
                                                   const std::vector<double>& samples,
                                                   const LloydParams& params,
                                                   const RestartStartFn& restart_start);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_LLOYD_H_
